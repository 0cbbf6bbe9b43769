"""Native int8 / int4 weight-only matmul kernels for CPU inference, called through `jax.ffi`.

Why: XLA's CPU backend never fuses a dtype conversion into a dot. `x @ w_int8.astype(f32)`
becomes a full f32 copy of the weight followed by an f32 dot, so int8 (and bf16) weights decode
no faster than f32 ones (docs/performance.md has the figures). `int8_matvec.cc` reads each
quantized weight once and widens it in registers. It wants the weights in 128-column tiles
(`TiledInt8Weight`, `TiledInt4Weight`: one contiguous stream per tile), made once at load
time by `use_native_kernels`; checkpoints keep the plain `[d_in, d_out]` layout.

The kernel is compiled on first use with the system C++ compiler (`-O3 -march=native`)
into a cache folder (`$HPLLM_CACHE` or `~/.cache/hpllm`), keyed by a hash of the source, the
flags and the JAX version. Without a compiler, or with `HPLLM_NATIVE_KERNELS=0`, nothing
changes: `use_native_kernels` returns the model as is and the pure-XLA ops run.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, Shaped, UInt8

from hpllm.linear import Linear, MatmulOp
from hpllm.quant.weight_only import (
    Int4Weight,
    Int4WeightOnlyDot,
    Int8Weight,
    Int8WeightOnlyDot,
    int4_weight_only_matmul,
    int8_weight_only_matmul,
)

SOURCE = Path(__file__).with_name("int8_matvec.cc")
TARGET = "hpllm_int8_matvec"
INT4_TARGET = "hpllm_int4_matvec"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")

_state: dict[str, object] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("HPLLM_CACHE", Path.home() / ".cache" / "hpllm"))


def _build() -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OSError("no C++ compiler (g++) found")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + jax.__version__.encode())
    library = _cache_dir() / f"int8_matvec-{digest.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = library.with_name(f".{library.name}.{uuid.uuid4().hex[:8]}")
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[:500]}")
    os.replace(tmp, library)  # atomic: parallel first uses never load half a file
    return library


def available() -> bool:
    """Whether the kernel is compiled and registered (building it on the first call)."""
    if "ok" not in _state:
        _state["ok"] = False
        if os.environ.get("HPLLM_NATIVE_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
            _state["why"] = "disabled" if jax.default_backend() == "cpu" else "not on CPU"
            return False
        try:
            library = ctypes.cdll.LoadLibrary(str(_build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.HpllmInt8Matvec),
                                        platform="cpu")
            jax.ffi.register_ffi_target(INT4_TARGET,
                                        jax.ffi.pycapsule(library.HpllmInt4Matvec),
                                        platform="cpu")
            _state["ok"] = True
        except OSError as error:
            _state["why"] = str(error)
            print(f"note: native int8/int4 kernels unavailable ({error}); using the XLA ops",
                  file=sys.stderr)
    return bool(_state["ok"])


TILE = 128  # output columns per tile; must equal kTile in int8_matvec.cc
OFFSET_BINARY = jnp.uint8(0x88)  # flips the sign bit of both nibbles: q -> q + 8


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


class NativeInt8Dot(MatmulOp):
    """`Int8WeightOnlyDot` on the native kernel (any number of activation rows: the kernel
    reuses each weight tile across rows, so prefill reads the weights once too). bf16
    activations take the XLA op."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledInt8Weight
                 ) -> Float[Array, "*batch d_out"]:
        if x.dtype != jnp.float32:
            return int8_weight_only_matmul(x, *weight.plain())
        rows, d_in = _rows(x), x.shape[-1]
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, weight.d_out), jnp.float32))
        y = call(x.reshape(rows, d_in), weight.values, weight.scales)
        return y.reshape(x.shape[:-1] + (weight.d_out,))


class NativeInt4Dot(MatmulOp):
    """`Int4WeightOnlyDot` on the native kernel: the packed nibbles are unpacked in registers
    and each group's partial sum is scaled once."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: TiledInt4Weight
                 ) -> Float[Array, "*batch d_out"]:
        if x.dtype != jnp.float32:
            return int4_weight_only_matmul(x, *weight.plain(), weight.d_in)
        rows, half_rows = _rows(x), weight.packed.shape[-2]
        x2 = x.reshape(rows, x.shape[-1])
        # Zero activations for the zero padding rows of the last group.
        x2 = jnp.pad(x2, ((0, 0), (0, 2 * half_rows - x2.shape[1])))
        call = jax.ffi.ffi_call(INT4_TARGET,
                                jax.ShapeDtypeStruct((rows, weight.d_out), jnp.float32))
        return call(x2, weight.packed, weight.scales).reshape(x.shape[:-1] + (weight.d_out,))


def use_native_kernels(model: eqx.Module) -> eqx.Module:
    """`model` with every int8 / int4 weight-only op swapped for its native twin and its weight
    retiled for it (if the kernels are available). Works in either layer layout: `lax.scan`
    hands the ops of stacked blocks one layer's tiles, as the unstacked blocks hold them."""
    if not available():
        return model

    def swap(x):
        if isinstance(x, Linear) and isinstance(x.op, Int8WeightOnlyDot):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledInt8Weight(x.weight), NativeInt8Dot()))
        if isinstance(x, Linear) and isinstance(x.op, Int4WeightOnlyDot):
            return eqx.tree_at(lambda lin: (lin.weight, lin.op), x,
                               (TiledInt4Weight(x.weight), NativeInt4Dot()))
        return x

    return jax.tree.map(swap, model, is_leaf=lambda x: isinstance(x, Linear))
