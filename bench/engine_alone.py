"""The serving engine alone: time per output token without the HTTP server, and where it goes.

    flock /tmp/hpllm-bench.lock python bench/engine_alone.py [--quantize-head] \
        [--concurrency 1,16] [--chunk-size 4] [--kv-cache-dtype bf16]

`--requests` requests (after one round that warms up) through `infer.engine.Engine` with
`bench/serve_load.py`'s server settings (`--max-batch 16`, 256 cache slots, 64-token prompts,
64 new tokens, the KV cache dtype of `infer serve`'s default unless given) on a random `base`
int8 model, stepped in this thread. At concurrency N, N requests are in flight: the first N are
queued at once, and each one that ends queues the next, as `serve_load.py`'s client threads do.
Prints, per concurrency, the median and p99 time per output token after the first (as
`serve_load.py`'s TPOT counts it; set against its figure, the difference is what the server
adds) and where the engine's time went: decode chunks (the chunk, and the host's sync and
bookkeeping after it), prefills (the admission of queued requests), and the rest of a round.

`--row-counts` then times decode chunks over the first 1, 2, 4, ... rows of the 16 slots, every
slot busy (medians of 6 chunks, the row counts alternated), and one row of a 1-slot engine: the
difference between the two one-row figures is what cutting a row out of the 16-row state and
back costs a step.
"""

import argparse
import os
import statistics
import time

import jax

from hpllm.kvcache import CACHE_DTYPE_ALIASES
from hpllm.quant import DEFAULT_TARGETS, WITH_HEAD
from infer.engine import Engine, Request, decode_first_rows
from infer.loading import quantize, random_model

PROMPT_LEN, OUTPUT_LEN = 64, 64


def run(engine: Engine, concurrency: int, n_requests: int) -> dict:
    """`n_requests` requests, `concurrency` at a time; per-token times and the time split."""
    per_token: list[float] = []
    queued = 0

    def submit() -> None:
        nonlocal queued
        stamps: list[float] = []
        tokens = [0]

        def on_tokens(ids: list[int], finish: str | None) -> None:
            if ids:
                stamps.append(time.perf_counter())
                tokens[0] += len(ids)
            if finish is not None:
                per_token.append((stamps[-1] - stamps[0]) / (tokens[0] - 1))
                if queued < n_requests:
                    submit()

        queued += 1
        prompt = [1 + (queued + i) % 300 for i in range(PROMPT_LEN)]
        engine.submit(Request(prompt=prompt, max_tokens=OUTPUT_LEN, on_tokens=on_tokens))

    spent = {"decode": 0.0, "admit": 0.0}
    timed = {name: getattr(engine, f"_{name}") for name in spent}

    def timer(name):
        def call() -> None:
            started = time.perf_counter()
            timed[name]()
            spent[name] += time.perf_counter() - started
        return call

    for name in spent:
        setattr(engine, f"_{name}", timer(name))
    rounds = 0
    started = time.perf_counter()
    for _ in range(concurrency):
        submit()
    while engine.busy:
        engine.step()
        rounds += 1
    elapsed = time.perf_counter() - started
    for name in spent:
        delattr(engine, f"_{name}")
    tokens = n_requests * OUTPUT_LEN
    return {"tpot_p50_ms": 1e3 * statistics.median(per_token),
            "tpot_p99_ms": 1e3 * sorted(per_token)[round(0.99 * (len(per_token) - 1))],
            "tokens_per_s": tokens / elapsed, "rounds": rounds,
            "decode_s": spent["decode"], "admit_s": spent["admit"],
            "other_s": elapsed - spent["decode"] - spent["admit"], "elapsed_s": elapsed}


def row_counts(engine: Engine, one_slot: Engine) -> dict[str, float]:
    """ms per decode step of a chunk over the first rows of `engine` (every slot busy), by row
    count, and of `one_slot`'s only row."""
    engines = {f"{rows} of {engine.max_batch}": (engine, rows) for rows in engine.row_buckets}
    engines["1 of 1"] = (one_slot, 1)
    for e in (engine, one_slot):
        for i in range(e.max_batch):
            # 16-token prompts: row 0 runs in every row count's chunks and must not reach the
            # end of the cache (a finished row would end its chunks early).
            e.submit(Request(prompt=[1 + (i + j) % 300 for j in range(16)],
                             max_tokens=10**6, on_tokens=lambda ids, finish: None))
        e._admit()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(4):
        for name, (e, rows) in engines.items():
            for _ in range(2):
                started = time.perf_counter()
                e.state, emitted = decode_first_rows(e.model, e.state, rows, e.chunk_size,
                                                     e.stop_ids)
                jax.device_get((emitted, e.state.done))
                if round_:  # the first round warms up
                    times[name].append((time.perf_counter() - started) / e.chunk_size)
    for e in (engine, one_slot):
        e.reset()
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize-head", action="store_true",
                        help="quantize the LM head too (as `serve_load.py --quantize-head`)")
    parser.add_argument("--chunk-size", type=int, default=4, help="as `infer serve`'s")
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="bf16",
                        help="as `infer serve`'s (default %(default)s, its default)")
    parser.add_argument("--concurrency", default="1", help="comma-separated (default 1)")
    parser.add_argument("--requests", type=int, default=5,
                        help="per concurrency, at least the concurrency (default 5)")
    parser.add_argument("--row-counts", action="store_true",
                        help="also time decode chunks by row count (see above)")
    args = parser.parse_args()
    targets = WITH_HEAD if args.quantize_head else DEFAULT_TARGETS
    model = quantize(random_model("base"), "int8", 128, targets)
    settings = dict(context=256, chunk_size=args.chunk_size,
                    kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype])
    engine = Engine(model, max_batch=16, **settings)
    started = time.perf_counter()
    engine.warm_up()
    warm_up_s = time.perf_counter() - started
    head = "int8" if args.quantize_head else "float32"
    print(f"base int8, head {head}, {args.kv_cache_dtype} KV cache, chunks of "
          f"{args.chunk_size}, prompt {PROMPT_LEN}, output {OUTPUT_LEN}; warm-up "
          f"{warm_up_s:.1f} s; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| concurrency | requests | tokens/s | TPOT p50 / p99 ms | rounds | decode s | "
          "admit s | other s |")
    print("|---|---|---|---|---|---|---|---|")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        run(engine, concurrency, concurrency)  # warms the host side at this concurrency
        r = run(engine, concurrency, max(args.requests, concurrency))
        print(f"| {concurrency} | {max(args.requests, concurrency)} | {r['tokens_per_s']:.1f} "
              f"| {r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} | {r['rounds']} | "
              f"{r['decode_s']:.2f} | {r['admit_s']:.2f} | {r['other_s']:.2f} |", flush=True)
    if args.row_counts:
        one_slot = Engine(model, max_batch=1, **settings)
        one_slot.warm_up()
        steps = row_counts(engine, one_slot)
        print("decode ms per step by busy rows of the slots: " + ", ".join(
            f"{name}: {ms:.2f}" for name, ms in steps.items()) +
            f"; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
