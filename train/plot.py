"""`python -m train plot RUN [RUN ...] --out FILE.png`: loss curves of several runs.

Reads each run folder's `config.json` (for the label: its quant mode) and `metrics.jsonl` (one
record per step, `eval_loss` on evaluation steps) as written by `python -m train`, and draws the
training loss (left) and the held-out loss (right) of every run on one figure.

matplotlib is an optional extra (`pip install -e .[plot]`), imported only when drawing.
"""

import argparse
import dataclasses
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn

from hpllm.errors import PathError, UserError
from hpllm.outputs import check_output

INSTALL_HINT = "matplotlib is not installed; pip install -e .[plot]"


class PlotError(UserError):
    """A run folder that cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Curves:
    """One run's loss curves."""

    label: str
    steps: list[int]
    losses: list[float]
    eval_steps: list[int]
    eval_losses: list[float]


def quant_label(quant: dict[str, Any]) -> str:
    """A short name for a QuantConfig dict: float, int8, fp8 (delayed), int4w g128..."""
    mode = quant.get("mode", "none")
    if mode == "none":
        return "float"
    if mode == "fp8":
        return f"fp8 ({quant.get('scaling', 'delayed')})"
    if mode == "int4w":
        return f"int4w g{quant.get('group_size', 128)}"
    return str(mode)


def run_label(config: dict[str, Any], source: Path) -> str:
    for section in ("quant", "model"):
        if not isinstance(config.get(section, {}), dict):
            raise PlotError(f"{source}: {section!r} must be a JSON object, got "
                            f"{json.dumps(config[section])[:60]}")
    label = quant_label(config.get("quant") or {})
    dtype = (config.get("model") or {}).get("compute_dtype")
    return f"{label}, {dtype}" if dtype and dtype != "float32" else label


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise PlotError(f"{path}: cannot read it ({error.strerror}); is it a training run "
                        f"folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlotError(f"{path}: not valid JSON ({error})") from None


def load_curves(run: Path) -> Curves:
    """The labelled curves of one run folder."""
    config = read_json(run / "config.json")
    if not isinstance(config, dict):
        raise PlotError(f"{run / 'config.json'}: expected a JSON object")
    metrics_path = run / "metrics.jsonl"
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError as error:
        raise PlotError(f"{metrics_path}: cannot read it ({error.strerror})") from None
    steps, losses, eval_steps, eval_losses = [], [], [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(record, dict) or "step" not in record:
            continue
        for field in ("step", "loss", "eval_loss"):
            value = record.get(field, 0)
            if not isinstance(value, int | float) or isinstance(value, bool) or (
                    field == "step" and not isinstance(value, int)):
                kind = "an integer" if field == "step" else "a number"
                raise PlotError(f"{metrics_path}:{number}: {field!r} must be {kind}, got "
                                f"{json.dumps(value)[:40]}")
        if "loss" in record:
            steps.append(record["step"])
            losses.append(float(record["loss"]))
        if "eval_loss" in record:
            eval_steps.append(record["step"])
            eval_losses.append(float(record["eval_loss"]))
    if not steps:
        raise PlotError(f"{metrics_path}: no training steps recorded")
    return Curves(run_label(config, run / "config.json"), steps, losses, eval_steps,
                  eval_losses)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average fewer)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def unique_labels(curves: list[Curves], runs: list[Path]) -> list[str]:
    """Labels, with the folder name added where two runs share a quant mode (e.g. seeds)."""
    labels = [c.label for c in curves]
    return [f"{label} ({run.name})" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs, strict=True)]


def plot_runs(runs: list[Path], out: Path, *, smooth: int = 10, title: str | None = None) -> int:
    """Draw the runs' curves into `out` (PNG); returns the number of runs drawn."""
    curves = [load_curves(Path(run)) for run in runs]
    try:
        import matplotlib
    except ImportError:
        raise PlotError(INSTALL_HINT) from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve, label in zip(curves, unique_labels(curves, [Path(r) for r in runs]), strict=True):
        (line,) = train_ax.plot(curve.steps, moving_average(curve.losses, smooth), label=label,
                                linewidth=1.2)
        if curve.eval_steps:
            eval_ax.plot(curve.eval_steps, curve.eval_losses, marker="o", markersize=3,
                         color=line.get_color(), label=label, linewidth=1.2)
    smoothing = f" (mean of {smooth} steps)" if smooth > 1 else ""
    train_ax.set(title=f"training loss{smoothing}", xlabel="step", ylabel="loss")
    eval_ax.set(title="held-out loss", xlabel="step", ylabel="loss")
    if not any(curve.eval_steps for curve in curves):
        eval_ax.text(0.5, 0.5, "no evaluations recorded", ha="center", va="center",
                     transform=eval_ax.transAxes)
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Drawn beside the target, then linked into place: a file that appeared at `out`
        # meanwhile is never replaced.
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.png"
        try:
            fig.savefig(tmp, dpi=120)
            os.link(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        raise PlotError(f"--out {out} appeared while drawing; choose a new path") from None
    except OSError as error:
        raise PathError.from_os_error(error, out, "write") from error
    finally:
        plt.close(fig)
    return len(curves)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see python -m train plot --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m train plot",
        description="Training and held-out loss curves of several runs on one figure, "
                    "labelled by their quant mode (needs matplotlib: pip install -e .[plot]).")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of python -m train")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="image to write")
    parser.add_argument("--smooth", type=int, default=10, metavar="N",
                        help="plot the training loss as a trailing mean over N steps "
                             "(default: 10; 1: raw)")
    parser.add_argument("--title", default=None, help="figure title (default: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smooth < 1:
        print("error: --smooth must be a positive integer", file=sys.stderr)
        return 2
    try:
        # Never over anything: not an existing file, not one of the runs' own files.
        if args.out and os.path.lexists(args.out) and not Path(args.out).is_dir():
            raise PlotError(f"--out {args.out} already exists; plot never writes over a file, "
                            "choose a new path")
        check_output(args.out, inputs=[Path(r) / name for r in args.runs
                                       for name in ("config.json", "metrics.jsonl")],
                     kind="figure")
        n = plot_runs([Path(r) for r in args.runs], Path(args.out), smooth=args.smooth,
                      title=args.title)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
