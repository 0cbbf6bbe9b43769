"""`python -m infer bench`: prefill and decode speed against this machine's memory bandwidth.

Decoding a few sequences is memory-bound: every step reads every weight once, plus the KV
cache. So the ceiling is `measured bandwidth / bytes per step`, and the figure of merit is the
achieved bandwidth `bytes per step / seconds per step` as a percentage of what a plain large
copy reaches on this machine (measured here, not taken from a data sheet).

Bytes per step count what one decode step must read: every weight of the layers, the final norm
and the LM head, one embedding row per sequence, and the whole KV cache (attention runs over
all its slots, masked), in the dtype `--kv-cache-dtype` stores it (bf16 unless told). Times are
medians of `--repeats` runs after a warm-up that compiles.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from hpllm.errors import UserError
from hpllm.kvcache import CACHE_DTYPE_ALIASES
from hpllm.model import ModelCache, Transformer
from hpllm.quant import DEFAULT_TARGETS, WITH_HEAD
from hpllm.quant.weight_only import Int4Weight
from infer.generate import Generator, decode_chunk
from infer.kernels import available as native_kernels_available
from infer.kernels import int4_on_amx
from infer.kernels import load as load_native_kernels
from infer.loading import load, quantize, random_model

COPY_BYTES = 512 * 2**20
SHORT_DTYPE_NAMES = {dtype: short for short, dtype in CACHE_DTYPE_ALIASES.items()}


def measure_bandwidth(n_bytes: int = COPY_BYTES, repeats: int = 7, threads: int = 2) -> float:
    """Memory bandwidth in bytes/s: a large array copy into a preallocated destination, split
    over `threads` (NumPy releases the GIL while copying). Counts bytes read + bytes written;
    median of `repeats` runs."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.zeros_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    times = []
    for _ in range(repeats + 1):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - started)
    return 2 * src.nbytes / statistics.median(times[1:])  # the first run touches fresh pages


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def bytes_per_step(model: Transformer, cache: ModelCache, batch: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) that one decode step reads (either layer layout)."""
    embed_rows = batch * model.embed.shape[1] * model.embed.dtype.itemsize
    weights = _nbytes(model.blocks) + _nbytes(model.final_norm) + _nbytes(model.lm_head)
    if model.lm_head is None:  # tied: the embedding table is the head
        weights += _nbytes(model.embed)
    return weights + embed_rows, _nbytes(cache)


def _median_time(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_batch(model: Transformer, batch: int, *, prompt_len: int, new_tokens: int,
                repeats: int, kv_cache_dtype: str, layout: str, bandwidth: float,
                native_kernels: bool = True) -> dict[str, Any]:
    context = min(prompt_len + new_tokens, model.cfg.max_seq_len)
    if prompt_len >= context:
        raise UserError(f"--prompt-len {prompt_len} leaves no room to decode in the context "
                        f"of {model.cfg.max_seq_len}")
    generator = Generator(model, kv_cache_dtype=kv_cache_dtype, context=context, layout=layout,
                          native_kernels=native_kernels)
    runner = generator.model
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, model.cfg.vocab_size, (batch, prompt_len)).tolist()
    steps = context - prompt_len - 1  # the first new token comes from the prefill
    chunk = min(steps, 32)
    n_chunks = max(1, steps // chunk)

    def run_prefill():
        generation = generator.start(prompts, max_new_tokens=new_tokens)
        jax.block_until_ready(generation.state)
        return generation

    prefill_s = _median_time(run_prefill, repeats)
    state_holder = {}

    def run_decode():
        state = run_prefill().state
        state = eqx.tree_at(lambda s: s.budget, state, jnp.full((batch,), 1 << 30, jnp.int32))
        jax.block_until_ready(state)
        started = time.perf_counter()
        for _ in range(n_chunks):
            state, tokens = decode_chunk(runner, state, chunk, ())
        jax.block_until_ready(tokens)
        state_holder["cache"] = state.cache
        return time.perf_counter() - started

    run_decode()  # compile
    decode_s = statistics.median(run_decode() for _ in range(repeats))
    step_s = decode_s / (n_chunks * chunk)
    weight_bytes, kv_bytes = bytes_per_step(model, state_holder["cache"], batch)
    total = weight_bytes + kv_bytes
    achieved = total / step_s
    return {
        "batch_size": batch,
        "prompt_len": prompt_len,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_ms_per_step": step_s * 1e3,
        "decode_tokens_per_s": batch / step_s,
        "bytes_per_step": total,
        "weight_bytes_per_step": weight_bytes,
        "kv_cache_bytes_per_step": kv_bytes,
        "achieved_GB_per_s": achieved / 1e9,
        "percent_of_measured_bandwidth": 100 * achieved / bandwidth,
    }


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median decode time (its figures stay consistent with each other),
    with the prefill figures of the round with the median prefill time."""
    def middle(key: str) -> dict[str, Any]:
        return sorted(rows, key=lambda row: row[key])[(len(rows) - 1) // 2]

    prefill = middle("prefill_ms")
    return {**middle("decode_ms_per_step"), "prefill_ms": prefill["prefill_ms"],
            "prefill_tokens_per_s": prefill["prefill_tokens_per_s"]}


def _print_row(scheme: str, row: dict[str, Any]) -> None:
    print(f"{scheme:5s} batch {row['batch_size']:3d}: prefill {row['prefill_tokens_per_s']:9.1f} "
          f"tokens/s | decode {row['decode_ms_per_step']:8.2f} ms/step "
          f"{row['decode_tokens_per_s']:8.1f} tokens/s | "
          f"{row['bytes_per_step'] / 1e6:8.1f} MB/step {row['achieved_GB_per_s']:6.1f} GB/s "
          f"({row['percent_of_measured_bandwidth']:5.1f}% of measured)", flush=True)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The bench command. `--to a,b,...` compares several weight formats in one run: rounds
    interleave them (a, b, a, b...), so a change of load on the shared machine hits all alike,
    and each figure is the median over the rounds."""
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be a comma-separated list of integers, got "
                        f"{args.batch_sizes!r}") from None
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-sizes must be >= 1, got {args.batch_sizes!r}")
    if args.preset is not None:
        model, source, scheme = random_model(args.preset, compute_dtype=args.compute_dtype), \
            f"preset {args.preset} (random weights)", "f32"
    else:
        if args.compute_dtype is not None:
            raise UserError("--compute-dtype works with --preset only")
        loaded = load(args.checkpoint)
        model, source, scheme = loaded.model, str(loaded.path), loaded.scheme or "f32"
    models = {scheme: model}
    if args.to is not None:
        if scheme != "f32":
            raise UserError(f"{source} is already {scheme}; --to needs float weights")
        targets = WITH_HEAD if args.quantize_head else DEFAULT_TARGETS
        models = {to: quantize(model, to, args.group_size, targets)
                  for to in args.to.split(",")}
    cache_dtype = CACHE_DTYPE_ALIASES[args.kv_cache_dtype]
    log = sys.stderr
    load_before = os.getloadavg()[0]
    print(f"measuring memory bandwidth ({COPY_BYTES // 2**20} MiB copy)...", file=log, flush=True)
    bandwidth = measure_bandwidth()
    print(f"  {bandwidth / 1e9:.1f} GB/s (read + write)", file=log, flush=True)
    interleave = len(models) > 1
    if not args.json:
        print(f"{source}, {args.kv_cache_dtype} KV cache, layout {args.layout}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for batch in batch_sizes:
        print(f"batch {batch}...", file=log, flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
        for _ in range(args.repeats if interleave else 1):
            for name, m in models.items():
                rounds[name].append(bench_batch(
                    m, batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    repeats=1 if interleave else args.repeats, kv_cache_dtype=cache_dtype,
                    layout=args.layout, bandwidth=bandwidth,
                    native_kernels=not args.no_native_kernels))
        for name in models:
            row = _median_row(rounds[name])
            results[name].append(row)
            if not args.json:
                _print_row(name, row)
    load_after = os.getloadavg()[0]
    reports = []
    for name, m in models.items():
        reports.append({
            "source": source,
            "weights": name,
            "compute_dtype": m.cfg.compute_dtype,
            "kv_cache_dtype": cache_dtype,
            "layout": args.layout,
            "lm_head_quantized": bool(args.quantize_head and name != "f32"),
            # bf16 weights take the native kernel only with float32 activations.
            "native_kernel": bool((name in ("int8", "int4", "w8a8")
                                   or name == "bf16" and m.cfg.compute_dtype == "float32")
                                  and not args.no_native_kernels and native_kernels_available()),
            # Which instruction path the native kernels were built with (avx512 / avx2 /
            # portable; w8a8: avx512_vnni / avx2 / portable), and the CPU's vector flags:
            # figures differ a lot between them.
            "native_kernel_path": (native_path(name, m) if native_kernels_available()
                                   else None),
            # Decode steps attend over the cache (read in place as stored) with the native
            # kernel, which reads only the filled slots; bytes_per_step counts the whole cache.
            "native_attention": bool(not args.no_native_kernels and native_kernels_available()
                                     and m.cfg.compute_dtype == "float32"),
            "cpu_vector_flags": _cpu_vector_flags(),
            "n_params": m.cfg.n_params,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "interleaved_with": [other for other in models if other != name],
            "measured_bandwidth_GB_per_s": bandwidth / 1e9,
            # Other work on this shared machine: 2.0 means both cores were busy on average.
            "load_average_1min_before_after": [load_before, load_after],
            "jax_version": jax.__version__,
            "results": results[name],
        })
    report = reports[0] if len(reports) == 1 else {"reports": reports}
    if args.json:
        print(json.dumps(report, indent=2))
    return report


def native_path(scheme: str, model: eqx.Module) -> str:
    """The instruction path the native kernel of `scheme` runs (kernels loaded); "+amx" where
    its batched products (5 rows and up) run on the AMX tile unit (int8 weights, w8a8, and
    int4 weights whose groups are whole k-steps of the unit or one per channel)."""
    kernels = load_native_kernels()
    path = kernels.w8a8_path if scheme == "w8a8" else kernels.path
    int4_groups = {leaf.group_size for leaf in jax.tree.leaves(
        model, is_leaf=lambda x: isinstance(x, Int4Weight)) if isinstance(leaf, Int4Weight)}
    on_amx = scheme in ("int8", "w8a8") or (
        scheme == "int4" and bool(int4_groups) and all(map(int4_on_amx, int4_groups)))
    return path + ("+amx" if kernels.amx and on_amx else "")


def _cpu_vector_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(flag for flag in set(flags) if flag.startswith(("avx", "amx")) or flag == "fma")


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """The rows of several `--json` reports as one Markdown table (for docs/performance.md)."""
    lines = ["| weights | LM head | kernel | layout | KV cache | batch | prefill tokens/s | "
             "decode ms/step | decode tokens/s | MB/step | GB/s | % of measured BW | BW GB/s | "
             "load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        head = "quantized" if report.get("lm_head_quantized") else "f32"
        kernel = "native" if report["native_kernel"] else "XLA"
        if report["weights"] in ("f32", "fp8"):
            kernel = "XLA"
        weights = report["weights"] + (" (bf16 compute)" if report["compute_dtype"] == "bfloat16"
                                       else "")
        load = "/".join(f"{x:.1f}" for x in report.get("load_average_1min_before_after", []))
        cache = SHORT_DTYPE_NAMES.get(report["kv_cache_dtype"], report["kv_cache_dtype"])
        for row in report["results"]:
            lines.append(
                f"| {weights} | {head} | {kernel} | {report['layout']} | {cache} | "
                f"{row['batch_size']} | "
                f"{row['prefill_tokens_per_s']:,.0f} | {row['decode_ms_per_step']:.2f} | "
                f"{row['decode_tokens_per_s']:,.1f} | {row['bytes_per_step'] / 1e6:,.0f} | "
                f"{row['achieved_GB_per_s']:.1f} | {row['percent_of_measured_bandwidth']:.0f}% | "
                f"{report['measured_bandwidth_GB_per_s']:.1f} | {load} |")
    return "\n".join(lines)


def print_markdown_table(files: list[str]) -> None:
    reports = []
    for file in files:
        with open(file) as f:
            report = json.load(f)
        reports.extend(report.get("reports", [report]))
    print(markdown_table(reports))
