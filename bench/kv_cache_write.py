"""One decode step's KV-cache writes alone, by the buffer's dtype: why `hpllm.kvcache.KVCache`
holds a bfloat16 cache as its uint16 bits.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/kv_cache_write.py

XLA:CPU runs a scatter into a bf16 buffer as "convert the whole buffer to f32, scatter, convert
back", so writing one token costs two passes over the cache; a uint16 (or f32, int8) buffer is
updated in place. `base`-shaped buffers (256 slots, 12 kv heads of 64), 12 layers' K and V (24
buffers, donated) get one token per row, as `KVCache.write` writes it (`.at[].set(mode="drop")`);
medians of 20 calls.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

SLOTS, KV_HEADS, HEAD_DIM, BUFFERS = 256, 12, 64, 24


def writer(dtype: str, rows: jax.Array):
    def write(buffers, new, slots):
        values = new.astype(dtype)
        return [b.at[rows, slots].set(values, mode="drop") for b in buffers]
    return write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args()
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| batch | buffer dtype | ms per step (24 writes) |")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
        slots = jnp.full((batch, 1), 100, jnp.int32)
        new = jnp.ones((batch, 1, KV_HEADS, HEAD_DIM), jnp.float32)
        for dtype in ("float32", "bfloat16", "uint16", "int8"):
            step = jax.jit(writer(dtype, rows), donate_argnums=0)
            buffers = [jnp.zeros((batch, SLOTS, KV_HEADS, HEAD_DIM), dtype)
                       for _ in range(BUFFERS)]
            buffers = jax.block_until_ready(step(buffers, new, slots))  # compile
            times = []
            for _ in range(20):
                start = time.perf_counter()
                buffers = jax.block_until_ready(step(buffers, new, slots))
                times.append(time.perf_counter() - start)
            print(f"| {batch} | {dtype} | {statistics.median(times) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
