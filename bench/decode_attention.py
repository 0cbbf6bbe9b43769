"""Attention of one decode step over a `base`-shaped KV cache, alone: XLA's einsums against the
native kernel (`infer.kernels.NativeDecodeAttention`).

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_attention.py [--position 160] \
        [--kv-cache-dtype bf16]

    git show 43a9113:infer/kernels/int8_matvec.cc > /tmp/old_kernels.cc
    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_attention.py \
        --baseline-source /tmp/old_kernels.cc

`--baseline-source` adds another kernel source's decode attention (built with the same flags
as the kernel under test, run on the f32 copy of the cache) as one more variant, alternated
with the others: before/after in one process. `HPLLM_KERNEL_ISA` picks the build of both (e.g.
`avx2` for the AVX2 path).

12 layers x 12 heads of 64, a 256-slot cache per layer stored as `--kv-cache-dtype` (f32, bf16,
or int8 with one scale per slot and head, as `hpllm.kvcache.KVCache` holds it), every row at
`--position` (the mask shows slots 0..position); 8 steps per jitted `fori_loop`, each layer's
output fed into the next query. XLA attends over `cache.read(float32)` (the model's XLA path);
for a bf16 or int8 cache "native f32 copy" is the kernel on that copy too (what the model ran
before the kernel read those caches in place), "native" the kernel on the cache as stored. The
variants alternate, medians of 5 rounds. The GB/s column counts the stored bytes of the filled
part of K and V (and their scales), which is what the native kernel reads; the f32-copy variants
read and write more. The last column is the largest absolute difference from XLA's output on
the first layer.
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp

from hpllm.kvcache import CACHE_DTYPE_ALIASES, KVCache
from infer import kernels
from infer.kernels import NativeDecodeAttention

HEADS, KV_HEADS, HEAD_DIM, SLOTS, LAYERS, STEPS = 12, 12, 64, 256, 12, 8


def xla_attention(q, k, v, mask):
    """`Attention._attend` before the output projection, for one query token."""
    b = q.shape[0]
    q = q.reshape(b, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    scores = jnp.einsum("bkgd,btkd->bkgt", q, k) / jnp.sqrt(jnp.float32(HEAD_DIM))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgt,btkd->bkgd", weights, v).reshape(b, HEADS, HEAD_DIM)


def baseline_attention(source: str, isa: str):
    """The decode attention of another copy of the kernel source, built as the `isa` build
    is and registered under its own target name."""
    library = os.path.join(tempfile.mkdtemp(prefix="hpllm-baseline-"), "baseline.so")
    subprocess.run(["g++", *kernels.COMMON_FLAGS, *kernels.ISA_FLAGS[isa],
                    f"-I{jax.ffi.include_dir()}", source, "-o", library], check=True)
    target = "hpllm_decode_attention_baseline"
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(library).HpllmDecodeAttention),
        platform="cpu")

    def attend(q, cache, mask):
        k, v = cache.read(jnp.dtype(jnp.float32))
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(q, k, v, mask)
    return attend


def on_float32_copy(attend):
    """`attend` over an f32 copy of the cache, as `Attention.decode` reads it for XLA."""
    def attend_copy(q, cache, mask):
        k, v = cache.read(jnp.dtype(jnp.float32))
        return attend(q, KVCache(k, v, None, None), mask)
    return attend_copy


def one_query_per_row(attend):
    """`attend`, which takes q[batch, seq, heads, head_dim] and mask[batch, seq, slots], on one
    decode step's q[batch, heads, head_dim] and mask[batch, slots]."""
    def attend_one(q, cache, mask):
        return attend(q[:, None], cache, mask[:, None])[:, 0]
    return attend_one


def xla_on_cache(q, cache, mask):
    return xla_attention(q, *cache.read(jnp.dtype(jnp.float32)), mask)


def filled_cache(key, batch: int, dtype: str) -> KVCache:
    """One layer's cache with random keys and values in every slot, stored as `dtype`."""
    shape = (batch, SLOTS, KV_HEADS, HEAD_DIM)
    k, v = (jax.random.normal(jax.random.fold_in(key, i), shape) for i in (0, 1))
    return KVCache.empty(shape, dtype).write(
        k, v, jnp.broadcast_to(jnp.arange(SLOTS, dtype=jnp.int32), (batch, SLOTS)))


def chain(attend, mask):
    @jax.jit
    def run(q, caches):
        def step(_, q):
            for cache in caches:
                q = q + attend(q, cache, mask) * 1e-3
            return q
        return jax.lax.fori_loop(0, STEPS, step, q)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--position", type=int, default=160)
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="f32")
    parser.add_argument("--baseline-source", metavar="FILE",
                        help="another int8_matvec.cc whose decode attention runs as one more "
                             "variant")
    args = parser.parse_args()
    dtype = CACHE_DTYPE_ALIASES[args.kv_cache_dtype]
    isa = kernels.default_isa()
    baseline = baseline_attention(args.baseline_source, isa) if args.baseline_source else None
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}, kernel build {isa}, "
          f"{dtype} cache")
    print("| batch | attention | ms per step (12 layers) | filled K+V MB (stored) | GB/s "
          "| max diff vs XLA |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        key = jax.random.key(batch)
        caches = [filled_cache(jax.random.fold_in(key, 1 + i), batch, dtype)
                  for i in range(LAYERS)]
        mask = jnp.broadcast_to(jnp.arange(SLOTS)[None, :] <= args.position, (batch, SLOTS))
        q = jax.random.normal(key, (batch, HEADS, HEAD_DIM))
        native = one_query_per_row(NativeDecodeAttention(isa))
        attends = {"XLA": xla_on_cache, "native": native}
        if dtype != "float32":
            attends["native f32 copy"] = on_float32_copy(native)
        if baseline is not None:
            attends["baseline"] = baseline
        # One layer's output of each against XLA's: the largest absolute difference.
        reference = jax.jit(xla_on_cache)(q, caches[0], mask)
        diffs = {name: float(jnp.abs(jax.jit(attend)(q, caches[0], mask) - reference).max())
                 for name, attend in attends.items()}
        runs = {name: chain(attend, mask) for name, attend in attends.items()}
        for run in runs.values():
            run(q, caches).block_until_ready()  # compile
        times = {name: [] for name in runs}
        for _ in range(5):
            for name, run in runs.items():
                start = time.perf_counter()
                run(q, caches).block_until_ready()
                times[name].append((time.perf_counter() - start) / STEPS)
        # Bytes per (slot, kv-head): K and V entries, plus their two f32 scales for int8.
        per_head = 2 * HEAD_DIM * jnp.dtype(dtype).itemsize + (8 if dtype == "int8" else 0)
        filled = batch * (args.position + 1) * KV_HEADS * per_head * LAYERS
        for name in runs:
            seconds = statistics.median(times[name])
            print(f"| {batch} | {name} | {seconds * 1e3:.2f} | {filled / 1e6:.1f} | "
                  f"{filled / seconds / 1e9:.1f} | {diffs[name]:.1e} |")


if __name__ == "__main__":
    main()
