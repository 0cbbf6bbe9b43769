"""Native int8 / int4 / bf16 weight-only matmul kernels for CPU inference, called through
`jax.ffi`.

Why: XLA's CPU backend never fuses a dtype conversion into a dot. `x @ w_int8.astype(f32)`
becomes a full f32 copy of the weight followed by an f32 dot, so int8 and bf16 weights decode
no faster than f32 ones (docs/performance.md has the figures). `int8_matvec.cc` reads each
quantized (or bf16) weight once and widens it in registers. It wants the weights in 128-column
tiles (`TiledInt8Weight`, `TiledInt4Weight`, `TiledBf16Weight`: one contiguous stream per
tile), made once at load time by `use_native_kernels`; checkpoints keep the plain
`[d_in, d_out]` layout.

The kernel is compiled on first use with the system C++ compiler into a cache folder
(`$HPLLM_CACHE` or `~/.cache/hpllm`). Its instruction path (AVX-512, AVX2 + FMA, or portable
loops) is chosen at compile time from the target's feature macros; `HPLLM_KERNEL_ISA` picks the
build:

- `native` (default): `-march=native`, the best path this CPU runs;
- `avx512` / `avx2`: `-march=x86-64-v4` / `-march=x86-64-v3` (for tests and comparisons);
- `avx512vnni`: `-march=x86-64-v4 -mavx512vnni` (the w8a8 and w4a8 kernels' `vpdpbusd` path);
- `avx2vnni`: `-march=x86-64-v3 -mavxvnni` (AVX2 with AVX-VNNI's 256-bit `vpdpbusd` in the
  w8a8 and w4a8 kernels, as on Alder Lake and later client CPUs);
- `avx512amx`: AVX-512 plus AMX-INT8 (batched int8-, w8a8 and int4-weight products on the tile
  unit; `native` has it on CPUs that do);
- `portable`: the plain loops (`-DHPLLM_PORTABLE`), the path of non-x86 machines.

The cached library's name is a hash of the source, the flags, the JAX version and the target
features the compiler resolves for those flags (its predefined macros), so a home folder shared
by an AVX-512 and an AVX2 machine holds one library per CPU kind and neither loads the other's.
Without a compiler, or with `HPLLM_NATIVE_KERNELS=0`, nothing changes: `use_native_kernels`
returns the model as is and the pure-XLA ops run.

Every f32 product runs the kernel, prompts included: from 5 activation rows up each weight
block is dequantized once and shared by all rows (whole-tile blocks for batched decode, from 64
rows a blocked GEMM on weight panels), which measured level with or faster than XLA's f32 dot
on a dequantized copy of the weight at every row count up to 2048 (`bench/prefill_threshold.py`,
docs/performance.md). On AMD CPUs int8 and bf16 products of 5 rows and up take the registers
route instead (`WIDEN_IN_REGISTERS`: chunks of 6 rows widen each weight in registers, faster
where a widening issues beside the FMAs; `int8_matvec.cc`, at kBatchRows, has the figures).
On AMD CPUs with AVX-512 VNNI, int8 and int4 weight-only products take neither: every row
count runs `NativeVnniInt8Dot` on `TiledVnniInt8Weight` and `NativeVnniInt4Dot` on
`TiledVnniInt4Weight` (int4 in groups of a multiple of 8 or per channel; `DIGITS_ON_VNNI`), the
activations as three int8 digits as on AMX (below) and their products `vpdpbusd`'s exact int32
sums, which a Zen 4 issues as often as an FMA: 64 / 3 multiply-adds per instruction against
the FMA's 16, and no widening of the weights. AVX2 builds on AMD CPUs run int4 weight-only
products of 1 to 4 rows the same way (`Kernels.int4_digits`: `vpmaddubsw` and `vpmaddwd`, or
AVX-VNNI's 256-bit `vpdpbusd` where the build has it), and from 5 rows dequantize the same
layout for the FMA routes.
`prefill_rows` switches a product with that many rows or more to the XLA route (the bench and
the tests use it; `PREFILL_ROWS` is None: never).

On a CPU with AMX-INT8 whose OS grants the tile registers (`Kernels.amx`, asked once when the
build loads), `use_native_kernels` tiles int8 weight-only linears into the tile unit's layout
instead (`TiledAmxInt8Weight`: the four k of a column adjacent, 1 KiB operands the unit loads
straight from the array) and every row count of theirs runs on the unit (`NativeAmxInt8Dot`;
`int8_matvec.cc` explains the activations' three int8 digits and their error bound,
|error| <= 2^-24 x max|x_row| x sum|w_column|). Without AMX, int8 weights keep
`TiledInt8Weight` and the FMA kernels. w8a8 and int4-weight products of 5 rows and up run on
the unit too (w8a8 keeps the XLA op's bits; int4 has the same three-digit activations). int4
takes it where each scale group is whole 64-row k-steps of the unit (group size a multiple of
64, or one group per channel: `int4_on_amx`); other group sizes keep the FMA routes.

w4a8 (int4 weights, activations quantized to int8 per token: the arithmetic of llama.cpp's
Q4_0 dot) runs the integer paths of the w8a8 kernel (`NativeW4A8Dot` on `TiledW4A8Weight`,
where each group is whole octs of k: `w4a8_on_native`), and with `Kernels.amx` the tile unit
from 5 rows where each group is whole 64-k steps; every path equals the XLA op bit for bit.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, BFloat16, Bool, Float, Int8, Int32, Shaped, UInt8

from hpllm.kvcache import KVCache
from hpllm.linear import FloatDot, Linear, MatmulOp
from hpllm.model import Attention, DecodeAttention, Transformer
from hpllm.quant.integer import W4A8Dot, W8A8Dot, int8_scaled_matmul, w4a8_matmul
from hpllm.quant.quantizers import INT8_MAX, int8_scale, pack_int4, quantize_int, unpack_int4
from hpllm.quant.weight_only import (
    Int4Weight,
    Int4WeightOnlyDot,
    Int8Weight,
    Int8WeightOnlyDot,
    int4_weight_only_matmul,
    int8_weight_only_matmul,
)

SOURCE = Path(__file__).with_name("int8_matvec.cc")
COMMON_FLAGS = ("-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
# HPLLM_KERNEL_ISA -> the target flags of that build.
ISA_FLAGS = {
    "native": ("-march=native",),
    "avx512": ("-march=x86-64-v4",),
    "avx2": ("-march=x86-64-v3",),
    # AVX-512 plus VNNI: the w8a8 kernel's vpdpbusd path (x86-64-v4 alone runs its AVX2 path).
    "avx512vnni": ("-march=x86-64-v4", "-mavx512vnni"),
    # AVX2 plus AVX-VNNI: the integer kernels' 256-bit vpdpbusd (client cores without AVX-512).
    "avx2vnni": ("-march=x86-64-v3", "-mavxvnni"),
    # AVX-512 plus AMX-INT8: batched int8, w8a8 and int4 products on the tile unit (Sapphire
    # Rapids on).
    "avx512amx": ("-march=x86-64-v4", "-mamx-tile", "-mamx-int8"),
    "portable": ("-march=native", "-DHPLLM_PORTABLE"),
}
# /proc/cpuinfo flags a forced build needs (x86-64-v4 / -v3 as GCC defines them).
ISA_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"),
    "avx2": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"),
}
ISA_CPU_FLAGS["avx512vnni"] = ISA_CPU_FLAGS["avx512"] + ("avx512_vnni",)
ISA_CPU_FLAGS["avx2vnni"] = ISA_CPU_FLAGS["avx2"] + ("avx_vnni",)
ISA_CPU_FLAGS["avx512amx"] = ISA_CPU_FLAGS["avx512"] + ("amx_tile", "amx_int8")
# Predefined macros that name a target feature: the part of the compiler's view of the target
# that decides which instructions the library may contain.
_FEATURE_MACRO = re.compile(r"#define (__(?:[A-Z0-9_]*(?:AVX|SSE|FMA|F16C|BMI|AMX|VNNI|POPCNT"
                            r"|LZCNT|MOVBE|ARM_FEATURE|ARM_NEON|aarch64|x86_64|riscv)"
                            r"[A-Za-z0-9_]*)) ")


def default_isa() -> str:
    isa = os.environ.get("HPLLM_KERNEL_ISA", "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"HPLLM_KERNEL_ISA must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    return isa


def cpuinfo_field(name: str) -> str | None:
    """The value of the first CPU's `name` line in /proc/cpuinfo ("flags", "vendor_id", ...):
    "" if it has no such line, None if there is no /proc/cpuinfo to read."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.split(":", 1)[0].strip() == name), "")


