"""The matmuls of one `base` decode step, alone: which weight format and which op reads fastest.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_matmuls.py [--rows 1,16]
        [--formats "int8 native,w8a8 native"] [--repeats 7]

One decode step of `base` at batch 1 runs 85 matrix-vector products: per layer q, k, v, o
(768 x 768), gate and up (768 x 2048), down (2048 x 768), and the 768 x 32000 LM head. This
times exactly that chain (each product feeds the next, as in the model, so nothing runs in
parallel that would not), 32 steps per jitted `fori_loop`, through the `Linear`s of a random
`base` model in the layer layout decoding uses (`Transformer.unstacked()`), with its weights
converted as `python -m infer convert --quantize-head` does:

- f32 weights, XLA dot (the float baseline of `python -m infer bench`);
- bf16 weights, `FloatDot` (XLA: convert to f32, then f32 dot);
- int8 / int4 (group 128) weights, the XLA weight-only ops (`Int8WeightOnlyDot`: convert,
  then f32 dot; `Int4WeightOnlyDot`: unpack, then f32 dot);
- bf16, int8 and int4 weights on the native kernels of `infer.kernels` (`use_native_kernels`:
  tiled layout; int8 in the AMX tile unit's layout where the native build has AMX), and int8
  weights with int8 activations (w8a8) on its integer kernel;
- int8 and int4 weights on the forced `avx512` build (`... native avx512`): on a CPU with AMX,
  the FMA routes beside the `native` build's AMX routes (int8: every row count; int4: 5 rows
  and up) in the same rounds.

It prints ms per step, the weight bytes a step reads and the GB/s that makes, against the
machine's copy bandwidth measured as `python -m infer bench` does. Formats are timed
round-robin, medians of `--repeats` rounds, so a load change on the shared machine hits every
row alike. The rest of a real decode step (attention over the cache, norms, sampling) is what
`python -m infer bench` adds on top.
"""

import argparse
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from hpllm.linear import Linear
from hpllm.model import Transformer
from hpllm.quant import WITH_HEAD
from infer.bench import measure_bandwidth
from infer.kernels import available, use_native_kernels
from infer.loading import quantize, random_model

STEPS = 32


def matmul_weight_bytes(model: Transformer) -> int:
    """Bytes of every `Linear`'s weight (values and scales): what the chain reads."""
    linears = [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, Linear))
               if isinstance(x, Linear)]
    return sum(leaf.nbytes for linear in linears for leaf in jax.tree.leaves(linear.weight))


def step_chain(model: Transformer, x: jax.Array) -> jax.Array:
    """One decode step's matmuls: the attention and MLP products of every layer, then the
    head. Cheap elementwise glue keeps each product dependent on the previous ones (q, k and
    v are summed: `base` has as many key/value heads as query heads, so they have one shape)."""
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attended = attn.wq(x) + attn.wk(x) + attn.wv(x)
        h = x + attn.wo(attended)
        x = h + mlp.w_down(jax.nn.silu(mlp.w_gate(h)) * mlp.w_up(h)) * 1e-3
    return model.lm_head(x)


# name -> (the `base` model -> the model with its weights in that format, each `Linear` with
# the op that multiplies by them)
FORMATS = {
    "f32 XLA": lambda model: model,
    "bf16 XLA": lambda model: quantize(model, "bf16", targets=WITH_HEAD),
    "int8 XLA": lambda model: quantize(model, "int8", targets=WITH_HEAD),
    "int4 XLA": lambda model: quantize(model, "int4", 128, WITH_HEAD),
    "bf16 native": lambda model: use_native_kernels(quantize(model, "bf16", targets=WITH_HEAD)),
    "int8 native": lambda model: use_native_kernels(quantize(model, "int8", targets=WITH_HEAD)),
    "int4 native": lambda model: use_native_kernels(quantize(model, "int4", 128, WITH_HEAD)),
    "w8a8 native": lambda model: use_native_kernels(quantize(model, "w8a8", targets=WITH_HEAD)),
    # The forced avx512 build: the FMA routes only, so on an AMX CPU the batched products' two
    # routes can be timed in the same rounds.
    "int8 native avx512": lambda model: use_native_kernels(
        quantize(model, "int8", targets=WITH_HEAD), "avx512"),
    "int4 native avx512": lambda model: use_native_kernels(
        quantize(model, "int4", 128, WITH_HEAD), "avx512"),
}


@eqx.filter_jit
def steps(model: Transformer, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    return jax.lax.fori_loop(
        0, STEPS, lambda i, x: x + step_chain(model, x)[:, :d_model] * 1e-6, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1",
                        help="activation rows (batch sizes), comma-separated, e.g. 1,16")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated, from: {', '.join(FORMATS)}")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    row_counts = [int(rows) for rows in args.rows.split(",")]
    kinds = [kind for kind in args.formats.split(",")
             if "native" not in kind or available("avx512" if "avx512" in kind else None)]
    model = random_model("base")
    runs = {}
    for kind in kinds:
        # Quantized from the stacked model (as `infer convert` does), then split into layers.
        formatted = FORMATS[kind](model.stacked()).unstacked()
        for rows in row_counts:
            x = jnp.ones((rows, model.cfg.d_model), jnp.float32)
            steps(formatted, x).block_until_ready()  # compile
            runs[kind, rows] = (formatted, x, matmul_weight_bytes(formatted))
    times = {run: [] for run in runs}
    for _ in range(args.repeats):
        for run, (formatted, x, _) in runs.items():
            start = time.perf_counter()
            steps(formatted, x).block_until_ready()
            times[run].append((time.perf_counter() - start) / STEPS)
    bandwidth = measure_bandwidth()
    print(f"{args.repeats} rounds, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| weights, op | rows | ms/step | rows/s vs 1 row | MB/step | GB/s | % of copy BW |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in runs:
        seconds = statistics.median(times[kind, rows])
        one_row = statistics.median(times[kind, 1]) if (kind, 1) in runs else None
        speedup = f"{rows * one_row / seconds:.2f}x" if one_row else ""
        n_bytes = runs[kind, rows][2]
        print(f"| {kind} | {rows} | {seconds * 1e3:.2f} | {speedup} | {n_bytes / 1e6:.0f} | "
              f"{n_bytes / seconds / 1e9:.1f} | {100 * n_bytes / seconds / bandwidth:.0f}% |")


if __name__ == "__main__":
    main()
