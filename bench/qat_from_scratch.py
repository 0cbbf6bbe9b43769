"""From scratch: float vs int8/fp8/int4 QAT vs post-training quantization (PTQ), each trained
from random weights (the fine-tuning study from one float checkpoint is bench/qat_study.py).

    flock /tmp/hpllm-bench.lock .venv/bin/python bench/qat_from_scratch.py \
        [--preset small] [--steps 150] [--seeds 0 1] [--out runs/qat-from-scratch]

For every seed, five models are trained with the same initialisation, the same batches in the
same order and the same settings, differing only in the quantizer in the forward pass:
float (no quantizer), int8 QAT (int8 activations per token, weights per channel), fp8 QAT with
delayed and with current scaling (e4m3), and int4-weight QAT (group-wise int4 weights, float
activations). Every model then runs on the same fixed held-out batches
(`train.batches.eval_batches`; loss = sum(loss * mask) / sum(mask)):
- the float model as trained, and after PTQ to each inference format (`quantize_weights`);
- each QAT model as trained (its fake-quant forward) and after conversion to its format.
The gap is paired per seed (row's loss minus the float model's loss of the same seed), then
averaged over seeds. All models compute in `--dtype` (default bf16), the "float" baseline is
therefore bf16 matmuls.

Each run is set up by the trainer's own `train.run.build_run` and stepped by
`train.loop.train_steps`, so it is exactly what `python -m train` would do with those settings
(on one device, without checkpoints); each run folder holds config.json and
metrics.jsonl in the trainer's format, so `python -m train plot` draws them.

Outputs in --out: results.md (the table), results.json (every per-seed number and the
settings), runs/<model>-seed<N>/ (config.json, metrics.jsonl), loss_curves.png (seed of the
first run, if matplotlib is installed).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from hpllm.config import PRESETS
from hpllm.errors import PathError, UserError
from hpllm.locking import LOCK_NAME, folder_lock
from hpllm.model import Transformer
from hpllm.outputs import check_output
from hpllm.quant import QuantConfig, quantize_weights
from hpllm.tokenizer import Tokenizer
from train.loop import Progress, eval_record, train_steps
from train.run import Run, build_run
from train.settings import Settings, UsageError, validate
from train.sources import DEFAULT_DATA, get_tokenizer, open_splits

# Training runs: name -> (row label, QuantConfig fields). int4w trains with the group size of
# its inference format (--int4-group-size).
TRAIN_MODES = {
    "float": ("float", {"mode": "none"}),
    "int8-qat": ("int8 QAT", {"mode": "int8"}),
    "fp8-qat-delayed": ("fp8 QAT (delayed scaling)", {"mode": "fp8", "scaling": "delayed"}),
    "fp8-qat-current": ("fp8 QAT (current scaling)", {"mode": "fp8", "scaling": "current"}),
    "int4w-qat": ("int4-weight QAT", {"mode": "int4w"}),
}


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One table row: the model trained as `run`, converted to `scheme` (None: as trained)."""

    label: str
    run: str
    scheme: str | None = None
    group_size: int = 128


def eval_rows(int4_group: int) -> list[EvalRow]:
    return [
        EvalRow("float (bf16 matmuls, reference)", "float"),
        EvalRow("float -> PTQ int8 (weight-only)", "float", "int8"),
        EvalRow("float -> PTQ w8a8 (int8 weights + activations)", "float", "w8a8"),
        EvalRow("float -> PTQ fp8 e4m3 (weight-only)", "float", "fp8"),
        EvalRow("float -> PTQ int4 g32", "float", "int4", 32),
        EvalRow("float -> PTQ int4 g128", "float", "int4", 128),
        EvalRow("int8 QAT, as trained (fake-quant)", "int8-qat"),
        EvalRow("int8 QAT -> int8 (weight-only)", "int8-qat", "int8"),
        EvalRow("int8 QAT -> w8a8", "int8-qat", "w8a8"),
        EvalRow("fp8 QAT delayed, as trained (fake-quant)", "fp8-qat-delayed"),
        EvalRow("fp8 QAT delayed -> fp8", "fp8-qat-delayed", "fp8"),
        EvalRow("fp8 QAT current, as trained (fake-quant)", "fp8-qat-current"),
        EvalRow("fp8 QAT current -> fp8", "fp8-qat-current", "fp8"),
        EvalRow(f"int4w QAT g{int4_group}, as trained (fake-quant)", "int4w-qat"),
        EvalRow(f"int4w QAT g{int4_group} -> int4 g{int4_group}", "int4w-qat", "int4",
                int4_group),
    ]


