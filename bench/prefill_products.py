"""Single quantized products of `base` at prefill row counts, on the native kernels.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/prefill_products.py \
        [--to int8] [--rows 64,1024]

Times the jitted `Linear` of the first layer's q (768 x 768), up (768 x 2048) and down
(2048 x 768) projections of a random `base` model, weights in `--to` as `python -m infer
convert` makes them and on the native kernels (`use_native_kernels`: the AMX routes where the
build has them), for activations of each `--rows` count: the median of 7 calls, and the
GFLOP/s that makes. To compare two commits, run it from a worktree of each with
`PYTHONPATH=src:.`, alternated.
"""

import argparse
import statistics
import time

import jax

from hpllm.quant import WITH_HEAD
from infer.kernels import use_native_kernels
from infer.loading import quantize, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", default="int8", help="weight format (int8, int4, w8a8)")
    parser.add_argument("--rows", default="64,1024")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = quantize(random_model("base").stacked(), args.to, 128, WITH_HEAD)
    block = use_native_kernels(model.unstacked()).blocks[0]
    cfg = model.cfg
    products = {"q": (block.attn.wq, cfg.d_model, cfg.d_model),
                "up": (block.mlp.w_up, cfg.d_model, cfg.d_ff),
                "down": (block.mlp.w_down, cfg.d_ff, cfg.d_model)}
    for rows in (int(r) for r in args.rows.split(",")):
        cells = []
        for name, (linear, d_in, d_out) in products.items():
            x = jax.random.normal(jax.random.key(0), (rows, d_in))
            product = jax.jit(lambda x, linear=linear: linear(x))
            product(x).block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                product(x).block_until_ready()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            cells.append(f"{name} {d_in}x{d_out} {1e3 * median:.2f} ms "
                         f"{2 * rows * d_in * d_out / median / 1e9:.0f} GFLOP/s")
        print(f"{rows} rows: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
