"""Does QAT fine-tuning pay off? PTQ vs float fine-tune + PTQ vs QAT fine-tune, from one float
checkpoint, in the formats where post-training quantization (PTQ) hurts.

    grep tinyshakespeare data/validation.jsonl > runs/shakespeare-held-out.jsonl
    flock /tmp/hpllm-bench.lock .venv/bin/python bench/qat_study.py \
        [--preset tiny] [--base-steps 4000] [--steps 200] [--seeds 1 2 3 4] \
        [--group-size 32] [--eval-data runs/shakespeare-held-out.jsonl] [--out runs/qat-study]

(docs/qat-study.md gives the command of its figures and why that setting.)

1. One float model is trained (`--base-steps`, peak `--base-lr`) and checkpointed. At each of
   its evaluations the int4 PTQ gap is recorded too, to show where it stops shrinking.
2. From that checkpoint (`--init-from`), for every fine-tuning seed (the data order):
   - the control: `--steps` steps without a quantizer, then PTQ to every format;
   - per format F: `--steps` steps with F's quantizer in the forward pass (QAT), then F.
   Every fine-tune of a seed sees the same batches; all use peak `--lr` with the trainer's
   schedule (linear warmup over `--warmup` steps, cosine decay to 10% of the peak) and a fresh
   AdamW.
3. Every model in every format is evaluated on the first `--eval-batches` held-out batches of
   the training data, and on every document of `--eval-data` (any path `--data` accepts;
   give text the model never trained on).

A format is converted with `hpllm.quant.quantize_weights` where an inference op computes it
(int4, w4a8); formats that no inference op computes yet (int8 with one activation scale per
tensor, fp8 e4m3 weights and activations per tensor, int3/int2 weights) are evaluated by their
fake-quant forward pass, which is the same arithmetic in float32 (tests show conversion and
fake quantization agree to 1e-5 nats or exactly).

Each run is built by `train.run.build_run` (the function `python -m train` uses; the
fine-tunes through `Settings.init_from`, i.e. `--init-from`) and stepped by
`train.loop.train_steps`. Outputs in --out: results.json (every number and the settings),
results.md (the tables), base/ (the float run: config.json, metrics.jsonl, checkpoints/),
runs/<name>-seed<N>/ (config.json, metrics.jsonl of each fine-tune), study.png (the figure).
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
from hpllm.quant import (
    GROUP_SIZES,
    QuantConfig,
    quantize_for_training,
    quantize_weights,
    strip_training_quant,
)
from train.batches import eval_batches
from train.checkpointing import Checkpointer
from train.loop import Progress, eval_record, train_steps
from train.run import Run, build_run
from train.settings import Settings, UsageError, validate
from train.sources import DEFAULT_DATA, Documents, get_tokenizer, iterate, open_splits

# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantized format: the QAT config that trains for it (`quant`: a `--quant` name and
    QuantConfig fields), and the `quantize_weights` scheme that converts to it (None: no
    inference op yet; evaluated by the fake-quant forward of `quant`)."""

    label: str
    quant: str
    fields: dict[str, Any]
    scheme: str | None

    def qcfg(self) -> QuantConfig:
        return QuantConfig.named(self.quant, **self.fields)

    @property
    def group_size(self) -> int:
        return self.fields.get("group_size", 128)

    def apply(self, model: Transformer) -> Transformer:
        """`model` (float or QAT-trained) in this format."""
        model = strip_training_quant(model)
        if self.scheme is not None:
            return quantize_weights(model, self.scheme, group_size=self.group_size)
        return quantize_for_training(model, self.qcfg())


def formats(group: int) -> dict[str, Format]:
    g = f"g{group}" if group else "per channel"
    return {
        "int8-tensor": Format("int8 w8a8, one activation scale per tensor", "int8",
                              {"activations": "tensor"}, None),
        "fp8-tensor": Format("fp8 e4m3 weights and activations, per tensor", "fp8-current",
                             {}, None),
        "int4-channel": Format("int4 weights, per channel", "int4w", {"group_size": 0}, "int4"),
        "int4-group": Format(f"int4 weights, {g}", "int4w", {"group_size": group}, "int4"),
        "w4a8": Format(f"w4a8 (int4 {g} weights, int8 activations per token)", "w4a8",
                       {"group_size": group}, "w4a8"),
        "int3-group": Format(f"int3 weights, {g}", "int4w",
                             {"group_size": group, "weight_bits": 3}, None),
        "int2-group": Format(f"int2 weights, {g}", "int4w",
                             {"group_size": group, "weight_bits": 2}, None),
    }