def cpu_lacks(isa: str) -> str | None:
    """Why this CPU cannot run the `isa` build, or None if it can."""
    needed = ISA_CPU_FLAGS.get(isa, ())
    if not needed:
        return None
    listed = cpuinfo_field("flags")
    if listed is None:
        return "no /proc/cpuinfo to read the CPU's flags from"
    flags = set(listed.split())
    missing = [flag for flag in needed if flag not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def target_features(compiler: str, flags: tuple[str, ...]) -> tuple[str, ...]:
    """The target-feature macros (`__AVX2__`, `__AVX512F__`, ...) the compiler defines under
    `flags`: what `-march=native` resolved to on this machine."""
    result = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{compiler} {' '.join(flags)} -dM -E failed: {result.stderr.strip()[:300]}")
    return tuple(sorted(set(_FEATURE_MACRO.findall(result.stdout))))


def cache_key(source: bytes, flags: tuple[str, ...], features: tuple[str, ...]) -> str:
    """Name part of the cached library: changes with the source, the flags, the JAX version
    (the FFI headers) and the resolved target features."""
    digest = hashlib.sha256(source)
    for part in (" ".join(flags), jax.__version__, " ".join(features)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("HPLLM_CACHE", Path.home() / ".cache" / "hpllm"))


def _build(isa: str) -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OSError("no C++ compiler (g++) found")
    flags = COMMON_FLAGS + ISA_FLAGS[isa]
    key = cache_key(SOURCE.read_bytes(), flags, target_features(compiler, ISA_FLAGS[isa]))
    library = _cache_dir() / f"int8_matvec-{isa}-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = library.with_name(f".{library.name}.{uuid.uuid4().hex[:8]}")
    command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[:500]}")
    os.replace(tmp, library)  # atomic: parallel first uses never load half a file
    return library


@dataclass(frozen=True)
class Kernels:
    """One loaded build: its FFI target names and the instruction path it was compiled with."""

    isa: str
    path: str  # "avx512" | "avx2" | "portable", as the library reports it
    w8a8_path: str  # "avx512_vnni" | "avx2_vnni" | "avx2" | "portable" (w4a8's too)
    # Products on the AMX tile unit: int8 weights (every row count, `TiledAmxInt8Weight`),
    # and from 5 rows up w8a8, and int4 and w4a8 weights in groups of a multiple of 64 or one
    # per channel (`int4_on_amx`).
    amx: bool
    int8_target: str
    int4_target: str
    w8a8_target: str
    attention_target: str  # decode attention over a float32 cache
    bf16_target: str
    attention_bf16_target: str  # ... over a bfloat16 cache
    attention_int8_target: str  # ... over an int8 cache with per-slot, per-head scales
    amx_int8_target: str  # int8 weights in the tile unit's layout (only where `amx`)
    w4a8_target: str  # int4 weights x int8 activations (the w8a8 kernel's integer path)
    vnni_int8_target: str  # int8 weights x f32 activations as three digits (AVX-512 VNNI only)
    vnni_int4_target: str  # int4 weights x f32 activations as three digits (`int4_digits`)

    @property
    def avx512_vnni(self) -> bool:
        """Whether the build has AVX-512 VNNI (the w8a8 kernel's and the digits routes' path)."""
        return self.w8a8_path == "avx512_vnni"

    @property
    def int4_digits(self) -> bool:
        """Whether the build runs int4 weight-only products as three digits
        (`NativeVnniInt4Dot`): AVX-512 VNNI's `vpdpbusd`, or an AVX2 build's `vpmaddubsw`
        (256-bit `vpdpbusd` where it has AVX-VNNI)."""
        return self.avx512_vnni or self.path == "avx2"


