"""Training throughput: tokens/s and model FLOP utilisation (MFU) per preset and --quant mode.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/train_throughput.py \
        [--presets small base] [--quants none int8 fp8] [--repeats 10] [--dtype float32]
        [--update-doc]

MFU = 6 * n_params * tokens/s / peak, where peak is the matmul FLOP/s measured here (a large
jitted float32 matmul, the dtype the CPU runs by default). 6 * N counts the matmul FLOPs of the
forward and backward pass per token and leaves out attention scores, so MFU is a slight
underestimate at long sequence lengths.

Steps of the different --quant modes are timed round-robin (none, int8, fp8, none, ...), so a
load change on a shared machine hits every mode alike; each figure is the median over
`--repeats` steps, and the QAT overhead is the ratio of medians within this one run.
With --update-doc the table replaces the training section of docs/performance.md.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.quant import QuantConfig, quantize_for_training, split_quant_state
from hpllm.sharding import make_mesh, shard_batch, shard_tree
from train.loop import StepBatch, TrainState, make_optimizer, make_train_step

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
START, END = "<!-- train-throughput:start -->", "<!-- train-throughput:end -->"
# Batch shape per preset: the default training shape for small, a short window for base so a
# step stays within seconds on a CPU.
SHAPES = {"tiny": (8, 128), "small": (8, 128), "base": (4, 128)}


class PeakMatmul:
    """FLOP/s of an n x n x n float32 matmul (2 n^3 FLOPs), timed one call at a time so the
    calls can be interleaved with the train steps (same machine load for both)."""

    def __init__(self, n: int = 2048):
        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.matmul = jax.jit(jnp.matmul)
        self.matmul(self.a, self.b).block_until_ready()
        self.times: list[float] = []

    def sample(self) -> None:
        start = time.perf_counter()
        self.matmul(self.a, self.b).block_until_ready()
        self.times.append(time.perf_counter() - start)

    @property
    def flops(self) -> float:
        return 2 * self.n**3 / statistics.median(self.times)


def build(preset_name: str, quant: str, batch: int, seq: int, mesh, dtype: str):
    cfg = preset(preset_name).replace(compute_dtype=dtype)
    model = quantize_for_training(Transformer(cfg, key=jax.random.key(0)), QuantConfig(mode=quant))
    params, quant_state = split_quant_state(model)
    optimizer = make_optimizer(params, lr=1e-4, warmup=10, steps=1000, weight_decay=0.1,
                               clip=1.0)
    state = shard_tree(TrainState(params, quant_state, optimizer.init(params),
                                  jnp.zeros((), jnp.int32)), mesh)
    step = make_train_step(optimizer, peak_lr=1e-4, warmup=10, total_steps=1000,
                           state_shardings=jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, batch, seq + 1), dtype=np.int32)
    host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "segment_ids": np.zeros((1, batch, seq), np.int32),
            "loss_mask": np.ones((1, batch, seq), np.float32)}
    make_batch = lambda: StepBatch(  # noqa: E731
        **{k: shard_batch(v, mesh, batch_axis=1) for k, v in host.items()})
    return cfg, state, step, make_batch


def bench_preset(preset_name: str, quants: list[str], repeats: int, peak: PeakMatmul, mesh,
                 dtype: str) -> list[dict]:
    batch, seq = SHAPES[preset_name]
    runs = {}
    for quant in quants:
        cfg, state, step, make_batch = build(preset_name, quant, batch, seq, mesh, dtype)
        for _ in range(2):  # compile, then one more so caches and allocations settle
            state, metrics = step(make_batch(), state)
            float(metrics["loss"])
        runs[quant] = {"state": state, "step": step, "make_batch": make_batch, "times": []}
        print(f"  {preset_name}/{quant}: compiled", file=sys.stderr, flush=True)
    for _ in range(repeats):
        peak.sample()
        for run in runs.values():
            batch_arrays = run["make_batch"]()
            start = time.perf_counter()
            run["state"], metrics = run["step"](batch_arrays, run["state"])
            float(metrics["loss"])  # waits for the step
            run["times"].append(time.perf_counter() - start)
    rows = []
    base_time = statistics.median(runs[quants[0]]["times"])
    for quant, run in runs.items():
        step_time = statistics.median(run["times"])
        tokens_per_s = batch * seq / step_time
        rows.append({"preset": preset_name, "params": cfg.n_params, "quant": quant,
                     "dtype": cfg.compute_dtype,
                     "batch": f"{batch}x{seq}", "step_s": step_time,
                     "tokens_per_s": tokens_per_s,
                     "ratio": step_time / base_time})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict], peak: float, command: str, repeats: int,
          load: tuple[float, float]) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s). "
        f"Shared with other contributors while measuring: figures are medians of {repeats} "
        f"steps per cell, steps of the quant modes interleaved; 1-minute load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after (2 = both cores busy).",
        "",
        f"Measured peak matmul throughput (2048^3 float32 matmul, median of one call per "
        f"round, interleaved with the steps): "
        f"**{peak / 1e9:.1f} GFLOP/s**.",
        "",
        f"Compute dtype: {rows[0]['dtype']} (parameters float32).",
        "",
        "| preset | params | --quant | batch x seq | step (s) | tokens/s | MFU | step vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['quant']} | {r['batch']} "
                     f"| {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
                     f"| {6 * r['params'] * r['tokens_per_s'] / peak:.1%} "
                     f"| {r['ratio']:.2f}x |")
    return "\n".join(lines)


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the {START} / {END} markers")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--quants", nargs="+", default=["none", "int8", "fp8"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of the model (parameters stay float32)")
    parser.add_argument("--update-doc", action="store_true")
    args = parser.parse_args()
    mesh = make_mesh()
    peak = PeakMatmul()
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.presets:
        rows += bench_preset(name, args.quants, args.repeats, peak, mesh, args.dtype)
    load = (load_before, os.getloadavg()[0])
    command = "flock /tmp/hpllm-bench.lock .venv/bin/python bench/train_throughput.py " + " ".join(
        sys.argv[1:])
    text = table(rows, peak.flops, command.strip(), args.repeats, load)
    print(text)
    if args.update_doc:
        update_doc(text)


if __name__ == "__main__":
    main()