def train_one(settings: Settings, qcfg: QuantConfig, tokenizer: Tokenizer, run_dir: Path,
              log: Callable[[str], None]) -> tuple[Run, Transformer, float]:
    """Train one model as `python -m train` would (same `build_run`; one device, no
    checkpoints); writes run_dir/config.json and metrics.jsonl. Returns (run, model, training
    seconds)."""
    run = build_run(settings, quant=qcfg, tokenizer=tokenizer, devices=jax.devices()[:1])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(run.config(), indent=2) + "\n")
    batches = run.batches()
    progress = Progress(settings.steps, stream=sys.stderr, every=max(settings.steps // 5, 1))
    state = run.state
    start = time.perf_counter()
    try:
        with open(run_dir / "metrics.jsonl", "w") as metrics_file:
            for state, record in train_steps(run.state, run.step_fn, batches, run.put_batch,
                                             total_steps=settings.steps,
                                             grad_accum=settings.grad_accum):
                step = record["step"]
                if settings.eval_every and (step % settings.eval_every == 0
                                            or step == settings.steps):
                    record |= eval_record(run.evaluate(state.model()))
                metrics_file.write(json.dumps(record) + "\n")
                progress.update(step, record["loss"], record["tokens_per_s"],
                                record.get("eval_loss"))
    finally:
        batches.close()
    seconds = time.perf_counter() - start
    log(f"  trained {run_dir.name} in {seconds:.0f} s")
    return run, state.model(), seconds


def evaluate_row(run: Run, model: Transformer, row: EvalRow) -> float:
    if row.scheme is not None:
        model = quantize_weights(model, row.scheme, group_size=row.group_size)
    return run.evaluate(model)


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[EvalRow], losses: dict[str, dict[int, float]], seeds: list[int]
              ) -> list[dict[str, Any]]:
    """Per row: mean and spread over seeds of the loss, perplexity and paired gap to float."""
    reference = losses[rows[0].label]
    summary = []
    for row in rows:
        per_seed = [losses[row.label][s] for s in seeds]
        gaps = [losses[row.label][s] - reference[s] for s in seeds]
        ppl = [math.exp(min(v, 50.0)) for v in per_seed]
        summary.append({
            "label": row.label, "run": row.run, "scheme": row.scheme,
            "group_size": row.group_size if row.scheme == "int4" else None,
            "eval_loss": {"mean": statistics.fmean(per_seed), "sd": spread(per_seed),
                          "per_seed": per_seed},
            "perplexity": {"mean": statistics.fmean(ppl), "sd": spread(ppl), "per_seed": ppl},
            "gap_to_float": {"mean": statistics.fmean(gaps), "sd": spread(gaps),
                             "per_seed": gaps},
        })
    return summary


def markdown_table(summary: list[dict[str, Any]], n_seeds: int) -> str:
    pm = " ± sd" if n_seeds > 1 else ""
    lines = [f"| model | eval loss{pm} | perplexity{pm} | gap to float (loss){pm} |",
             "|---|---|---|---|"]

    def cell(value: dict[str, float], fmt: str, signed: bool = False) -> str:
        text = format(value["mean"], ("+" if signed else "") + fmt)
        return text + (f" ± {value['sd']:{fmt}}" if n_seeds > 1 else "")

    for entry in summary:
        lines.append(f"| {entry['label']} | {cell(entry['eval_loss'], '.4f')} | "
                     f"{cell(entry['perplexity'], '.2f')} | "
                     f"{cell(entry['gap_to_float'], '.4f', True)} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on "
            f"{jax.devices()[0].platform}")


def qat_vs_ptq(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(format, QAT row, PTQ row) pairs present in `rows`: the same inference format reached
    by QAT and by post-training quantization of the float model."""
    labels = {row["label"] for row in rows}
    pairs = [("int8 weight-only", "int8 QAT -> int8 (weight-only)",
              "float -> PTQ int8 (weight-only)"),
             ("w8a8", "int8 QAT -> w8a8", "float -> PTQ w8a8 (int8 weights + activations)"),
             ("fp8 e4m3 weights (QAT delayed)", "fp8 QAT delayed -> fp8",
              "float -> PTQ fp8 e4m3 (weight-only)"),
             ("fp8 e4m3 weights (QAT current)", "fp8 QAT current -> fp8",
              "float -> PTQ fp8 e4m3 (weight-only)")]
    for row in rows:
        if row["run"] == "int4w-qat" and row["scheme"] == "int4":
            group = row["group_size"]
            pairs.append((f"int4 g{group}", row["label"], f"float -> PTQ int4 g{group}"))
    return [pair for pair in pairs if pair[1] in labels and pair[2] in labels]


def comparison_table(results: dict[str, Any]) -> str:
    """QAT minus PTQ eval loss per inference format, paired per seed (negative: QAT better)."""
    by_label = {row["label"]: row for row in results["rows"]}
    n_seeds = len(results["settings"]["seeds"])
    pm = " ± sd" if n_seeds > 1 else ""
    lines = [f"| inference format | QAT gap to float{pm} | PTQ gap to float{pm} | "
             f"QAT - PTQ (loss){pm} | seeds where QAT is better |", "|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        text = f"{statistics.fmean(values):+.4f}"
        return text + (f" ± {spread(values):.4f}" if n_seeds > 1 else "")

    for name, qat, ptq in qat_vs_ptq(results["rows"]):
        q = by_label[qat]["gap_to_float"]["per_seed"]
        p = by_label[ptq]["gap_to_float"]["per_seed"]
        diff = [a - b for a, b in zip(q, p, strict=True)]
        better = sum(d < 0 for d in diff)
        lines.append(f"| {name} | {cell(q)} | {cell(p)} | {cell(diff)} | "
                     f"{better} of {len(diff)} |")
    return "\n".join(lines) + "\n"


def update_doc(out: Path, doc: Path, block_name: str = "qat-study") -> None:
    """Rewrite the block `<!-- NAME:start -->...<!-- NAME:end -->` of `doc` from
    out/results.json; copy the figure beside the doc as NAME.png."""
    start, end = f"<!-- {block_name}:start -->", f"<!-- {block_name}:end -->"
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    lines = [start,
             "<!-- generated by bench/qat_from_scratch.py --update-doc; do not edit by hand -->",
             "",
             f"Command: `flock /tmp/hpllm-bench.lock .venv/bin/python {results['command']}`; "
             f"doc block: `--update-doc {doc} --doc-block {block_name}`",
             "",
             f"Machine: {results['machine']}; shared with other contributors' jobs while it "
             f"ran ({results['wall_seconds'] / 60:.0f} minutes in all).",
             "",
             f"Setting: `{settings['preset']}` preset ({settings['n_params'] / 1e6:.1f}M "
             f"parameters), {settings['steps']} steps of {settings['batch_size']} x "
             f"{settings['seq_len']} tokens, peak lr {settings['lr']}, warmup "
             f"{settings['warmup']}, compute dtype {settings['dtype']}, seeds "
             f"{', '.join(map(str, settings['seeds']))}; evaluation on "
             f"{settings['eval_batches']} fixed held-out batches ({settings['eval_tokens']} "
             f"tokens).",
             "",
             "### Every model on the held-out batches",
             "",
             markdown_table(results["rows"], len(settings["seeds"])),
             "### QAT against PTQ, format by format",
             "",
             comparison_table(results)]
    figure = out / "loss_curves.png"
    if figure.exists():
        target = doc.with_name(f"{block_name}.png")
        target.write_bytes(figure.read_bytes())
        lines += [f"![training and held-out loss curves]({target.name})", ""]
    lines.append(end)
    block = "\n".join(lines)
    text = doc.read_text() if doc.exists() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        raise UsageError(f"{doc} has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(head + block + tail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/qat_from_scratch.py",
        description="Float vs QAT vs PTQ: train five models per seed on identical data, "
                    "evaluate every quantized variant on the same held-out batches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds (model init and data order); one set of runs per seed")
    parser.add_argument("--modes", nargs="+", default=list(TRAIN_MODES),
                        choices=list(TRAIN_MODES), help="training runs ('float' is required)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16"],
                        help="compute dtype of every model (the float baseline's matmuls)")
    parser.add_argument("--int4-group-size", type=int, default=128,
                        help="int4 group size of the int4-weight QAT run and its conversion")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="held-out loss during training every N steps (for the curves)")
    parser.add_argument("--eval-batches", type=int, default=16,
                        help="fixed held-out batches every model is evaluated on")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="training text (default: the bundled corpus)")
    parser.add_argument("--out", default="runs/qat-from-scratch", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    parser.add_argument("--update-doc", metavar="DOC.md", default=None,
                        help="instead of running: fill DOC.md's generated block from "
                             "--out's results.json (and copy the figure beside it)")
    parser.add_argument("--doc-block", default="qat-study", metavar="NAME",
                        help="with --update-doc: the block <!-- NAME:start/end --> to fill; "
                             "the figure is copied to NAME.png")
    return parser


def _check_out(args: argparse.Namespace) -> None:
    """A new or empty folder only (never --data): a study writes several files and runs/."""
    check_output(args.out, inputs=[args.data] if Path(args.data).exists() else [],
                 replaceable=lambda path: (path / "runs").exists(), kind="study",
                 force_flag=None)


def run_study(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Check --out, then run the study with the folder locked against a second study."""
    if "float" not in args.modes:
        raise UsageError("--modes must include 'float' (the reference of every gap)")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--seeds must be distinct")
    _check_out(args)
    out = Path(args.out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathError.from_os_error(error, out, "write") from error
    try:
        with folder_lock(out):
            if any(p.name != LOCK_NAME for p in out.iterdir()):
                _check_out(args)  # another study filled it meanwhile
            return _study(args, log, out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only while still empty: a failed start leaves nothing behind
        raise


def _study(args: argparse.Namespace, log: Callable[[str], None], out: Path) -> dict[str, Any]:
    base = Settings(preset=args.preset, data=args.data, seq_len=args.seq_len,
                    batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                    warmup=min(100, args.steps // 10), eval_every=args.eval_every,
                    eval_batches=args.eval_batches, save_every=0, dtype=args.dtype)
    cfg = validate(base)
    rows = [r for r in eval_rows(args.int4_group_size) if r.run in args.modes]

    splits = open_splits(args.data)
    start = time.perf_counter()
    # One tokenizer for every run: the same token ids, so the losses are comparable.
    tokenizer = get_tokenizer("train", splits.train, cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    log(f"tokenizer ({tokenizer.vocab_size} ids) in {time.perf_counter() - start:.0f} s")

    losses: dict[str, dict[int, float]] = {row.label: {} for row in rows}
    train_seconds: dict[str, dict[int, float]] = {mode: {} for mode in args.modes}
    run_dirs: dict[int, list[str]] = {}
    for seed in args.seeds:
        run_dirs[seed] = []
        # The modes of one seed are trained back to back, so a change of machine load during
        # the study falls on every mode of some seed rather than on one mode only.
        for mode in args.modes:
            label, fields = TRAIN_MODES[mode]
            if mode == "int4w-qat":
                fields = {**fields, "group_size": args.int4_group_size}
            qcfg = QuantConfig(**fields)
            run_dir = out / "runs" / f"{mode}-seed{seed}"
            log(f"seed {seed}: training {label}")
            run, model, seconds = train_one(
                dataclasses.replace(base, seed=seed, quant=qcfg.name,
                                    quant_group_size=qcfg.group_size), qcfg, tokenizer,
                run_dir, log)
            # Every run packs the same held-out text with the same tokenizer and shapes:
            # every model is evaluated on the same batches.
            n_eval_tokens = int(sum(float(b.loss_mask.sum()) for b in run.held_out))
            train_seconds[mode][seed] = seconds
            run_dirs[seed].append(str(run_dir))
            for row in rows:
                if row.run == mode:
                    losses[row.label][seed] = evaluate_row(run, model, row)
                    log(f"  {row.label}: eval loss {losses[row.label][seed]:.4f}")
            del run, model
            eqx.clear_caches()  # each mode compiles its own step; keep memory flat

    summary = summarize(rows, losses, args.seeds)
    table = markdown_table(summary, len(args.seeds))
    results = {
        "command": " ".join(["bench/qat_from_scratch.py", *args.argv]),
        "machine": machine(),
        "settings": {**dataclasses.asdict(base), "seeds": args.seeds, "modes": args.modes,
                     "int4_group_size": args.int4_group_size,
                     "n_params": cfg.n_params, "eval_tokens": n_eval_tokens},
        "rows": summary,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "runs": run_dirs,
    }
    if not args.no_plot:
        try:
            from train.plot import PlotError, plot_runs
            first = args.seeds[0]
            plot_runs([Path(r) for r in run_dirs[first]], out / "loss_curves.png",
                      title=f"{args.preset} preset, {args.steps} steps, seed {first}")
            results["figure"] = str(out / "loss_curves.png")
        except PlotError as error:
            log(f"no figure: {error}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n" + comparison_table(results))
    return {"results": results, "table": table}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.update_doc:
        try:
            update_doc(Path(args.out), Path(args.update_doc), args.doc_block)
        except (OSError, KeyError, json.JSONDecodeError, UsageError) as error:
            print(f"error: --update-doc: {error}", file=sys.stderr)
            return 2
        log(f"updated {args.update_doc}")
        return 0
    try:
        done = run_study(args, log)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing results into --out: full disk, permissions
        print(f"error: cannot write {error.filename or args.out}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    print(done["table"] + "\n" + comparison_table(done["results"]), end="")
    log(f"wrote {Path(args.out) / 'results.md'}, results.json; "
        f"{done['results']['wall_seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
