"""Where one prefill call's time goes: matmuls, attention over the KV cache, and the rest.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/prefill_split.py \
        [--shapes 16x64,1x128] [--cache-len 256] [--to int8] [--kv-cache-dtype bf16] \
        [--attention native]

A prefill as `infer.engine` and `infer.generate` run it: `--shapes` ROWSxTOKENS new tokens from
slot 0 into an empty cache of `--cache-len` slots per row (`Transformer.decode` with
`logits_at`, so the LM head runs for each row's last token only), on a random `base` model
(weights in `--to`, the LM head quantized too, native kernels where available, the decoding
layer layout). `--attention xla` leaves the attention to XLA's einsums (what prefill ran before
the native kernel took it: every token over every cache slot). Prints the median of `--repeats`
timed calls, the tokens/s that makes, and one profiled call's split, classified as
`bench/decode_step_split.py` does, with its heaviest operations.
"""

import argparse
import collections
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from hpllm.kvcache import CACHE_DTYPE_ALIASES
from hpllm.quant import WITH_HEAD
from infer.kernels import use_native_kernels
from infer.loading import quantize, random_model

sys.path.insert(0, str(Path(__file__).parent))
from decode_step_split import classify  # noqa: E402


@eqx.filter_jit(donate="all-except-first")
def prefill(model, tokens, cache):
    rows, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    return model.decode(tokens, positions, cache,
                        logits_at=jnp.full((rows,), length - 1, jnp.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--to", default="int8", help="weight format (f32, int8, int4, w8a8)")
    parser.add_argument("--shapes", default="16x64,1x128", help="ROWSxTOKENS, comma-separated")
    parser.add_argument("--cache-len", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="bf16")
    parser.add_argument("--attention", choices=("native", "xla"), default="native")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = random_model(args.preset)
    if args.to != "f32":
        model = quantize(model.stacked(), args.to, 128, WITH_HEAD)
    model = use_native_kernels(model.unstacked(), attention=args.attention == "native")
    dtype = CACHE_DTYPE_ALIASES[args.kv_cache_dtype]
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    print(f"{args.preset}, {args.to} (head too), {args.kv_cache_dtype} cache of "
          f"{args.cache_len} slots, {args.attention} attention, load "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| rows x tokens | ms | tokens/s | matmuls ms | attention ms | rest ms |")
    print("|---|---|---|---|---|---|")
    heaviest = []
    for shape in args.shapes.split(","):
        rows, length = (int(n) for n in shape.split("x"))

        def inputs(rows=rows, length=length):  # new buffers for every call, which donates them
            return (jnp.ones((rows, length), jnp.int32),
                    model.allocate_cache(rows, args.cache_len, dtype))

        classes = classify(prefill.lower(model, *inputs()).lowered.compile().as_text(),
                           args.cache_len, model.cfg.vocab_size)
        jax.block_until_ready(prefill(model, *inputs()))
        times = []
        for _ in range(args.repeats):
            call_inputs = jax.block_until_ready(inputs())
            start = time.perf_counter()
            jax.block_until_ready(prefill(model, *call_inputs))
            times.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            call_inputs = jax.block_until_ready(inputs())
            with jax.profiler.trace(folder):
                jax.block_until_ready(prefill(model, *call_inputs))
            events = json.load(gzip.open(next(Path(folder).rglob("*.trace.json.gz"))))
        total, by_op = collections.Counter(), collections.Counter()
        for event in events["traceEvents"]:
            if event.get("ph") == "X" and event["name"] in classes:
                total[classes[event["name"]][0]] += event["dur"] / 1e3
                by_op[classes[event["name"]]] += event["dur"] / 1e3
        median = statistics.median(times)
        print(f"| {rows} x {length} | {1e3 * median:.1f} | {rows * length / median:.0f} | "
              f"{total['matmuls']:.1f} | {total['attention']:.1f} | {total['rest']:.1f} |")
        heaviest.append(f"  heaviest ops, {rows} x {length} (ms): " + ", ".join(
            f"{op or '?'} ({part}) {ms:.1f}" for (part, op), ms in by_op.most_common(4)))
    print("\n".join(heaviest))


if __name__ == "__main__":
    main()
