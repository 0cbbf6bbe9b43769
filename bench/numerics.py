"""Numerics of the quantized formats: summation error, matmul error, and matmul speed.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/numerics.py [--repeats 7] [--update-doc]

1. Summing 1M values: float32, bfloat16 inputs summed in float32, bfloat16 accumulation
   (a running sum, and a pairwise tree), and int8 absmax (int32 accumulation), against a
   float64 reference, on uniform [0, 1) values (no cancellation: the running sum only grows)
   and on standard normal values; errors are divided by sum |x|.
2. Relative matmul error ||Y_q - Y|| / ||Y|| (Frobenius, float64 reference) of each format on
   random (normal) data and on heavy-tailed data: activations with a few outlier feature
   channels (x50, as found in LLM activations) and Student-t (3 dof) weights.
3. Speed of 2048^3 dots on this CPU: float32, bfloat16 (float32 accumulation), int8 x int8 ->
   int32, fp8 e4m3 x e4m3 -> float32; and decode-shaped (8 x 2048 @ 2048 x 2048) weight-only
   ops and the W8A8 int8 op. Calls are timed round-robin (a load change on the shared machine
   hits every variant alike); figures are medians of `--repeats` calls after a warm-up.

With --update-doc the tables replace the generated section of docs/numerics.md.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hpllm.quant import (
    Fp8Weight,
    Fp8WeightOnlyDot,
    Int4Weight,
    Int4WeightOnlyDot,
    Int8Weight,
    Int8WeightOnlyDot,
    W8A8Dot,
)
from hpllm.quant.quantizers import (
    fake_quant_fp8,
    fake_quant_int4,
    fake_quant_int8,
    int8_scale,
    quantize_int,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "numerics.md"
START, END = "<!-- numerics:start -->", "<!-- numerics:end -->"


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


# --- 1. summation ---------------------------------------------------------------------------

def _pairwise_sum(x: np.ndarray) -> np.ndarray:
    """Tree sum in x's dtype: every partial sum is rounded to that dtype."""
    while x.size > 1:
        if x.size % 2:
            x = np.concatenate([x, np.zeros(1, x.dtype)])
        x = x[0::2] + x[1::2]
    return x[0]


