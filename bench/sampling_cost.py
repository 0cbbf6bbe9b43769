"""What choosing the next token costs per decode step: `infer.sampling.sample_rows` alone.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/sampling_cost.py \
        [--batch-sizes 1,16] [--vocab 32000] [--candidates 128] [--repeats 5] [--calls 20]

Times one jitted `sample_rows` call on random float32 logits [batch, vocab] of two kinds: `peaked`,
standard normal times 2 with 8 tokens raised by 14 (97% of the mass at temperature 1 on 8 tokens,
as in a confident model: the top_p 0.9 nucleus lies among the candidates) and `flat`, standard
normal times 3 (the nucleus at top_p 0.9 spans thousands of tokens, past the candidates: the binary
search runs), with every row set alike: greedy; temperature 1;
temperature 1 + top_p 0.9 (`infer serve` with top_p); temperature 0.8 + top_k 50 (`infer
chat`'s default). `old` is the previous implementation, copied below (a full sort of the row
for any cut, `jax.random.categorical` per row for the draw); `new` is the module's.
`--candidates a,b` retimes `new` with `infer.sampling.CANDIDATES` set to each value. Times are
ms per call, the best of `--repeats` runs of `--calls` calls each; the 1-minute load average
is printed before and after (the machine is shared).
"""

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp

from infer import sampling
from infer.sampling import RowSampling, argmax_rows


# --------------------------------------------------------------- the old implementation
# infer/sampling.py as of commit fb4ad36, the baseline.
def old_filter_rows(logits, rows):
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)
    logits = logits.astype(jnp.float32) / temperature[:, None]
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1, descending=True)
    ranks = jnp.arange(vocab)[None, :]
    cut_k = (rows.top_k > 0) & (rows.top_k < vocab)
    kth = jnp.take_along_axis(ordered, jnp.clip(rows.top_k - 1, 0, vocab - 1)[:, None],
                              axis=-1)[:, 0]
    threshold = jnp.where(cut_k, kth, -jnp.inf)
    kept = jnp.where((rows.top_k[:, None] == 0) | (ranks < rows.top_k[:, None]), ordered,
                     -jnp.inf)
    probs = jax.nn.softmax(kept, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    last_kept = jnp.maximum(jnp.sum(before < rows.top_p[:, None], axis=-1) - 1, 0)
    nucleus = jnp.take_along_axis(ordered, last_kept[:, None], axis=-1)[:, 0]
    threshold = jnp.where(rows.top_p < 1.0, jnp.maximum(threshold, nucleus), threshold)
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def old_sample_rows(logits, keys, rows):
    greedy = argmax_rows(logits)

    def draw():
        filtered = old_filter_rows(logits, rows)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(
            keys, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda: greedy)
    return jnp.where(rows.temperature > 0, drawn, greedy)
# ------------------------------------------------------------------------------------------

SETTINGS = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
    "t=1": dict(temperature=1.0, top_k=0, top_p=1.0),
    "t=1 top_p=.9": dict(temperature=1.0, top_k=0, top_p=0.9),
    "t=.8 top_k=50": dict(temperature=0.8, top_k=50, top_p=1.0),
}


def best_ms(fn, args, repeats: int, calls: int) -> float:
    jax.block_until_ready(fn(*args))  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--candidates", default=str(sampling.CANDIDATES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f}")
    candidates = [int(c) for c in args.candidates.split(",")]
    columns = ["old"] + [f"new (candidates {c})" for c in candidates]
    print(f"| batch | logits | setting | {' | '.join(columns)} |")
    print("|---" * (3 + len(columns)) + "|")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for batch, kind in itertools.product(batch_sizes, ("peaked", "flat")):
        noise = jax.random.normal(jax.random.key(0), (batch, args.vocab), jnp.float32)
        logits = noise * 3 if kind == "flat" else (noise * 2).at[:, ::args.vocab // 8].add(14)
        keys = jax.random.split(jax.random.key(1), batch)
        for name, setting in SETTINGS.items():
            if kind == "flat" and name in ("greedy", "t=1", "t=.8 top_k=50"):
                continue  # the same work on either kind
            rows = RowSampling(
                temperature=jnp.full((batch,), setting["temperature"], jnp.float32),
                top_k=jnp.full((batch,), setting["top_k"], jnp.int32),
                top_p=jnp.full((batch,), setting["top_p"], jnp.float32))
            times = [best_ms(jax.jit(old_sample_rows), (logits, keys, rows), args.repeats,
                             args.calls)]
            for c in candidates:
                sampling.CANDIDATES = c  # read when `sample_rows` is traced: a fresh function
                times.append(best_ms(jax.jit(lambda *a: sampling.sample_rows(*a)),
                                     (logits, keys, rows), args.repeats, args.calls))
            print(f"| {batch} | {kind} | {name} | " + " | ".join(f"{t:.2f}" for t in times)
                  + " |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
