"""Every training setting, declared once: name, type, default, help text and choices.

The command line is derived from `Settings`: each field is a flag (`seq_len` -> `--seq-len`), its
type comes from the annotation and its help, choices and metavar from the field's metadata.
Settings are resolved in layers, later ones winning: built-in defaults < the resumed run's saved
settings < `--config FILE.json` < flags given on the command line.
"""

import argparse
import dataclasses
import json
import math
import sys
import types
from pathlib import Path
from typing import Any, NoReturn

from hpllm.config import DTYPE_ALIASES, PRESETS, ModelConfig, preset
from hpllm.errors import UserError
from hpllm.quant import MODES
from train.sources import DEFAULT_DATA


class UsageError(UserError):
    """A bad flag or setting; the message says what to do."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), metavar: str = "",
            fixed: bool = False) -> Any:
    """A field of `Settings`. `fixed`: shapes the model or the batch stream, so it cannot change
    on --resume. Help without "(default" gets the default appended."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "metavar": metavar, "fixed": fixed})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every training setting; the field names are the flags' names with '_' for '-'."""

    preset: str = setting("small", "model size", choices=tuple(PRESETS), fixed=True)
    data: str = setting(str(DEFAULT_DATA), "training text: a .txt/.jsonl/.parquet file, a folder "
                        "of them, or a Hugging Face hub dataset name (needs the network) "
                        "(default: the bundled corpus in data/)", fixed=True)
    data_config: str | None = setting(None, "hub dataset configuration name", fixed=True)
    split: str = setting("train", "dataset split to train on", fixed=True)
    text_column: str = setting("text", "column holding the text (jsonl/parquet/hub)",
                               fixed=True)
    tokenizer: str = setting("train", "'train' learns a byte-level BPE on the start of the "
                             "data; or a tokenizer.json", fixed=True)
    vocab_size: int | None = setting(None, "vocabulary size (default: the preset's)",
                                     fixed=True)
    seq_len: int = setting(128, "tokens per training window (at most the preset's "
                           "max_seq_len)", fixed=True)
    batch_size: int = setting(8, "windows per micro-batch, over all devices (a multiple of the "
                              "device count)", fixed=True)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", fixed=True)
    steps: int = setting(300, "total optimizer steps of the run (with --resume: continue up to "
                         "this step)")
    lr: float = setting(1e-3, "peak learning rate (linear warmup, then cosine decay to 10%% of "
                        "it)")
    warmup: int | None = setting(None, "linear warmup steps (default: steps/10, at most 100)")
    weight_decay: float = setting(0.1, "AdamW weight decay (on weight matrices only)")
    clip: float = setting(1.0, "clip gradients to this global norm")
    quant: str = setting("none", "quantization-aware training", choices=MODES, fixed=True)
    eval_every: int = setting(100, "evaluate held-out loss every N steps and at the end "
                              "(0: never)")
    eval_batches: int = setting(8, "held-out batches per evaluation")
    save_every: int = setting(100, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep: int = setting(3, "keep the newest N checkpoints (0: keep all)")
    out: str | None = setting(None, "run folder (default: runs/PRESET)")
    seed: int = setting(0, "random seed (model initialisation, data shuffling)", fixed=True)
    dtype: str = setting("f32", "compute dtype of activations and matmuls (parameters stay f32)",
                         choices=tuple(DTYPE_ALIASES))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {field.name: field for field in dataclasses.fields(Settings)}
FIXED_ON_RESUME = tuple(name for name, field in FIELDS.items() if field.metadata["fixed"])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(field: dataclasses.Field) -> type:
    """int, float or str: the annotation without its `| None`."""
    kinds = [t for t in getattr(field.type, "__args__", (field.type,)) if t is not type(None)]
    return kinds[0]


def optional(field: dataclasses.Field) -> bool:
    return isinstance(field.type, types.UnionType) and type(None) in field.type.__args__


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(**extra_help: str) -> argparse.ArgumentParser:
    """The `python -m train` parser: one flag per field of `Settings`, plus --config and the
    flags named in `extra_help` (store_true switches, e.g. resume="...")."""
    parser = OneLineParser(
        prog="python -m train",
        description="Train an hpllm model. With no flags: the small preset on the bundled corpus, "
                    "into runs/small.",
        epilog="Loss curves of finished runs: python -m train plot RUN [RUN ...] --out "
               "FILE.png (see python -m train plot --help; needs pip install -e .[plot]).",
        # Flags not given stay absent, so a --config file or a resumed run can supply them.
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.json", help="JSON file of settings (keys are "
                        "flag names); flags given here override it (default: none)")
    for name, field in FIELDS.items():
        meta, kind = field.metadata, value_type(field)
        text = meta["help"]
        if meta["choices"]:
            text += f": {', '.join(meta['choices'])}"
        if "(default" not in text:
            text += f" (default: {field.default})"
        metavar = meta["metavar"] or (
            "{" + ",".join(meta["choices"]) + "}" if meta["choices"]
            else {int: "N", float: "F"}.get(kind, name.upper()))
        parser.add_argument(flag(name), dest=name, type=kind, metavar=metavar, help=text)
    for name, text in extra_help.items():
        parser.add_argument(flag(name), dest=name, action="store_true", help=text)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a JSON object of settings")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(f"--config {path}: unknown settings {', '.join(unknown)}")
    return values


def validate(settings: Settings) -> ModelConfig:
    """Check every setting; returns the model config they imply."""
    s = settings
    for name, field in FIELDS.items():
        choices = field.metadata["choices"]
        if choices and getattr(s, name) not in choices:
            raise UsageError(f"unknown {flag(name)} {getattr(s, name)!r}; choose one of "
                             f"{', '.join(choices)}")
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches")
    non_negative = ("warmup", "eval_every", "save_every", "keep", "seed")
    for name in positive + non_negative:
        value = getattr(s, name)
        least = 1 if name in positive else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive" if least else "a non-negative"
            raise UsageError(f"{flag(name)} must be {kind} integer, got {value!r}")
    for name in ("lr", "clip"):
        value = getattr(s, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag(name)} must be a positive number, got {value!r}")
    if not isinstance(s.weight_decay, int | float) or s.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {s.weight_decay!r}")
    cfg = preset(s.preset)
    if s.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {s.seq_len} is above the {s.preset} preset's max_seq_len "
                         f"({cfg.max_seq_len}); use --seq-len {cfg.max_seq_len} or less")
    changes: dict[str, Any] = {"compute_dtype": DTYPE_ALIASES[s.dtype]}
    if s.vocab_size is not None:
        changes["vocab_size"] = s.vocab_size
    try:
        return cfg.replace(**changes)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--vocab-size: {error}") from None


def out_folder(layered: dict[str, Any]) -> Path:
    """--out, or runs/PRESET when it is not given."""
    return Path(layered.get("out") or f"runs/{layered.get('preset', Settings.preset)}")


def layer(saved: dict[str, Any], from_file: dict[str, Any], given: dict[str, Any]) -> Settings:
    """The settings of a run: saved < --config file < command line; checked."""
    layered = {**from_file, **given}
    out = out_folder(layered)
    for name in FIXED_ON_RESUME:
        if saved and name in layered and layered[name] != saved.get(name):
            raise UsageError(
                f"{flag(name)} {layered[name]} differs from the resumed run's "
                f"{saved.get(name)}; a resumed run keeps its model and data settings")
    resolved = {**saved, **layered, "out": str(out)}
    if resolved.get("warmup") is None:
        steps = resolved.get("steps", Settings.steps)
        resolved["warmup"] = min(100, steps // 10) if isinstance(steps, int) else 0
    try:
        settings = Settings(**resolved)
    except TypeError as error:
        raise UsageError(str(error)) from None
    validate(settings)
    return settings