_loaded: dict[str, Kernels | str] = {}  # isa -> the build, or why it is unavailable


def load(isa: str | None = None) -> Kernels | None:
    """The `isa` build (default: `HPLLM_KERNEL_ISA`), compiled and registered on first use;
    None if it cannot be (`unavailable_reason` says why)."""
    isa = isa or default_isa()
    if isa not in _loaded:
        _loaded[isa] = _load(isa)
        if isinstance(_loaded[isa], str) and _loaded[isa] != "disabled":
            print(f"note: native kernels ({isa}) unavailable ({_loaded[isa]}); using "
                  "the XLA ops", file=sys.stderr)
    found = _loaded[isa]
    return found if isinstance(found, Kernels) else None


def unavailable_reason(isa: str | None = None) -> str | None:
    isa = isa or default_isa()
    load(isa)
    found = _loaded[isa]
    return found if isinstance(found, str) else None


def _load(isa: str) -> Kernels | str:
    if os.environ.get("HPLLM_NATIVE_KERNELS", "1") == "0":
        return "disabled"
    if jax.default_backend() != "cpu":
        return "not on CPU"
    if (lacks := cpu_lacks(isa)) is not None:
        return lacks
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(isa)))
    except OSError as error:
        return str(error)
    library.HpllmKernelPath.restype = ctypes.c_char_p
    library.HpllmW8A8Path.restype = ctypes.c_char_p
    kernels = Kernels(isa, library.HpllmKernelPath().decode(), library.HpllmW8A8Path().decode(),
                      bool(library.HpllmAmx()),
                      f"hpllm_int8_matvec_{isa}", f"hpllm_int4_matvec_{isa}",
                      f"hpllm_w8a8_matmul_{isa}", f"hpllm_decode_attention_{isa}",
                      f"hpllm_bf16_matvec_{isa}", f"hpllm_decode_attention_bf16_{isa}",
                      f"hpllm_decode_attention_int8_{isa}", f"hpllm_amx_int8_matmul_{isa}",
                      f"hpllm_w4a8_matmul_{isa}", f"hpllm_vnni_int8_matmul_{isa}",
                      f"hpllm_vnni_int4_matmul_{isa}")
    for target, symbol in ((kernels.int8_target, library.HpllmInt8Matvec),
                           (kernels.int4_target, library.HpllmInt4Matvec),
                           (kernels.w8a8_target, library.HpllmW8A8Matmul),
                           (kernels.attention_target, library.HpllmDecodeAttention),
                           (kernels.bf16_target, library.HpllmBf16Matvec),
                           (kernels.attention_bf16_target, library.HpllmDecodeAttentionBf16),
                           (kernels.attention_int8_target, library.HpllmDecodeAttentionInt8),
                           (kernels.amx_int8_target, library.HpllmAmxInt8Matmul),
                           (kernels.w4a8_target, library.HpllmW4A8Matmul),
                           (kernels.vnni_int8_target, library.HpllmVnniInt8Matmul),
                           (kernels.vnni_int4_target, library.HpllmVnniInt4Matmul)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return kernels


def available(isa: str | None = None) -> bool:
    """Whether the kernels are compiled and registered (building them on the first call)."""
    return load(isa) is not None


TILE = 128  # output columns per tile; must equal kTile in int8_matvec.cc
AMX_K = 64  # k of one AMX multiply; must equal kAmxK in int8_matvec.cc


def int4_on_amx(group_size: int) -> bool:
    """Whether int4 weights in groups of `group_size` (0: one per channel) take the AMX route
    where the build has it (`Kernels.amx`): each group whole k-steps of the unit. Other group
    sizes keep the FMA routes."""
    return group_size % AMX_K == 0


OFFSET_BINARY = jnp.uint8(0x88)  # flips the sign bit of both nibbles: q -> q + 8


def pad_inputs(values: Shaped[Array, "*layers d_in d_out"], multiple: int
               ) -> Shaped[Array, "*layers padded_d_in d_out"]:
    """Zero-pad the input axis (second to last) to a multiple of `multiple`."""
    missing = -values.shape[-2] % multiple
    return jnp.pad(values, [(0, 0)] * (values.ndim - 2) + [(0, missing), (0, 0)])


def pad_columns(values: Shaped[Array, "*rest d_out"]) -> Shaped[Array, "*rest padded_d_out"]:
    """Zero-pad the last axis to whole tiles."""
    missing = -values.shape[-1] % TILE
    return jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, missing)])


def tile_columns(values: Shaped[Array, "*layers rows d_out"]
                 ) -> Shaped[Array, "*layers tiles rows tile"]:
    """[..., rows, d_out] -> [..., d_out / TILE, rows, TILE], d_out zero-padded to whole tiles:
    each tile's rows become one contiguous stream for the kernel."""
    padded = pad_columns(values)
    tiles = padded.shape[-1] // TILE
    return jnp.moveaxis(padded.reshape(padded.shape[:-1] + (tiles, TILE)), -2, -3)


def untile_columns(tiled: Shaped[Array, "*layers tiles rows tile"], d_out: int
                   ) -> Shaped[Array, "*layers rows d_out"]:
    """The inverse of `tile_columns`."""
    tiles, rows, tile = tiled.shape[-3:]
    plain = jnp.moveaxis(tiled, -3, -2).reshape(tiled.shape[:-3] + (rows, tiles * tile))
    return plain[..., :d_out]


def transpose_trailing(values: Shaped[Array, "..."], order: tuple[int, ...]
                       ) -> Shaped[Array, "..."]:
    """`values` with its last len(order) axes permuted as `jnp.transpose` does with `order`
    (counted from the first of them), any leading layer axes kept in front."""
    n = values.ndim - len(order)
    return jnp.transpose(values, tuple(range(n)) + tuple(n + axis for axis in order))


class TiledInt8Weight(eqx.Module):
    """An `Int8Weight` in the kernel's layout: values [d_out / TILE, d_in, TILE] and scales
    padded to whole tiles (the padding columns are zero and never written out)."""

    values: Int8[Array, "*layers tiles d_in tile"]
    scales: Float[Array, "*layers padded_d_out"]
    d_out: int = eqx.field(static=True)

    def __init__(self, weight: Int8Weight):
        self.d_out = weight.values.shape[-1]
        self.values = tile_columns(weight.values)
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[Int8[Array, "*layers d_in d_out"], Float[Array, "*layers d_out"]]:
        """values and scales in the plain [d_in, d_out] layout (for the XLA op)."""
        return untile_columns(self.values, self.d_out), self.scales[..., :self.d_out]


