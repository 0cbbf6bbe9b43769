"""The matmuls of one `base` decode step, alone: which weight format and which op reads fastest.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_matmuls.py [--rows 1] [--repeats 7]

One decode step of `base` at batch 1 runs 85 matrix-vector products: per layer q, k, v, o
(768 x 768), gate and up (768 x 2048), down (2048 x 768), and the 768 x 32000 LM head. This
times exactly that chain (each product feeds the next, as in the model, so nothing runs in
parallel that would not), 32 steps per jitted `fori_loop`, for:

- f32 weights, XLA dot (the float baseline of `python -m infer bench`);
- int8 weights, the XLA weight-only op (`Int8WeightOnlyDot`: convert, then f32 dot);
- int8 and int4 (group 128) weights on the native kernels of `infer.kernels` (tiled layout).

It prints ms per step, the weight bytes a step reads and the GB/s that makes, against the
machine's copy bandwidth measured as `python -m infer bench` does. Formats are timed
round-robin, medians of `--repeats` rounds, so a load change on the shared machine hits every
row alike. The rest of a real decode step (attention over the cache, norms, sampling) is what
`python -m infer bench` adds on top.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from hpllm.quant.weight_only import Int4Weight, Int4WeightOnlyDot, Int8Weight, Int8WeightOnlyDot
from infer.bench import measure_bandwidth
from infer.kernels import NativeInt4Dot, NativeInt8Dot, TiledInt4Weight, TiledInt8Weight, available

D_MODEL, D_FF, VOCAB, LAYERS = 768, 2048, 32000, 12
LAYER_SHAPES = [(D_MODEL, D_MODEL)] * 4 + [(D_MODEL, D_FF)] * 2 + [(D_FF, D_MODEL)]
STEPS = 32


def weights_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def step_chain(op, weights):
    """One decode step's matmuls: the attention and MLP products of every layer, then the
    head. Cheap elementwise glue keeps each product dependent on the previous ones."""

    def step(x):
        for layer in range(LAYERS):
            q, k, v, o, gate, up, down = weights[7 * layer:7 * layer + 7]
            attended = op(x, q) + op(x, k) + op(x, v)
            h = x + op(attended, o)
            x = h + op(jax.nn.silu(op(h, gate)) * op(h, up), down) * 1e-3
        return op(x, weights[-1])

    return step


# name -> (float weight -> the format's weight, the op that multiplies by it)
FORMATS = {
    "f32 XLA": (lambda w: w, lambda x, w: x @ w),
    "int8 XLA": (Int8Weight, Int8WeightOnlyDot()),
    "int4 XLA": (lambda w: Int4Weight(w, 128), Int4WeightOnlyDot()),
    "int8 native": (lambda w: TiledInt8Weight(Int8Weight(w)), NativeInt8Dot()),
    "int4 native": (lambda w: TiledInt4Weight(Int4Weight(w, 128)), NativeInt4Dot()),
}


def make_weights(kind: str) -> list:
    """The 85 weights of one step (random, fan-in scaled) in format `kind`."""
    shapes = [shape for _ in range(LAYERS) for shape in LAYER_SHAPES] + [(D_MODEL, VOCAB)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    convert = FORMATS[kind][0]
    return [convert(jax.random.normal(key, shape, jnp.float32) / shape[0] ** 0.5)
            for key, shape in zip(keys, shapes, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="activation rows (batch size)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    kinds = [kind for kind in FORMATS if "native" not in kind or available()]
    runs = {}
    for kind in kinds:
        weights = make_weights(kind)
        step = step_chain(FORMATS[kind][1], weights)

        @jax.jit
        def steps(x, step=step):
            return jax.lax.fori_loop(0, STEPS, lambda i, x: x + step(x)[:, :D_MODEL] * 1e-6, x)

        x = jnp.ones((args.rows, D_MODEL), jnp.float32)
        steps(x).block_until_ready()  # compile
        runs[kind] = (steps, x, weights_bytes(weights))
    times = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind, (steps, x, _) in runs.items():
            start = time.perf_counter()
            steps(x).block_until_ready()
            times[kind].append((time.perf_counter() - start) / STEPS)
    bandwidth = measure_bandwidth()
    print(f"rows {args.rows}, {args.repeats} rounds, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| weights, op | ms/step | MB/step | GB/s | % of copy bandwidth |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        seconds = statistics.median(times[kind])
        n_bytes = runs[kind][2]
        print(f"| {kind} | {seconds * 1e3:.2f} | {n_bytes / 1e6:.0f} | "
              f"{n_bytes / seconds / 1e9:.1f} | {100 * n_bytes / seconds / bandwidth:.0f}% |")


if __name__ == "__main__":
    main()
