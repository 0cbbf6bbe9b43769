"""The serving engine alone at concurrency 1: time per output token without the HTTP server.

    flock /tmp/hpllm-bench.lock python bench/engine_alone.py [--quantize-head] [--chunk-size 4]

One request at a time (a 64-token prompt, 64 new tokens) through `infer.engine.Engine` with
`bench/serve_load.py`'s server settings (`--max-batch 16`, 256 cache slots) on a random `base`
int8 model, stepped in this thread. Prints the median over `--requests` requests (after one
more that warms up) of the time per output token after the first, as `serve_load.py`'s TPOT
counts it; set against that figure, the difference is what the server adds.
"""

import argparse
import statistics
import time

from hpllm.quant import DEFAULT_TARGETS, WITH_HEAD
from infer.engine import Engine, Request
from infer.loading import quantize, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize-head", action="store_true",
                        help="quantize the LM head too (as `serve_load.py --quantize-head`)")
    parser.add_argument("--chunk-size", type=int, default=4, help="as `infer serve`'s")
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    targets = WITH_HEAD if args.quantize_head else DEFAULT_TARGETS
    engine = Engine(quantize(random_model("base"), "int8", 128, targets), max_batch=16,
                    context=256, chunk_size=args.chunk_size)
    engine.warm_up()
    per_token = []
    for _ in range(args.requests + 1):
        stamps: list[tuple[float, int]] = []
        engine.submit(Request(prompt=list(range(1, 65)), max_tokens=64,
                              on_tokens=lambda ids, _, stamps=stamps: stamps.append(
                                  (time.perf_counter(), len(ids)))))
        engine.run_until_idle()
        arrivals = [(t, n) for t, n in stamps if n]
        tokens = sum(n for _, n in arrivals)
        per_token.append((arrivals[-1][0] - arrivals[0][0]) / (tokens - 1))
    head = "int8" if args.quantize_head else "float32"
    print(f"base int8, head {head}, chunks of {args.chunk_size}: "
          f"{1e3 * statistics.median(per_token[1:]):.2f} ms per output token after the first")


if __name__ == "__main__":
    main()
