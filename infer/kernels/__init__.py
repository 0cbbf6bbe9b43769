"""A native int8 matrix-vector kernel for CPU decoding, called through `jax.ffi`.

Why: XLA's CPU backend never fuses a dtype conversion into a dot. `x @ w_int8.astype(f32)`
becomes a full f32 copy of the weight followed by an f32 dot, so int8 (and bf16) weights decode
*slower* than f32 ones (docs/performance.md has the figures). `int8_matvec.cc` reads each int8
weight once and widens it in registers.

The kernel is compiled on first use with the system C++ compiler (`-O3 -march=native -fopenmp`)
into a cache folder (`$HPLLM_CACHE` or `~/.cache/hpllm`), keyed by a hash of the source, the
flags and the JAX version. Without a compiler, or with `HPLLM_NATIVE_KERNELS=0`, nothing
changes: `native_int8_ops` returns the model as is and the pure-XLA op runs.
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
from jaxtyping import Array, Float

from hpllm.linear import Linear, MatmulOp
from hpllm.quant.weight_only import (
    Int4Weight,
    Int4WeightOnlyDot,
    Int8Weight,
    Int8WeightOnlyDot,
)

SOURCE = Path(__file__).with_name("int8_matvec.cc")
TARGET = "hpllm_int8_matvec"
INT4_TARGET = "hpllm_int4_matvec"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")
# Above this many activation rows (prefill), compute is the limit and XLA's f32 GEMM wins.
MAX_ROWS = 16

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
            print(f"note: native int8 kernel unavailable ({error}); using the XLA op",
                  file=sys.stderr)
    return bool(_state["ok"])


class NativeInt8Dot(MatmulOp):
    """`Int8WeightOnlyDot` that runs the native kernel when there are few activation rows
    (decoding); prefill-sized inputs and bf16 activations take the XLA op."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int8Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows = x.size // x.shape[-1]
        if x.dtype != jnp.float32 or rows > MAX_ROWS or weight.values.ndim != 2:
            return Int8WeightOnlyDot()(x, weight)
        d_in, d_out = weight.values.shape
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, d_out), jnp.float32))
        y = call(x.reshape(rows, d_in), weight.values, weight.scales)
        return y.reshape(x.shape[:-1] + (d_out,))


class NativeInt4Dot(MatmulOp):
    """`Int4WeightOnlyDot` on the native kernel for few activation rows: the packed nibbles are
    unpacked in registers and each group's partial sum is scaled once."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int4Weight
                 ) -> Float[Array, "*batch d_out"]:
        rows = x.size // x.shape[-1]
        if x.dtype != jnp.float32 or rows > MAX_ROWS or weight.packed.ndim != 2:
            return Int4WeightOnlyDot()(x, weight)
        half_rows, d_out = weight.packed.shape
        x2 = x.reshape(rows, x.shape[-1])
        # Zero activations for the zero padding rows of the last group.
        x2 = jnp.pad(x2, ((0, 0), (0, 2 * half_rows - x2.shape[1])))
        call = jax.ffi.ffi_call(INT4_TARGET, jax.ShapeDtypeStruct((rows, d_out), jnp.float32))
        return call(x2, weight.packed, weight.scales).reshape(x.shape[:-1] + (d_out,))


def native_int8_ops(model: eqx.Module) -> eqx.Module:
    """`model` with every int8 / int4 weight-only op swapped for its native twin (if the kernel
    is available)."""
    if not available():
        return model

    def swap(x):
        if isinstance(x, Linear) and isinstance(x.op, Int8WeightOnlyDot):
            return eqx.tree_at(lambda lin: lin.op, x, NativeInt8Dot())
        if isinstance(x, Linear) and isinstance(x.op, Int4WeightOnlyDot):
            return eqx.tree_at(lambda lin: lin.op, x, NativeInt4Dot())
        return x

    return jax.tree.map(swap, model, is_leaf=lambda x: isinstance(x, Linear))