VNNI_HALF = 64  # output columns per half of a tile in the VNNI layout; kVnniHalf in int8_matvec.cc
# The VNNI layouts' transposes: [quad or oct, k in quad, tile, half, column in half] <->
# [tile, half, quad or oct, column in half, k in quad].
TO_VNNI_HALVES, FROM_VNNI_HALVES = (2, 3, 0, 4, 1), (2, 4, 0, 1, 3)


class TiledVnniInt8Weight(eqx.Module):
    """An `Int8Weight` in the VNNI digits kernel's layout (`NativeVnniInt8Dot`): values
    [d_out / TILE, 2, ceil(d_in / 4), 64, 4], per 128-column tile two halves of 64 columns, each
    a contiguous stream of quads (the four k of a column adjacent, as `vpdpbusd` takes them),
    stored offset as unsigned bytes (q + 128: the instruction's unsigned operand; int8_matvec.cc
    explains the correction). d_in zero-padded to whole quads, d_out to whole tiles; scales
    padded to whole tiles."""

    values: UInt8[Array, "*layers tiles 2 quads 64 4"]
    scales: Float[Array, "*layers padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, weight: Int8Weight):
        self.d_in, self.d_out = weight.values.shape[-2:]
        values = pad_inputs(pad_columns(weight.values), 4)
        *layers, rows, cols = values.shape
        offset = jax.lax.bitcast_convert_type(values, jnp.uint8) ^ jnp.uint8(0x80)
        split = offset.reshape(*layers, rows // 4, 4, cols // TILE, 2, VNNI_HALF)
        self.values = transpose_trailing(split, TO_VNNI_HALVES)
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[Int8[Array, "*layers d_in d_out"], Float[Array, "*layers d_out"]]:
        """values and scales in the plain [d_in, d_out] layout (for the XLA op)."""
        *layers, tiles, halves, quads, half, four = self.values.shape
        split = transpose_trailing(self.values, FROM_VNNI_HALVES)
        offset = split.reshape(*layers, quads * four, tiles * halves * half)
        values = jax.lax.bitcast_convert_type(offset ^ jnp.uint8(0x80), jnp.int8)
        return values[..., :self.d_in, :self.d_out], self.scales[..., :self.d_out]


class TiledInt4Weight(eqx.Module):
    """An `Int4Weight` in the kernel's layout: packed [d_out / TILE, d_in / 2, TILE], scales
    [groups, d_out] padded to whole tiles. The nibbles are stored in offset binary (q + 8,
    0..15: the two's complement with its sign bit flipped), which the kernel widens with one
    AND or shift (the kernel source says why that is exact)."""

    packed: UInt8[Array, "*layers tiles half_padded_d_in tile"]
    scales: Float[Array, "*layers groups padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)
    group_size: int = eqx.field(static=True)

    def __init__(self, weight: Int4Weight):
        self.d_in, self.group_size = weight.d_in, weight.group_size
        self.d_out = weight.packed.shape[-1]
        self.packed = tile_columns(weight.packed ^ OFFSET_BINARY)
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[UInt8[Array, "*layers half_padded_d_in d_out"],
                             Float[Array, "*layers groups d_out"]]:
        """packed values and scales in the plain layout (for the XLA op)."""
        return (untile_columns(self.packed ^ OFFSET_BINARY, self.d_out),
                self.scales[..., :self.d_out])


def _rows(x: Float[Array, "*batch d_in"]) -> int:
    return x.size // x.shape[-1]


def _kernel_product(target: str, x2: Shaped[Array, "rows d_in"], batch: tuple[int, ...],
                    d_out: int, *operands: Shaped[Array, "..."], **attributes: bool
                    ) -> Float[Array, "*batch d_out"]:
    """The f32 [rows, d_out] product of FFI target `target` on the flattened activations `x2`
    and `operands` (and the target's `attributes`), reshaped back to the activations' `batch`
    axes."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], d_out), jnp.float32))
    return call(x2, *operands, **attributes).reshape(batch + (d_out,))


# Activation rows from which a product goes to XLA's f32 dot on a dequantized copy of the weight
# instead of the kernel; None: never. bench/prefill_threshold.py measured the kernel's blocked
# GEMM level with or ahead of that route at every row count from 1 to 2048 (figures and command
# in docs/performance.md), so no prompt is worth the per-call copy.
PREFILL_ROWS: int | None = None


def _xla_route(rows: int, prefill_rows: int | None) -> bool:
    return prefill_rows is not None and rows >= prefill_rows


# Whether batched int8 and bf16 products (5 rows and up) widen each weight in registers per
# chunk of 6 rows instead of dequantizing it once into an L1 block (int8_matvec.cc, at
# kBatchRows): faster on AMD's cores, which issue a widening beside their FMAs (measured on a
# Zen 4, both paths); on Intel's a widening takes an FMA port, which the dequantized routes
# spare.
AMD_CPU = cpuinfo_field("vendor_id") == "AuthenticAMD"
WIDEN_IN_REGISTERS = AMD_CPU


class NativeInt8Dot(MatmulOp):
    """`Int8WeightOnlyDot` on the native kernel of build `isa` (each row chunk reuses a weight
    tile from cache). From `prefill_rows` rows up (None: never), and for bf16 activations, the
    XLA op on the untiled weight (the reference numerics) runs instead. `widen_in_registers`
    picks the batched route (`WIDEN_IN_REGISTERS`)."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)
    widen_in_registers: bool = eqx.field(static=True, default=WIDEN_IN_REGISTERS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledInt8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, d_in = _rows(x), x.shape[-1]
        kernels = load(self.isa)
        if x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None:
            return int8_weight_only_matmul(x, *weight.plain())
        return _kernel_product(kernels.int8_target, x.reshape(rows, d_in), x.shape[:-1],
                               weight.d_out, weight.values, weight.scales,
                               widen_in_registers=self.widen_in_registers)


# Whether int8 and int4 weight-only products run on the VNNI digits kernels
# (`NativeVnniInt8Dot`, `NativeVnniInt4Dot`, every row count) where the build has AVX-512 VNNI
# and no AMX: on AMD CPUs, whose cores issue a 512-bit vpdpbusd as often as an FMA (measured on
# a Zen 4; int8_matvec.cc has the figures). Intel's cores without AMX issue vpdpbusd on one
# port and FMAs on two, so they keep the FMA routes. The same gate holds for AVX2 builds' int4
# digits route (`Kernels.int4_digits`), measured on Zen 4 and Zen 5 only.
DIGITS_ON_VNNI = AMD_CPU
# The longest d_in whose digit sums stay exact in int32 (255 x 127 x d_in < 2^31); kVnniMaxK in
# int8_matvec.cc. Longer inputs take the XLA op.
VNNI_MAX_K = 66000


class NativeVnniInt8Dot(MatmulOp):
    """`Int8WeightOnlyDot` on AVX-512 VNNI (build `isa`, where `Kernels.avx512_vnni`), every row
    count: the f32 activations enter as three int8 digits of a per-row scale, as on the AMX
    route, and each digit's product with the weights is an exact int32 sum of `vpdpbusd`
    (`int8_matvec.cc` gives the error bound, 2^-24 x max|x_row| x sum|w_column|). From
    `prefill_rows` rows up (None: never), for bf16 activations, where the build has no AVX-512
    VNNI, or for a d_in above `VNNI_MAX_K`, the XLA op on the untiled weight runs."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledVnniInt8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, d_in = _rows(x), x.shape[-1]
        kernels = load(self.isa)
        if (x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None
                or not kernels.avx512_vnni or d_in > VNNI_MAX_K):
            return int8_weight_only_matmul(x, *weight.plain())
        return _kernel_product(kernels.vnni_int8_target, x.reshape(rows, d_in), x.shape[:-1],
                               weight.d_out, weight.values, weight.scales)


AMX_GROUP = 16  # output columns per weight operand of the tile unit


class TiledAmxInt8Weight(eqx.Module):
    """An `Int8Weight` in the AMX tile unit's layout (`Kernels.amx`): values [d_out / TILE, 2,
    ceil(d_in / 64), 4, 16, 64]: per 128-column tile two halves of 64 columns, each a
    contiguous stream of k-steps of four 1 KiB weight operands, row i of an operand holding
    k = 4i .. 4i + 3 of its 16 columns (the four k of a column adjacent, as TDPBSSD reads them).
    d_in is zero-padded to whole steps of 64, d_out to whole tiles; scales padded to whole
    tiles. The kernel tile-loads the operands straight from this array."""

    values: Int8[Array, "*layers tiles 2 steps 4 16 64"]
    scales: Float[Array, "*layers padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, weight: Int8Weight):
        self.d_in, self.d_out = weight.values.shape[-2:]
        values = pad_inputs(pad_columns(weight.values), AMX_K)
        *layers, rows, cols = values.shape
        # [k-step, quad, k in quad, tile, half, group, column in group] ->
        # [tile, half, k-step, group, quad, column in group, k in quad]
        split = values.reshape(*layers, rows // AMX_K, AMX_K // 4, 4, cols // TILE, 2,
                               TILE // 2 // AMX_GROUP, AMX_GROUP)
        self.values = transpose_trailing(split, (3, 4, 0, 5, 1, 6, 2)).reshape(
            *layers, cols // TILE, 2, rows // AMX_K, TILE // 2 // AMX_GROUP, AMX_K // 4,
            4 * AMX_GROUP)
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[Int8[Array, "*layers d_in d_out"], Float[Array, "*layers d_out"]]:
        """values and scales in the plain [d_in, d_out] layout (for the XLA op)."""
        *layers, tiles, halves, steps, groups, quads, _ = self.values.shape
        split = self.values.reshape(*layers, tiles, halves, steps, groups, quads, AMX_GROUP, 4)
        # the inverse of __init__'s transpose
        values = transpose_trailing(split, (2, 4, 6, 0, 1, 3, 5)).reshape(
            *layers, steps * AMX_K, tiles * TILE)
        return values[..., :self.d_in, :self.d_out], self.scales[..., :self.d_out]


class NativeAmxInt8Dot(MatmulOp):
    """`Int8WeightOnlyDot` on the AMX tile unit (build `isa`, where `Kernels.amx`), every row
    count: the f32 activations enter as three int8 digits of a per-row scale, each digit's
    product with the weights is an exact int32 sum (`int8_matvec.cc` gives the error bound,
    2^-24 x max|x_row| x sum|w_column|). From `prefill_rows` rows up (None: never), for bf16
    activations, or where the build has no AMX, the XLA op on the untiled weight runs."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledAmxInt8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, d_in = _rows(x), x.shape[-1]
        kernels = load(self.isa)
        if (x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None
                or not kernels.amx):
            return int8_weight_only_matmul(x, *weight.plain())
        return _kernel_product(kernels.amx_int8_target, x.reshape(rows, d_in), x.shape[:-1],
                               weight.d_out, weight.values, weight.scales)


class NativeInt4Dot(MatmulOp):
    """`Int4WeightOnlyDot` on the native kernel of build `isa`: the packed nibbles are unpacked
    in registers and each group's partial sum is scaled once. From `prefill_rows` rows up (None:
    never), and for bf16 activations, the XLA op on the untiled weight runs instead."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledInt4Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, half_rows = _rows(x), weight.packed.shape[-2]
        kernels = load(self.isa)
        if x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None:
            return int4_weight_only_matmul(x, *weight.plain(), weight.d_in)
        x2 = x.reshape(rows, x.shape[-1])
        # Zero activations for the zero padding rows of the last group.
        x2 = jnp.pad(x2, ((0, 0), (0, 2 * half_rows - x2.shape[1])))
        return _kernel_product(kernels.int4_target, x2, x.shape[:-1], weight.d_out,
                               weight.packed, weight.scales)


class TiledBf16Weight(eqx.Module):
    """A bf16 weight in the kernel's layout: [d_out / TILE, d_in, TILE], zero-padded to whole
    tiles (the padding columns are never written out)."""

    values: BFloat16[Array, "*layers tiles d_in tile"]
    d_out: int = eqx.field(static=True)

    def __init__(self, weight: BFloat16[Array, "*layers d_in d_out"]):
        self.d_out = weight.shape[-1]
        self.values = tile_columns(weight)

    def plain(self) -> BFloat16[Array, "*layers d_in d_out"]:
        """The weight in the plain [d_in, d_out] layout (for the XLA op)."""
        return untile_columns(self.values, self.d_out)


class NativeBf16Dot(MatmulOp):
    """`FloatDot` on a bf16 weight, on the native kernel of build `isa`: each weight is widened
    to f32 in registers (exactly) instead of XLA's f32 copy of the whole weight per call. From
    `prefill_rows` rows up (None: never), and for bf16 activations, `FloatDot` on the untiled
    weight (the reference numerics) runs instead. `widen_in_registers` picks the batched route
    (`WIDEN_IN_REGISTERS`)."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)
    widen_in_registers: bool = eqx.field(static=True, default=WIDEN_IN_REGISTERS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledBf16Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, d_in = _rows(x), x.shape[-1]
        kernels = load(self.isa)
        if x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None:
            return FloatDot()(x, weight.plain())
        return _kernel_product(kernels.bf16_target, x.reshape(rows, d_in), x.shape[:-1],
                               weight.d_out, weight.values,
                               widen_in_registers=self.widen_in_registers)


def _is_bf16_float_linear(x: Linear) -> bool:
    """A `FloatDot` on a bf16 weight array (what `convert --to bf16` makes)."""
    return (isinstance(x.op, FloatDot) and isinstance(x.weight, jax.Array)
            and x.weight.dtype == jnp.bfloat16)


class TiledW8A8Weight(eqx.Module):
    """An `Int8Weight` in the w8a8 kernel's layout: values [d_out / TILE, padded_d_in / 4, TILE,
    4] (the four k of a column adjacent, as integer dot instructions take them; d_in
    zero-padded to a multiple of 4), scales padded to whole tiles, and each column's sum of
    values (the VNNI path offsets the activations by 128 and subtracts 128 x this sum)."""

    values: Int8[Array, "*layers tiles quads tile 4"]
    scales: Float[Array, "*layers padded_d_out"]
    col_sums: Int32[Array, "*layers padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, weight: Int8Weight):
        self.d_in, self.d_out = weight.values.shape[-2:]
        values = pad_inputs(pad_columns(weight.values), 4)
        *layers, rows, cols = values.shape
        quads = values.reshape(*layers, rows // 4, 4, cols // TILE, TILE)
        self.values = jnp.moveaxis(quads, (-4, -3, -2, -1), (-3, -1, -4, -2))
        self.scales = pad_columns(weight.scales)
        self.col_sums = jnp.sum(values.astype(jnp.int32), axis=-2)

    def plain(self) -> tuple[Int8[Array, "*layers d_in d_out"], Float[Array, "*layers d_out"]]:
        """values and scales in the plain [d_in, d_out] layout (for the XLA op)."""
        *layers, tiles, quads, tile, four = self.values.shape
        values = jnp.moveaxis(self.values, (-3, -1, -4, -2), (-4, -3, -2, -1))
        values = values.reshape(*layers, quads * four, tiles * tile)
        return values[..., :self.d_in, :self.d_out], self.scales[..., :self.d_out]


class NativeW8A8Dot(MatmulOp):
    """`W8A8Dot` on the native kernel of build `isa`: the activations are quantized per row
    exactly as `W8A8Dot` does, the int8 products summed exactly in int32 (VNNI `vpdpbusd` or
    AVX2 `vpmaddubsw`), then scaled in the op's order, so the result equals the XLA op's bit for
    bit. Every row count runs the kernel (integer dot products outpace the f32 GEMM on a
    dequantized copy even for prompts); bf16 activations take the XLA op."""

    isa: str = eqx.field(static=True, default="native")

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledW8A8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows = _rows(x)
        kernels = load(self.isa)
        x_scale = int8_scale(x, axis=-1)
        qx = quantize_int(x, x_scale, INT8_MAX)
        if x.dtype != jnp.float32 or kernels is None:  # W8A8Dot on the untiled weight
            values, scales = weight.plain()
            return int8_scaled_matmul(qx, x_scale, values, scales[None, :]).astype(x.dtype)
        qx = qx.reshape(rows, x.shape[-1])
        qx = jnp.pad(qx, ((0, 0), (0, 4 * weight.values.shape[-3] - qx.shape[1])))
        return _kernel_product(kernels.w8a8_target, qx, x.shape[:-1], weight.d_out,
                               x_scale.reshape(rows), weight.values, weight.scales,
                               weight.col_sums)


W4A8_OCT = 8  # k per byte group of the w4a8 layout; must match int8_matvec.cc


def w4a8_on_native(group_size: int) -> bool:
    """Whether w4a8 weights in groups of `group_size` (0: one per channel) run the native
    kernel: each group whole octs (8 k) of its layout. Other group sizes keep the XLA op."""
    return group_size % W4A8_OCT == 0


def int4_oct_bytes(weight: Int4Weight) -> UInt8[Array, "*layers octs 4 padded_d_out"]:
    """`weight`'s values as w4a8's oct bytes, before tiling: byte j of column c in oct o holds
    q[8o + j] + 8 in its low nibble and q[8o + 4 + j] + 8 in its high one (d_in zero-padded to
    whole octs, d_out to whole tiles)."""
    offset = pad_inputs(pad_columns(unpack_int4(weight.packed)), W4A8_OCT) + jnp.int8(8)
    *layers, rows, cols = offset.shape
    octs = offset.astype(jnp.uint8).reshape(*layers, rows // 8, 2, 4, cols)
    return octs[..., 0, :, :] | (octs[..., 1, :, :] << jnp.uint8(4))


def int4_from_oct_bytes(packed: UInt8[Array, "*layers octs 4 cols"], padded_d_in: int,
                        d_out: int) -> UInt8[Array, "*layers half_padded_d_in d_out"]:
    """The inverse of `int4_oct_bytes`: `Int4Weight`'s packed values."""
    offset = jnp.stack([packed & jnp.uint8(15), packed >> jnp.uint8(4)], axis=-3)
    *layers, octs, _, _, cols = offset.shape
    q = offset.reshape(*layers, 8 * octs, cols).astype(jnp.int8) - jnp.int8(8)
    return pack_int4(q[..., :padded_d_in, :d_out])


class TiledW4A8Weight(eqx.Module):
    """An `Int4Weight` in the w4a8 kernel's layout: packed [d_out / TILE, padded_d_in / 8, TILE,
    4] (d_in zero-padded to a multiple of 8): byte j of a column's four in oct o holds
    q[8o + j] + 8 in its low nibble and q[8o + 4 + j] + 8 in its high one, so the low nibbles
    are one quad of k and the high ones the next, as integer dot instructions take them
    (int8_matvec.cc explains why offset binary). Scales [groups, d_out] padded to whole
    tiles."""

    packed: UInt8[Array, "*layers tiles octs tile 4"]
    scales: Float[Array, "*layers groups padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)
    padded_d_in: int = eqx.field(static=True)  # the Int4Weight's (whole groups, even)

    def __init__(self, weight: Int4Weight):
        if not w4a8_on_native(weight.group_size):
            raise ValueError(f"the w4a8 kernel needs groups of a multiple of {W4A8_OCT} rows "
                             f"(or one per channel), got {weight.group_size}")
        self.d_in, self.d_out = weight.d_in, weight.packed.shape[-1]
        self.padded_d_in = 2 * weight.packed.shape[-2]
        octs = int4_oct_bytes(weight)
        *layers, n_octs, four, cols = octs.shape
        packed = octs.reshape(*layers, n_octs, four, cols // TILE, TILE)
        self.packed = jnp.moveaxis(packed, (-2, -4, -1, -3), (-4, -3, -2, -1))
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[UInt8[Array, "*layers half_padded_d_in d_out"],
                             Float[Array, "*layers groups d_out"]]:
        """`Int4Weight`'s packed values and scales (for the XLA op)."""
        packed = jnp.moveaxis(self.packed, (-4, -3, -2, -1), (-2, -4, -1, -3))
        *layers, octs, four, tiles, tile = packed.shape
        return (int4_from_oct_bytes(packed.reshape(*layers, octs, four, tiles * tile),
                                    self.padded_d_in, self.d_out),
                self.scales[..., :self.d_out])


class NativeW4A8Dot(MatmulOp):
    """`W4A8Dot` on the native kernel of build `isa`: the activations are quantized per row
    exactly as `W4A8Dot` does, each group's int4 x int8 products summed exactly in int32 (the
    w8a8 kernel's VNNI / AVX2 / portable paths), then scaled in the op's order; the groups'
    float32 terms are added in group order (the XLA op's reduction may add them in another).
    Every row count runs the kernel; bf16 activations take the XLA op."""

    isa: str = eqx.field(static=True, default="native")

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledW4A8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows = _rows(x)
        kernels = load(self.isa)
        if x.dtype != jnp.float32 or kernels is None:  # W4A8Dot on the untiled weight
            return w4a8_matmul(x, *weight.plain(), weight.d_in)
        x_scale = int8_scale(x, axis=-1)
        qx = quantize_int(x, x_scale, INT8_MAX).reshape(rows, x.shape[-1])
        qx = jnp.pad(qx, ((0, 0), (0, W4A8_OCT * weight.packed.shape[-3] - qx.shape[1])))
        return _kernel_product(kernels.w4a8_target, qx, x.shape[:-1], weight.d_out,
                               x_scale.reshape(rows), weight.packed, weight.scales)


class TiledVnniInt4Weight(eqx.Module):
    """An `Int4Weight` in the VNNI digits kernel's layout (`NativeVnniInt4Dot`): packed
    [d_out / TILE, 2, padded_d_in / 8, 64, 4], `TiledW4A8Weight`'s octs (a column's four low
    nibbles one quad of k, its four high ones the next, offset binary q + 8) with each
    128-column tile split into two 64-column halves, each a contiguous stream. d_in zero-padded
    to a multiple of 8; scales [groups, d_out] padded to whole tiles."""

    packed: UInt8[Array, "*layers tiles 2 octs 64 4"]
    scales: Float[Array, "*layers groups padded_d_out"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)
    padded_d_in: int = eqx.field(static=True)  # the Int4Weight's (whole groups, even)

    def __init__(self, weight: Int4Weight):
        if not w4a8_on_native(weight.group_size):
            raise ValueError(f"the VNNI int4 kernel needs groups of a multiple of {W4A8_OCT} "
                             f"rows (or one per channel), got {weight.group_size}")
        self.d_in, self.d_out = weight.d_in, weight.packed.shape[-1]
        self.padded_d_in = 2 * weight.packed.shape[-2]
        octs = int4_oct_bytes(weight)
        *layers, n_octs, four, cols = octs.shape
        packed = octs.reshape(*layers, n_octs, four, cols // TILE, 2, VNNI_HALF)
        self.packed = transpose_trailing(packed, TO_VNNI_HALVES)
        self.scales = pad_columns(weight.scales)

    def plain(self) -> tuple[UInt8[Array, "*layers half_padded_d_in d_out"],
                             Float[Array, "*layers groups d_out"]]:
        """`Int4Weight`'s packed values and scales (for the XLA op)."""
        packed = transpose_trailing(self.packed, FROM_VNNI_HALVES)
        *layers, octs, four, tiles, halves, half = packed.shape
        return (int4_from_oct_bytes(packed.reshape(*layers, octs, four, tiles * halves * half),
                                    self.padded_d_in, self.d_out),
                self.scales[..., :self.d_out])


class NativeVnniInt4Dot(MatmulOp):
    """`Int4WeightOnlyDot` on the digits kernels (build `isa`, where `Kernels.int4_digits`),
    every row count: the f32 activations as three int8 digits of a per-row scale (as
    `NativeVnniInt8Dot`), each group's products exact int32 sums of `vpdpbusd` (AVX2:
    `vpmaddubsw` + `vpmaddwd`, or 256-bit `vpdpbusd` with AVX-VNNI; from 5 rows, the FMA
    routes on the weights dequantized from this layout), scaled per group in f32. From
    `prefill_rows` rows up (None: never), for bf16 activations, where the build has no digits
    route, or for a d_in above `VNNI_MAX_K`, the XLA op on the untiled weight runs."""

    isa: str = eqx.field(static=True, default="native")
    prefill_rows: int | None = eqx.field(static=True, default=PREFILL_ROWS)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledVnniInt4Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows, d_in = _rows(x), x.shape[-1]
        k_pad = W4A8_OCT * weight.packed.shape[-3]  # the kernel's d_in, whole octs
        kernels = load(self.isa)
        if (x.dtype != jnp.float32 or _xla_route(rows, self.prefill_rows) or kernels is None
                or not kernels.int4_digits or k_pad > VNNI_MAX_K):
            return int4_weight_only_matmul(x, *weight.plain(), weight.d_in)
        x2 = x.reshape(rows, d_in)
        x2 = jnp.pad(x2, ((0, 0), (0, k_pad - d_in)))
        return _kernel_product(kernels.vnni_int4_target, x2, x.shape[:-1], weight.d_out,
                               weight.packed, weight.scales)


class NativeDecodeAttention(DecodeAttention):
    """The attention over the cache (a decode step's token, or each token of a prefill) on the
    native kernel of build `isa`: reads the cache in place as it is stored (float32, bfloat16,
    or int8 with its scales; XLA makes a float32 copy in another layout first) and only the
    slots each query's mask shows (XLA's einsums attend over every slot). Same arithmetic as
    `Attention._attend` on `cache.read(float32)`, summed in another order (an int8 slot's scale
    multiplies its score and its value weight instead of its entries), with a vector exp within
    1 ulp of libm's on the SIMD paths."""

    isa: str = eqx.field(static=True, default="native")

    def reads(self, cache: KVCache) -> bool:
        return cache.dtype in (jnp.float32, jnp.bfloat16, jnp.int8)

    def __call__(self, q: Float[Array, "batch seq heads head_dim"], cache: KVCache,
                 mask: Bool[Array, "batch seq max_len"]
                 ) -> Float[Array, "batch seq heads head_dim"]:
        kernels = load(self.isa)
        assert kernels is not None, "use_native_kernels sets this only where the kernels load"
        out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
        if cache.quantized:
            call = jax.ffi.ffi_call(kernels.attention_int8_target, out)
            return call(q, cache.k, cache.k_scale, cache.v, cache.v_scale, mask)
        target = (kernels.attention_bf16_target if cache.dtype == jnp.bfloat16
                  else kernels.attention_target)
        return jax.ffi.ffi_call(target, out)(q, cache.k, cache.v, mask)


def use_native_kernels(model: eqx.Module, isa: str | None = None,
                       prefill_rows: int | None = PREFILL_ROWS, attention: bool = True
                       ) -> eqx.Module:
    """`model` with every int8 / int4 weight-only op, w8a8 op and `FloatDot` on a bf16 weight
    swapped for its native twin (build `isa`, default `HPLLM_KERNEL_ISA`; int8 weight-only on
    the AMX tile unit where that build has it) and its weight retiled for it, and
    (`attention`) the attention over the cache (decode steps and prefills) on the native
    kernel, if that build is available. bf16 weights of a model that computes in bfloat16 stay
    as they are: the kernel takes f32 activations, and the XLA op would then untile the weight
    per call.
    Works in either layer layout: `lax.scan` hands the ops of stacked blocks one layer's tiles,
    as the unstacked blocks hold them."""
    isa = isa or default_isa()
    built = load(isa)
    if built is None:
        return model
    float_activations = (not isinstance(model, Transformer)
                         or model.compute_dtype == jnp.float32)
    # int8 and int4 weights on the VNNI digits routes (AMX, where the build has it, comes first).
    digits_on_vnni = built.avx512_vnni and not built.amx and DIGITS_ON_VNNI
    int4_digits = built.int4_digits and not built.amx and DIGITS_ON_VNNI

    def swap(x):
        if isinstance(x, Linear) and isinstance(x.op, Int8WeightOnlyDot) and built.amx:
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledAmxInt8Weight(x.weight), NativeAmxInt8Dot(isa, prefill_rows)))
        if isinstance(x, Linear) and isinstance(x.op, Int8WeightOnlyDot) and digits_on_vnni:
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledVnniInt8Weight(x.weight),
                                NativeVnniInt8Dot(isa, prefill_rows)))
        if isinstance(x, Linear) and isinstance(x.op, Int8WeightOnlyDot):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledInt8Weight(x.weight), NativeInt8Dot(isa, prefill_rows)))
        if isinstance(x, Linear) and isinstance(x.op, W8A8Dot):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledW8A8Weight(x.weight), NativeW8A8Dot(isa)))
        if (isinstance(x, Linear) and isinstance(x.op, W4A8Dot)
                and w4a8_on_native(x.weight.group_size)):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledW4A8Weight(x.weight), NativeW4A8Dot(isa)))
        if (isinstance(x, Linear) and isinstance(x.op, Int4WeightOnlyDot) and int4_digits
                and w4a8_on_native(x.weight.group_size)):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledVnniInt4Weight(x.weight),
                                NativeVnniInt4Dot(isa, prefill_rows)))
        if isinstance(x, Linear) and isinstance(x.op, Int4WeightOnlyDot):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledInt4Weight(x.weight), NativeInt4Dot(isa, prefill_rows)))
        if float_activations and isinstance(x, Linear) and _is_bf16_float_linear(x):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledBf16Weight(x.weight), NativeBf16Dot(isa, prefill_rows)))
        return x

    model = jax.tree.map(swap, model, is_leaf=lambda x: isinstance(x, Linear))
    if not attention:
        return model

    def native_attention(x):
        if isinstance(x, Attention):
            return eqx.tree_at(lambda attn: attn.decode_attention, x, NativeDecodeAttention(isa),
                               is_leaf=lambda node: node is None)
        return x

    return jax.tree.map(native_attention, model, is_leaf=lambda x: isinstance(x, Attention))
