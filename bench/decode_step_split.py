"""Where one decode step's time goes: matmuls, attention over the KV cache, and the rest.

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/decode_step_split.py \
        [--preset base] [--to int8] [--batch-sizes 1,16] [--cache-len 256] [--position 128] \
        [--kv-cache-dtype f32]

Runs `--steps` greedy decode steps of a random `--preset` model (weights in `--to`, the LM head
quantized too, as `bench --quantize-head`; native kernels where available; the decoding layer
layout) in one jitted `fori_loop`, as `python -m infer bench` does, with JAX's profiler on.
XLA:CPU records one trace event per executed operation (thunk); each is put in a class from
the compiled HLO:

- matmuls: the native kernels' custom calls, and XLA dots / fusions whose operands are
  weights (no cache-length axis);
- attention: operations with an axis of the cache's length (scores, mask, softmax, the
  weighted sum of values), the cache writes, and the native attention kernel;
- rest: norms, RoPE, residual adds, embedding lookup, argmax, loop bookkeeping;
- untraced: the loop's time not covered by any operation's event (dispatch between them;
  negative where XLA ran independent operations at the same time on its two threads).

Times are ms per decode step, medians over `--repeats` profiled runs; `--attention native,xla`
(the default) runs the model with the native attention kernel and with XLA's einsums,
interleaved round by round.
"""

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import tempfile
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from hpllm.kvcache import CACHE_DTYPE_ALIASES
from hpllm.quant import WITH_HEAD
from infer.kernels import use_native_kernels
from infer.loading import quantize, random_model
from infer.sampling import argmax_rows

ATTENTION_OPS = re.compile(r"bskgd,btkd|bkgst,btkd|softmax|reduce_max|exp|select_n|"
                           r"dynamic_update_slice|scatter")


def classify(hlo: str, cache_len: int, vocab: int) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (class, the JAX op it came from), for every instruction of the
    compiled module. Fusions are judged by their fused computation's body too: a cache-length
    axis or an attention op (the score / value einsums, softmax, the mask's select, the cache
    write) makes it attention; a custom call (the native kernels) or another dot, a matmul.
    An op over the vocabulary (the argmax) is rest."""
    computations: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", hlo):
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block)
        if header:
            computations[header.group(1)] = block
    cache_axis = re.compile(rf"[\[,]{cache_len}[\],]")
    vocab_axis = re.compile(rf"[\[,]{vocab}[\],]")
    classes = {}
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if not found:
            continue
        name, rest = found.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        op_name = op.group(1) if op else ""
        body = rest
        for called in re.findall(r"calls=%?([\w.\-]+)", rest):
            body += computations.get(called, "")
        if "decode_attention" in rest:  # the native attention kernel's custom call
            kind = "attention"
        elif "custom-call" in rest:
            kind = "matmuls"
        elif vocab_axis.search(body) and not re.search(r"\bdot\(", body):
            kind = "rest"
        elif cache_axis.search(body) or ATTENTION_OPS.search(op_name):
            kind = "attention"
        elif re.search(r"\bdot\(", body) or "dot_general" in op_name:
            kind = "matmuls"
        else:
            kind = "rest"
        classes[name] = (kind, "/".join(op_name.split("/")[-2:]))
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--to", default="int8", help="weight format (f32, int8, int4, w8a8)")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--cache-len", type=int, default=256)
    parser.add_argument("--position", type=int, default=128, help="first decode position")
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="f32",
                        help="the KV cache's dtype (f32 unless told: the figures recorded "
                             "before `infer`'s bf16 default were f32)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="native,xla",
                        help="attention over the cache: native (the kernel), xla, or both")
    args = parser.parse_args()
    model = random_model(args.preset)
    if args.to != "f32":
        model = quantize(model.stacked(), args.to, 128, WITH_HEAD)
    models = {kind: use_native_kernels(model.unstacked(), attention=kind == "native")
              for kind in args.attention.split(",")}

    # The cache donated, as `infer.generate.decode_chunk` does: else XLA copies it on entry.
    # (The positions are donated too, and unused: JAX says so once per compile.)
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")

    @eqx.filter_jit(donate="all-except-first")
    def chunk(model, token, cache, position):
        def step(i, carry):
            token, cache = carry
            logits, cache = model.decode(token, (position + i)[:, None], cache)
            return argmax_rows(logits[:, -1])[:, None], cache
        return jax.lax.fori_loop(0, args.steps, step, (token, cache))

    print(f"{args.preset}, {args.to} (head too), {args.kv_cache_dtype} cache of "
          f"{args.cache_len} slots, positions "
          f"{args.position}..{args.position + args.steps - 1}, load "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| attention | batch | step ms | matmuls ms | attention ms | rest ms | untraced ms |")
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        def inputs(batch=batch):  # new buffers for every call, which donates them
            return (jnp.zeros((batch, 1), jnp.int32),
                    models[next(iter(models))].allocate_cache(
                        batch, args.cache_len, CACHE_DTYPE_ALIASES[args.kv_cache_dtype]),
                    jnp.full((batch,), args.position, jnp.int32))

        classes = {}
        for kind, m in models.items():
            compiled = chunk.lower(m, *inputs()).lowered.compile()
            classes[kind] = classify(compiled.as_text(), args.cache_len, model.cfg.vocab_size)
            jax.block_until_ready(chunk(m, *inputs()))
        splits = {kind: collections.defaultdict(list) for kind in models}
        by_op = {}
        for _ in range(args.repeats):  # the variants interleaved, round by round
            for kind, m in models.items():
                by_op[kind] = profile(chunk, m, inputs(), classes[kind], args.steps,
                                      splits[kind])
        for kind in models:
            med = {part: statistics.median(values) for part, values in splits[kind].items()}
            print(f"| {kind} | {batch} | {med['step']:.2f} | {med['matmuls']:.2f} | "
                  f"{med['attention']:.2f} | {med['rest']:.2f} | {med['untraced']:.2f} |")
        for kind in models:
            heaviest = ", ".join(f"{op} ({part}) {us / 1e3 / args.steps:.2f}"
                                 for (part, op), us in by_op[kind].most_common(5))
            print(f"  heaviest ops, {kind} attention, batch {batch} (ms/step): {heaviest}")


def profile(chunk, model, inputs, classes, steps, splits):
    """One profiled run of `chunk`: appends its split (ms/step) to `splits`; returns the time
    per (class, JAX op)."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(chunk(model, *inputs))
        trace_file = next(Path(folder).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace_file))["traceEvents"]
    total, by_op = collections.Counter(), collections.Counter()
    loop = 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        # The loop's own event, or (where XLA runs the loop's iterations asynchronously and
        # that event ends early, as at batch 16) the wait for the whole program.
        if name.startswith("while") or name == "ThunkExecutor::Execute (wait for completion)":
            loop = max(loop, event["dur"])
        elif name in classes:
            total[classes[name][0]] += event["dur"]
            by_op[classes[name]] += event["dur"]
    for part in ("matmuls", "attention", "rest"):
        splits[part].append(total[part] / 1e3 / steps)
    splits["untraced"].append((loop - sum(total.values())) / 1e3 / steps)
    splits["step"].append(loop / 1e3 / steps)
    return by_op


if __name__ == "__main__":
    main()