FORMAT_NAMES = tuple(formats(128))


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """Two-sided 95% t interval of the mean of paired differences (needs 2 or more)."""
    n = len(diffs)
    if n < 2:
        return (math.nan, math.nan)
    df = n - 1
    t = T_975.get(df) or T_975[max(k for k in T_975 if k <= df)]  # conservative between rows
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    mean = statistics.fmean(diffs)
    return (mean - half, mean + half)


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------- training


def train_run(run: Run, run_dir: Path, log: Callable[[str], None],
          on_eval: Callable[[Transformer], dict[str, float]] | None = None
          ) -> tuple[Any, list[float]]:
    """Step `run` to its last step as `python -m train` would (one device); writes
    run_dir/config.json and metrics.jsonl. Returns (final state, seconds of each step)."""
    s = run.settings
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(run.config(), indent=2) + "\n")
    batches = run.batches()
    progress = Progress(s.steps, stream=sys.stderr, every=max(s.steps // 4, 1))
    state, step_seconds = run.state, []
    tokens = s.batch_size * s.seq_len
    try:
        with open(run_dir / "metrics.jsonl", "w") as metrics_file:
            for state, record in train_steps(run.state, run.step_fn, batches, run.put_batch,
                                             total_steps=s.steps, grad_accum=s.grad_accum):
                step = record["step"]
                step_seconds.append(tokens / record["tokens_per_s"])
                if s.eval_every and (step % s.eval_every == 0 or step == s.steps):
                    model = state.model()
                    record |= eval_record(run.evaluate(model))
                    if on_eval is not None:
                        record |= on_eval(model)
                metrics_file.write(json.dumps(record) + "\n")
                progress.update(step, record["loss"], record["tokens_per_s"],
                                record.get("eval_loss"))
    finally:
        batches.close()
    log(f"  {run_dir.name}: {s.steps} steps in {sum(step_seconds):.0f} s")
    return state, step_seconds


def median_step_seconds(step_seconds: list[float]) -> float:
    """Median seconds per step, the first (compiling) step left out."""
    return statistics.median(step_seconds[1:] if len(step_seconds) > 1 else step_seconds)


# ------------------------------------------------------------------------------- results


def summarize(results: dict[str, Any], eval_set: str) -> list[dict[str, Any]]:
    """Per format on `eval_set`: PTQ cost of the base, control and QAT losses, the paired
    QAT - control difference with its 95% t interval, and the share of the control's
    quantization gap that QAT recovers."""
    losses = results["losses"][eval_set]
    base_float = losses["base"]["float"]
    seeds = [str(s) for s in results["settings"]["seeds"]]
    control_float = [losses["control"][s]["float"] for s in seeds]
    rows = []
    for name in results["settings"]["formats"]:
        ptq = losses["base"][name]
        control = [losses["control"][s][name] for s in seeds]
        qat = [losses[f"qat-{name}"][s] for s in seeds]
        diffs = [q - c for q, c in zip(qat, control, strict=True)]
        control_gap = statistics.fmean(c - f for c, f in zip(control, control_float,
                                                            strict=True))
        mean_diff = statistics.fmean(diffs)
        low, high = t_interval(diffs)
        rows.append({
            "format": name, "label": results["labels"][name],
            "ptq_gap": ptq - base_float, "ptq_gap_relative": (ptq - base_float) / base_float,
            "control": {"mean": statistics.fmean(control), "sd": spread(control),
                        "per_seed": control},
            "qat": {"mean": statistics.fmean(qat), "sd": spread(qat), "per_seed": qat},
            "control_gap": control_gap,
            "qat_minus_control": {"mean": mean_diff, "sd": spread(diffs), "low": low,
                                  "high": high, "per_seed": diffs},
            "recovered": -mean_diff / control_gap if control_gap > 0 else math.nan,
            "qat_vs_float_control_relative": statistics.fmean(
                (q - f) / f for q, f in zip(qat, control_float, strict=True)),
        })
    return rows


def verdict(row: dict[str, Any]) -> str:
    """The issue's target, read off one row."""
    if row["ptq_gap_relative"] < 0.01:
        return "PTQ costs < 1%"
    d = row["qat_minus_control"]
    if math.isnan(d["high"]):
        return "no interval (one seed)"
    excludes_zero = d["high"] < 0
    if row["recovered"] >= 0.5 and excludes_zero:
        return "met"
    return ("not met: " + ("recovers < half" if not row["recovered"] >= 0.5 else "")
            + (" and " if not row["recovered"] >= 0.5 and not excludes_zero else "")
            + ("interval includes 0" if not excludes_zero else ""))


def table(rows: list[dict[str, Any]], n_seeds: int) -> str:
    lines = ["| format | PTQ of base: gap (% of float) | control: float FT -> PTQ | "
             "QAT FT -> format | QAT - control [95% CI] | control gap recovered | "
             "QAT vs float control | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["qat_minus_control"]
        ci = f"[{d['low']:+.4f}, {d['high']:+.4f}]" if n_seeds > 1 else "(one seed)"
        lines.append(
            f"| {r['label']} | {r['ptq_gap']:+.4f} ({100 * r['ptq_gap_relative']:.2f}%) | "
            f"{r['control']['mean']:.4f} ± {r['control']['sd']:.4f} | "
            f"{r['qat']['mean']:.4f} ± {r['qat']['sd']:.4f} | {d['mean']:+.4f} {ci} | "
            f"{100 * r['recovered']:.0f}% | {100 * r['qat_vs_float_control_relative']:+.2f}% | "
            f"{verdict(r)} |")
    return "\n".join(lines) + "\n"


def cost_table(results: dict[str, Any]) -> str:
    seconds = results["step_seconds"]
    float_step = statistics.fmean(seconds["control"].values())
    lines = ["| fine-tune | median step (ms), mean over seeds | vs float fine-tune |",
             "|---|---|---|", f"| float (control) | {1000 * float_step:.1f} | 1.00x |"]
    for name in results["settings"]["formats"]:
        step = statistics.fmean(seconds[f"qat-{name}"].values())
        lines.append(f"| QAT {results['labels'][name]} | {1000 * step:.1f} | "
                     f"{step / float_step:.2f}x |")
    return "\n".join(lines) + "\n"


def base_table(results: dict[str, Any]) -> str:
    lines = ["| base step | held-out loss (float) | int4 per-channel PTQ gap | "
             f"{results['labels']['int4-group']} PTQ gap |", "|---|---|---|---|"]
    for point in results["base_curve"]:
        lines.append(f"| {point['step']} | {point['eval_loss']:.4f} | "
                     f"{point['ptq_int4_channel'] - point['eval_loss']:+.4f} | "
                     f"{point['ptq_int4_group'] - point['eval_loss']:+.4f} |")
    return "\n".join(lines) + "\n"


def report(results: dict[str, Any]) -> str:
    n = len(results["settings"]["seeds"])
    parts = ["### Base model: held-out loss and int4 PTQ gap while it trained\n",
             base_table(results)]
    for eval_set, title in (("held_out", "the training data's held-out split"),
                            ("eval_data", "--eval-data")):
        if eval_set in results["losses"]:
            parts += [f"### Losses on {title} ({results['eval_tokens'][eval_set]} tokens)\n",
                      table(summarize(results, eval_set), n)]
    parts += ["### Cost: step time of the fine-tunes (same run, same machine)\n",
              cost_table(results)]
    return "\n".join(parts)


def plot(results: dict[str, Any], out: Path, run_dirs: dict[str, Path]) -> None:
    """Left: QAT - control per format with its 95% interval, and the control's quantization
    gap, on the held-out split. Right: training loss of the fine-tunes of the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results, "held_out")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    ys = list(range(len(rows)))
    left.barh([y + 0.2 for y in ys], [r["control_gap"] for r in rows], height=0.4,
              color="0.75", label="control: gap to its float loss")
    means = [r["qat_minus_control"]["mean"] for r in rows]
    errors = [[m - r["qat_minus_control"]["low"] for m, r in zip(means, rows, strict=True)],
              [r["qat_minus_control"]["high"] - m for m, r in zip(means, rows, strict=True)]]
    if len(results["settings"]["seeds"]) < 2:
        errors = None
    left.errorbar(means, [y - 0.2 for y in ys], xerr=errors, fmt="o", color="C3", capsize=3,
                  label="QAT - control, 95% CI")
    left.axvline(0, color="k", lw=0.8)
    left.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("held-out loss difference (nats)")
    left.legend(fontsize=8)
    for name, run_dir in run_dirs.items():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                   .splitlines()]
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        k = max(len(losses) // 20, 1)  # running mean: the per-batch loss is noisy
        smooth = [statistics.fmean(losses[max(i - k + 1, 0):i + 1]) for i in range(len(losses))]
        right.plot(steps, smooth, lw=1.6 if name == "control" else 1.0,
                   color="k" if name == "control" else None,
                   label="float (control)" if name == "control" else results["labels"][name])
    right.set_xlabel("fine-tune step")
    right.set_ylabel(f"training loss (forward as trained; running mean of {k})")
    right.legend(fontsize=7)
    settings = results["settings"]
    fig.suptitle(f"{settings['preset']}: base {settings['base_steps']} steps, fine-tunes "
                 f"{settings['steps']} steps, seeds {', '.join(map(str, settings['seeds']))}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- the study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/qat_study.py",
        description="QAT fine-tuning vs float fine-tuning + PTQ vs PTQ, all from one float "
                    "checkpoint, per quantized format and fine-tuning seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--base-steps", type=int, default=4000,
                        help="training steps of the float base model")
    parser.add_argument("--base-lr", type=float, default=2e-3,
                        help="peak learning rate of the base model")
    parser.add_argument("--base-eval-every", type=int, default=500,
                        help="held-out loss and int4 PTQ gap of the base every N steps")
    parser.add_argument("--steps", type=int, default=200,
                        help="fine-tuning steps (the same for the control and every QAT run)")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak fine-tuning learning rate")
    parser.add_argument("--warmup", type=int, default=None,
                        help="fine-tuning warmup steps (default: steps/10, at most 100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="fine-tuning seeds (data order); at least 2 for an interval")
    parser.add_argument("--base-seed", type=int, default=0,
                        help="seed of the base model (initialisation and data order)")
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_NAMES),
                        choices=FORMAT_NAMES, help="quantized formats to study")
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                        help="group size of the group-wise formats (int4, w4a8, int3, int2)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                        help="compute dtype of every model")
    parser.add_argument("--eval-batches", type=int, default=24,
                        help="held-out batches of the training data every model runs on")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="training text (default: the bundled corpus)")
    parser.add_argument("--eval-data", default=None, metavar="PATH",
                        help="a second corpus, every document of it evaluated (any path "
                             "--data accepts)")
    parser.add_argument("--out", default="runs/qat-study", help="output folder (new or empty)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    parser.add_argument("--update-doc", metavar="DOC.md", default=None,
                        help="instead of running: fill DOC.md's generated block from "
                             "--out's results.json (and copy the figure beside it)")
    parser.add_argument("--doc-block", default="qat-finetune", metavar="NAME",
                        help="with --update-doc: the block <!-- NAME:start/end --> to fill; "
                             "the figure is copied to NAME.png")
    return parser


def _check_out(args: argparse.Namespace) -> None:
    inputs = [p for p in (args.data, args.eval_data) if p is not None and Path(p).exists()]
    check_output(args.out, inputs=inputs, replaceable=lambda path: (path / "runs").exists(),
                 kind="study", force_flag=None)


def run_study(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Check the arguments and --out, then run the study with the folder locked."""
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--seeds must be distinct")
    for name in ("base_steps", "steps", "eval_batches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
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


def whole_corpus(path: str) -> Documents:
    """Every document of `path` (its training and held-out parts alike)."""
    splits = open_splits(path)
    return Documents(lambda: (text for part in (splits.train, splits.validation)
                              for text in iterate(part)), f"{path}, every document")


def _study(args: argparse.Namespace, log: Callable[[str], None], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    fmts = {name: f for name, f in formats(args.group_size).items() if name in args.formats}
    base = Settings(preset=args.preset, data=args.data, seq_len=args.seq_len,
                    batch_size=args.batch_size, steps=args.base_steps, lr=args.base_lr,
                    warmup=min(100, args.base_steps // 10), eval_every=args.base_eval_every,
                    eval_batches=args.eval_batches,
                    save_every=0, dtype=args.dtype, seed=args.base_seed)
    cfg = validate(base)
    splits = open_splits(args.data)
    # One tokenizer for every run: the same token ids, so the losses are comparable.
    tokenizer = get_tokenizer("train", splits.train, cfg.vocab_size)
    tokenizer.save(out / "tokenizer.json")
    devices = jax.devices()[:1]

    # 1. The float base model; the int4 PTQ gap is tracked while it trains.
    log(f"base: {args.base_steps} steps of {args.preset}")
    base_run = build_run(base, tokenizer=tokenizer, devices=devices)
    int4 = formats(args.group_size)

    def ptq_int4(model: Transformer) -> dict[str, float]:
        return {"ptq_int4_channel": base_run.evaluate(int4["int4-channel"].apply(model)),
                "ptq_int4_group": base_run.evaluate(int4["int4-group"].apply(model))}

    base_dir = out / "base"
    state, _ = train_run(base_run, base_dir, log, on_eval=ptq_int4)
    checkpoint = Checkpointer(base_dir, keep=1, config=base_run.config(),
                              tokenizer_files=tokenizer.files).save(
        state, {"note": "the study's base model; not meant to be resumed"})
    base_curve = [r for r in map(json.loads, (base_dir / "metrics.jsonl").read_text()
                                 .splitlines()) if "ptq_int4_channel" in r]
    eval_sets = {"held_out": base_run.held_out}
    if args.eval_data is not None:
        eval_sets["eval_data"] = eval_batches(whole_corpus(args.eval_data), tokenizer,
                                              args.seq_len, args.batch_size)
    eval_tokens = {k: int(sum(float(b.loss_mask.sum()) for b in v))
                   for k, v in eval_sets.items()}

    def losses_of(model: Transformer, names: list[str]) -> dict[str, dict[str, float]]:
        """{eval set: {"float" or format name: loss}} of `model` as float and in `names`."""
        found: dict[str, dict[str, float]] = {k: {} for k in eval_sets}
        for name in ["float", *names]:
            shaped = strip_training_quant(model) if name == "float" else fmts[name].apply(model)
            for key, batches in eval_sets.items():
                found[key][name] = dataclasses.replace(base_run, held_out=batches
                                                       ).evaluate(shaped)
        return found

    losses: dict[str, dict[str, Any]] = {k: {"control": {}} for k in eval_sets}
    for key, value in losses_of(state.model(), list(fmts)).items():
        losses[key]["base"] = value
    base_loss = losses["held_out"]["base"]
    for name in fmts:
        log(f"  PTQ of base to {fmts[name].label}: {base_loss[name]:.4f} (float "
            f"{base_loss['float']:.4f})")
    del state
    eqx.clear_caches()

    # 2. Fine-tunes from the checkpoint: per seed the control, then one QAT run per format;
    # back to back, so a change of machine load falls on every run of some seed.
    warmup = min(100, args.steps // 10) if args.warmup is None else args.warmup
    tune = dataclasses.replace(base, steps=args.steps, lr=args.lr, warmup=warmup,
                               eval_every=0, init_from=str(checkpoint))
    step_seconds: dict[str, dict[str, float]] = {"control": {}} | {f"qat-{n}": {} for n in fmts}
    first_seed_runs: dict[str, Path] = {}
    for seed in args.seeds:
        for name in ["control", *fmts]:
            if name == "control":
                settings, qcfg = dataclasses.replace(tune, seed=seed), QuantConfig()
            else:
                qcfg = fmts[name].qcfg()
                settings = dataclasses.replace(tune, seed=seed, quant=qcfg.name,
                                               quant_group_size=qcfg.group_size)
            run_name = name if name == "control" else f"qat-{name}"
            run = build_run(settings, quant=qcfg, tokenizer=tokenizer, devices=devices)
            run_dir = out / "runs" / f"{run_name}-seed{seed}"
            state, seconds = train_run(run, run_dir, log)
            step_seconds[run_name][str(seed)] = median_step_seconds(seconds)
            if seed == args.seeds[0]:
                first_seed_runs[name] = run_dir
            found = losses_of(state.model(), list(fmts) if name == "control" else [name])
            for key, value in found.items():
                if name == "control":
                    losses[key]["control"][str(seed)] = value
                else:
                    losses[key].setdefault(run_name, {})[str(seed)] = value[name]
            if name != "control":
                log(f"  seed {seed} {fmts[name].label}: QAT {found['held_out'][name]:.4f}, "
                    f"control {losses['held_out']['control'][str(seed)][name]:.4f}")
            del run, state
            eqx.clear_caches()  # each run compiles its own step; keep memory flat

    settings_record = {**dataclasses.asdict(tune), "base_steps": args.base_steps,
                       "base_lr": args.base_lr, "base_seed": args.base_seed,
                       "base_warmup": base.warmup, "seeds": args.seeds, "formats": list(fmts),
                       "group_size": args.group_size, "n_params": cfg.n_params,
                       "eval_data": args.eval_data}
    results = {
        "command": " ".join(["bench/qat_study.py", *args.argv]),
        "machine": machine(),
        "settings": settings_record,
        "labels": {name: f.label for name, f in int4.items()},
        "base_curve": base_curve,
        "losses": losses,
        "eval_tokens": eval_tokens,
        "step_seconds": step_seconds,
        "wall_seconds": time.perf_counter() - start,
    }
    results["report"] = report(results)
    if not args.no_plot:
        plot(results, out / "study.png", first_seed_runs)
        results["figure"] = str(out / "study.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results["report"])
    return results


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


def update_doc(out: Path, doc: Path, block_name: str) -> None:
    """Rewrite the block `<!-- NAME:start -->...<!-- NAME:end -->` of `doc` from
    out/results.json; copy the figure beside the doc as NAME.png."""
    start, end = f"<!-- {block_name}:start -->", f"<!-- {block_name}:end -->"
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    lines = [start,
             "<!-- generated by bench/qat_study.py --update-doc; do not edit by hand -->", "",
             f"Command: `flock /tmp/hpllm-bench.lock .venv/bin/python {results['command']}`; "
             f"doc block: `--update-doc {doc} --doc-block {block_name}`", "",
             f"Machine: {results['machine']}; shared with other contributors' jobs while it "
             f"ran ({results['wall_seconds'] / 60:.0f} minutes in all).", "",
             f"Setting: `{s['preset']}` preset ({s['n_params'] / 1e6:.2f}M parameters), "
             f"{s['batch_size']} x {s['seq_len']} tokens per step, compute dtype {s['dtype']}. "
             f"Base: {s['base_steps']} steps, peak lr {s['base_lr']}, seed {s['base_seed']}. "
             f"Fine-tunes: {s['steps']} steps from the base checkpoint, peak lr {s['lr']}, "
             f"linear warmup {s['warmup']} steps then cosine decay to 10% of the peak, fresh "
             f"AdamW (weight decay {s['weight_decay']}), seeds "
             f"{', '.join(map(str, s['seeds']))} (data order).", "",
             results["report"]]
    figure = out / "study.png"
    if figure.exists():
        target = doc.with_name(f"{block_name}.png")
        target.write_bytes(figure.read_bytes())
        lines += [f"![QAT - control per format, and fine-tune loss curves]({target.name})", ""]
    lines.append(end)
    block = "\n".join(lines)
    text = doc.read_text() if doc.exists() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        raise UsageError(f"{doc} has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(head + block + tail)


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
        results = run_study(args, log)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing results into --out: full disk, permissions
        print(f"error: cannot write {error.filename or args.out}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    print(results["report"], end="")
    log(f"wrote {Path(args.out) / 'results.md'}, results.json; "
        f"{results['wall_seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
