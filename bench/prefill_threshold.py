"""Where (if anywhere) XLA's f32 dot on a dequantized weight beats the native weight kernels.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/prefill_threshold.py [--repeats 7]

For int8 and int4 (group 128) weights (bf16 with `--schemes bf16`) of `base`'s MLP shapes
(768 x 2048 and 2048 x 768), and row counts from 1 to 2048 (a bench batch of 16 prompts of 128
tokens is 2048 rows), it times one product through `NativeInt8Dot` (`NativeAmxInt8Dot` on its
layout where the build has AMX, as `use_native_kernels` chooses) / `NativeInt4Dot` /
`NativeBf16Dot` with the kernel forced (`prefill_rows` None) and with the XLA op forced
(`prefill_rows=0`: dequantize the whole weight to f32 per call, then XLA's dot), interleaved
round by round with XLA's plain f32 dot on the float weight (what f32 prefill runs), and prints
the medians and the kernel's time over each.
`infer.kernels.PREFILL_ROWS` is set from the row count where kernel / XLA crosses 1, or None
if it never does; kernel / f32 says whether quantized prefill keeps pace with f32 prefill
(docs/performance.md records the runs).
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from hpllm.quant.weight_only import Int4Weight, Int8Weight
from infer.kernels import (
    NativeAmxInt8Dot,
    NativeBf16Dot,
    NativeInt4Dot,
    NativeInt8Dot,
    TiledAmxInt8Weight,
    TiledBf16Weight,
    TiledInt4Weight,
    TiledInt8Weight,
    default_isa,
    load,
)

ROWS = (1, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024, 2048)
SHAPES = ((768, 2048), (2048, 768))
CALLS = 8  # products per timed call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=lambda text: tuple(int(r) for r in text.split(",")),
                        default=ROWS, help="comma-separated row counts (default: %(default)s)")
    parser.add_argument("--schemes", default="int8,int4",
                        help="comma-separated, of int8, int4, bf16 (default: %(default)s)")
    args = parser.parse_args()
    kernels = load()
    if kernels is None:
        raise SystemExit("error: the native kernels are unavailable here")
    print(f"kernel build {default_isa()} (path {kernels.path}, AMX {kernels.amx}), load "
          f"{os.getloadavg()[0]:.1f} before")
    print("| weights | d_in x d_out | rows | kernel us | XLA dequant + dot us | f32 dot us "
          "| kernel / XLA | kernel / f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme in args.schemes.split(","):
        for d_in, d_out in SHAPES:
            w = jax.random.normal(jax.random.key(0), (d_in, d_out), jnp.float32) / d_in**0.5
            if scheme == "int8" and kernels.amx:
                tiled, op = TiledAmxInt8Weight(Int8Weight(w)), NativeAmxInt8Dot
            elif scheme == "int8":
                tiled, op = TiledInt8Weight(Int8Weight(w)), NativeInt8Dot
            elif scheme == "int4":
                tiled, op = TiledInt4Weight(Int4Weight(w, 128)), NativeInt4Dot
            else:
                tiled, op = TiledBf16Weight(w.astype(jnp.bfloat16)), NativeBf16Dot
            for rows in args.rows:
                x = jax.random.normal(jax.random.key(1), (rows, d_in), jnp.float32)
                products = {"kernel": (op(kernels.isa, None), tiled),
                            "xla": (op(kernels.isa, 0), tiled),
                            "f32": (jnp.matmul, w)}
                runs = {}
                for name, (product, weight) in products.items():

                    def chain(x, weight, product=product):
                        # CALLS products on distinct inputs, so XLA can neither merge nor drop one.
                        return sum(product(x + float(i), weight)[:, :1] for i in range(CALLS))

                    runs[name] = (jax.jit(chain), weight)
                    runs[name][0](x, weight).block_until_ready()
                times = {name: [] for name in runs}
                for _ in range(args.repeats):
                    for name, (run, weight) in runs.items():
                        start = time.perf_counter()
                        run(x, weight).block_until_ready()
                        times[name].append((time.perf_counter() - start) / CALLS)
                kernel, xla, f32 = (statistics.median(times[name]) for name in products)
                print(f"| {scheme} | {d_in} x {d_out} | {rows} | {kernel * 1e6:.0f} | "
                      f"{xla * 1e6:.0f} | {f32 * 1e6:.0f} | {kernel / xla:.2f} | "
                      f"{kernel / f32:.2f} |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
