"""Greedy token choice per decode step: `jnp.argmax` against `infer.sampling.argmax_rows`.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/argmax_cost.py [--vocab 32000]

Times one jitted call of each on random float32 logits [batch, vocab] at batch 1 and 16 (ms,
the best of 7 runs of 50 calls), and prints the 1-minute load (the machine is shared).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from infer.sampling import argmax_rows


def best_ms(fn, logits) -> float:
    jax.block_until_ready(fn(logits))
    times = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(50):
            result = fn(logits)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - started) / 50)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    plain = jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))
    two_levels = jax.jit(argmax_rows)
    print(f"load {os.getloadavg()[0]:.1f}")
    print("| batch | jnp.argmax ms | argmax_rows ms |")
    print("|---|---|---|")
    for batch in (1, 16):
        logits = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, args.vocab)),
                             jnp.float32)
        print(f"| {batch} | {best_ms(plain, logits):.3f} | {best_ms(two_levels, logits):.3f} |")


if __name__ == "__main__":
    main()
