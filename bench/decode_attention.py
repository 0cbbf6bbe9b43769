"""Attention of one decode step over a `base`-shaped KV cache, alone: XLA's einsums against the
native kernel (`infer.kernels.NativeDecodeAttention`).

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_attention.py [--position 160]

    git show 43a9113:infer/kernels/int8_matvec.cc > /tmp/old_kernels.cc
    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_attention.py \
        --baseline-source /tmp/old_kernels.cc

`--baseline-source` adds another kernel source's decode attention (built with the same flags
as the kernel under test) as a third variant, alternated with the others: before/after in one
process. `HPLLM_KERNEL_ISA` picks the build of both (e.g. `avx2` for the AVX2 path).

12 layers x 12 heads of 64, a 256-slot float32 cache per layer, every row at `--position` (the
mask shows slots 0..position); 8 steps per jitted `fori_loop`, each layer's output fed into
the next query. The variants alternate, medians of 5 rounds. The GB/s column counts the
filled part of K and V only (what the native kernel reads; XLA reads and copies all of it);
the last column is the largest absolute difference from XLA's output on the first layer.
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

    def attend(q, k, v, mask):
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(q, k, v, mask)
    return attend


def chain(attend, mask):
    @jax.jit
    def run(q, ks, vs):
        def step(_, q):
            for k, v in zip(ks, vs, strict=True):
                q = q + attend(q, k, v, mask) * 1e-3
            return q
        return jax.lax.fori_loop(0, STEPS, step, q)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--position", type=int, default=160)
    parser.add_argument("--baseline-source", metavar="FILE",
                        help="another int8_matvec.cc whose decode attention runs as a third "
                             "variant")
    args = parser.parse_args()
    isa = kernels.default_isa()
    baseline = baseline_attention(args.baseline_source, isa) if args.baseline_source else None
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}, kernel build {isa}")
    print("| batch | attention | ms per step (12 layers) | filled K+V MB | GB/s "
          "| max diff vs XLA |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        key = jax.random.key(batch)
        shape = (batch, SLOTS, KV_HEADS, HEAD_DIM)
        ks = [jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(LAYERS)]
        vs = [jax.random.normal(jax.random.fold_in(key, 100 + i), shape) for i in range(LAYERS)]
        mask = jnp.broadcast_to(jnp.arange(SLOTS)[None, :] <= args.position, (batch, SLOTS))
        q = jax.random.normal(key, (batch, HEADS, HEAD_DIM))
        attends = {"XLA": xla_attention, "native": NativeDecodeAttention(isa)}
        if baseline is not None:
            attends["baseline"] = baseline
        # One layer's output of each against XLA's: the largest absolute difference.
        reference = jax.jit(xla_attention)(q, ks[0], vs[0], mask)
        diffs = {name: float(jnp.abs(jax.jit(attend)(q, ks[0], vs[0], mask) - reference).max())
                 for name, attend in attends.items()}
        runs = {name: chain(attend, mask) for name, attend in attends.items()}
        for run in runs.values():
            run(q, ks, vs).block_until_ready()  # compile
        times = {name: [] for name in runs}
        for _ in range(5):
            for name, run in runs.items():
                start = time.perf_counter()
                run(q, ks, vs).block_until_ready()
                times[name].append((time.perf_counter() - start) / STEPS)
        filled = 2 * batch * (args.position + 1) * KV_HEADS * HEAD_DIM * 4 * LAYERS
        for name in runs:
            seconds = statistics.median(times[name])
            print(f"| {batch} | {name} | {seconds * 1e3:.2f} | {filled / 1e6:.1f} | "
                  f"{filled / seconds / 1e9:.1f} | {diffs[name]:.1e} |")


if __name__ == "__main__":
    main()