def summation_rows(n: int = 1 << 20) -> list[str]:
    rng = np.random.default_rng(0)
    data = {"uniform [0, 1)": rng.uniform(0, 1, n).astype(np.float32),
            "normal(0, 1)": rng.standard_normal(n).astype(np.float32)}
    rows = ["| method | " + " | ".join(f"{name}: error / sum abs" for name in data) + " |",
            "|---|" + "---:|" * len(data)]
    methods: dict[str, Callable[[np.ndarray], float]] = {
        "float32, running sum": lambda x: float(np.cumsum(x, dtype=np.float32)[-1]),
        "float32, XLA reduction (jnp.sum)": lambda x: float(jnp.sum(jnp.asarray(x))),
        "bf16 inputs, float32 accumulation": lambda x: float(
            jnp.sum(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))),
        "bf16 inputs, bf16 running sum": lambda x: float(
            np.cumsum(x.astype(ml_dtypes.bfloat16), dtype=ml_dtypes.bfloat16)[-1]),
        "bf16 inputs, bf16 pairwise tree": lambda x: float(
            _pairwise_sum(x.astype(ml_dtypes.bfloat16))),
        "int8 absmax (per tensor), int32 accumulation": _int8_sum,
    }
    for name, method in methods.items():
        cells = []
        for x in data.values():
            exact = float(np.sum(x, dtype=np.float64))
            # Normalised by sum |x|, so cancellation in the normal data does not inflate it.
            scale = float(np.sum(np.abs(x), dtype=np.float64))
            cells.append(f"{abs(method(x) - exact) / scale:.2e}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _int8_sum(x: np.ndarray) -> float:
    xj = jnp.asarray(x)
    scale = int8_scale(xj)
    q = quantize_int(xj, scale, 127.0)
    return float(jnp.sum(q, dtype=jnp.int32).astype(jnp.float32) * scale.reshape(()))


# --- 2. matmul error ------------------------------------------------------------------------

def _matmul_data(heavy_tailed: bool, m: int = 256, k: int = 1024, n: int = 1024):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if heavy_tailed:
        outliers = rng.choice(k, k // 100, replace=False)
        x[:, outliers] *= 50.0
        w = (rng.standard_t(3, (k, n)) / np.sqrt(k)).astype(np.float32)
    else:
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x, w


MATMUL_FORMATS: dict[str, Callable] = {
    "bf16 x bf16": lambda x, w: (x.astype(jnp.bfloat16).astype(jnp.float32),
                                 w.astype(jnp.bfloat16).astype(jnp.float32)),
    "int8 per-tensor x per-tensor": lambda x, w: (fake_quant_int8(x), fake_quant_int8(w)),
    "int8 per-token x per-channel": lambda x, w: (fake_quant_int8(x, axis=-1),
                                                  fake_quant_int8(w, axis=-2)),
    "fp8 e4m3 x e4m3 (per tensor)": lambda x, w: (fake_quant_fp8(x, "e4m3"),
                                                  fake_quant_fp8(w, "e4m3")),
    "fp8 e5m2 x e5m2 (per tensor)": lambda x, w: (fake_quant_fp8(x, "e5m2"),
                                                  fake_quant_fp8(w, "e5m2")),
    "int8 weight-only (per channel)": lambda x, w: (x, fake_quant_int8(w, axis=-2)),
    "int4 weight-only g32": lambda x, w: (x, fake_quant_int4(w, 32)),
    "int4 weight-only g128": lambda x, w: (x, fake_quant_int4(w, 128)),
}


def matmul_error_rows() -> list[str]:
    datasets = {"random (normal)": _matmul_data(False), "heavy-tailed": _matmul_data(True)}
    rows = ["| format | " + " | ".join(f"{name}: rel. error" for name in datasets) + " |",
            "|---|" + "---:|" * len(datasets)]
    for name, quantize in MATMUL_FORMATS.items():
        cells = []
        for x, w in datasets.values():
            want = x.astype(np.float64) @ w.astype(np.float64)
            xq, wq = quantize(jnp.asarray(x), jnp.asarray(w))
            got = np.asarray(xq, np.float64) @ np.asarray(wq, np.float64)
            cells.append(f"{_relative(got, want):.2e}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


# --- 3. speed -------------------------------------------------------------------------------

def _time_round_robin(calls: dict[str, Callable[[], jax.Array]], repeats: int
                      ) -> dict[str, float]:
    for call in calls.values():
        jax.block_until_ready(call())  # compile and touch memory
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_rows(repeats: int, n: int = 2048) -> list[str]:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    a8 = jnp.clip(jnp.round(a * 30), -127, 127).astype(jnp.int8)
    b8 = jnp.clip(jnp.round(b * 30), -127, 127).astype(jnp.int8)
    operands = {
        "float32": (a, b, jnp.float32),
        "bf16 (f32 accumulation)": (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jnp.float32),
        "int8 x int8 -> int32": (a8, b8, jnp.int32),
        "fp8 e4m3 x e4m3 -> f32": (a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn),
                                   jnp.float32),
    }
    calls = {}
    for name, (lhs, rhs, acc) in operands.items():
        dot = jax.jit(lambda p, q, acc=acc: jnp.matmul(p, q, preferred_element_type=acc))
        calls[name] = lambda dot=dot, lhs=lhs, rhs=rhs: dot(lhs, rhs)
    medians = _time_round_robin(calls, repeats)
    flops = 2 * n**3
    rows = [f"| {n}^3 dot | median ms | GFLOP/s (GOP/s) | vs float32 |", "|---|---:|---:|---:|"]
    for name, seconds in medians.items():
        rows.append(f"| {name} | {seconds * 1e3:.1f} | {flops / seconds / 1e9:.0f} | "
                    f"{medians['float32'] / seconds:.2f}x |")
    return rows


def decode_rows(repeats: int, batch: int = 8, n: int = 2048) -> list[str]:
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (batch, n), jnp.float32)
    w = jax.random.normal(kw, (n, n), jnp.float32) / np.sqrt(n)
    variants = {
        "float32 weights": (lambda x, w: jnp.matmul(x, w), w),
        "bf16 weights (upcast)": (lambda x, w: jnp.matmul(x, w.astype(jnp.float32)),
                                  w.astype(jnp.bfloat16)),
        "int8 weight-only": (Int8WeightOnlyDot(), Int8Weight(w)),
        "fp8 weight-only": (Fp8WeightOnlyDot(), Fp8Weight(w)),
        "int4 weight-only g128": (Int4WeightOnlyDot(), Int4Weight(w, 128)),
        "w8a8: int8 weights, activations per token, int8 dot": (W8A8Dot(), Int8Weight(w)),
    }
    calls, weight_bytes = {}, {}
    for name, (op, weight) in variants.items():
        fn = jax.jit(op)
        calls[name] = lambda fn=fn, weight=weight: fn(x, weight)
        weight_bytes[name] = sum(leaf.nbytes for leaf in jax.tree.leaves(weight))
    medians = _time_round_robin(calls, repeats)
    rows = [f"| {batch} x {n} @ {n} x {n} | weight MB | median us | weight GB/s | vs float32 |",
            "|---|---:|---:|---:|---:|"]
    for name, seconds in medians.items():
        rows.append(f"| {name} | {weight_bytes[name] / 1e6:.1f} | {seconds * 1e6:.0f} | "
                    f"{weight_bytes[name] / seconds / 1e9:.1f} | "
                    f"{medians['float32 weights'] / seconds:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--update-doc", action="store_true")
    args = parser.parse_args()
    command = "flock /tmp/hpllm-bench.lock .venv/bin/python bench/numerics.py" + (
        f" --repeats {args.repeats}" if args.repeats != 7 else "") + " --update-doc"
    sections = [
        f"Generated by `{command}` on {platform.machine()} ({os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}); shared machine, medians of "
        f"{args.repeats} runs.",
        "### Summing 2^20 values (|sum - float64 sum| / sum |x|)",
        *summation_rows(),
        "### Matmul error, 256 x 1024 @ 1024 x 1024 (relative Frobenius error vs float64)",
        *matmul_error_rows(),
        "### Matmul speed on this CPU",
        *speed_rows(args.repeats),
        "### Decode-shaped weight-only matmuls",
        *decode_rows(args.repeats),
    ]
    text = "\n".join(line if line.startswith("|") else f"\n{line}\n" for line in sections)
    print(text)
    if args.update_doc:
        doc = DOC.read_text()
        if START not in doc or END not in doc:
            sys.exit(f"error: {DOC} lacks the {START} / {END} markers")
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{START}\n{text.strip()}\n{END}{tail}")
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
