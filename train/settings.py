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
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from hpllm.config import DTYPE_ALIASES, PRESETS, ModelConfig, preset
from hpllm.errors import UserError
from hpllm.hf import hf_model_config
from hpllm.quant import GROUP_SIZES, TRAINING_MODE_HELP, TRAINING_MODES
from train.sources import DEFAULT_DATA


class UsageError(UserError):
    """A bad flag or setting; the message says what to do."""


def setting(default: Any, help: str, *, choices: tuple[str | int, ...] = (), metavar: str = "",
            fixed: bool = False) -> Any:
    """A field of `Settings`. `fixed`: shapes the model or the batch stream, so it cannot change
    on --resume. Help without "(default" gets the default appended."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "metavar": metavar, "fixed": fixed})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every training setting; the field names are the flags' names with '_' for '-'."""

    preset: str | None = setting("small", "model size (with --init-from a Hugging Face folder "
                                 "there is none: its config.json gives the model)",
                                 choices=tuple(PRESETS), fixed=True)
    data: str = setting(str(DEFAULT_DATA), "training text: a .txt/.jsonl/.parquet file, a folder "
                        "of them, or a Hugging Face hub dataset name (needs the network) "
                        "(default: the bundled corpus in data/)", fixed=True)
    data_config: str | None = setting(None, "hub dataset configuration name", fixed=True)
    split: str = setting("train", "dataset split to train on", fixed=True)
    text_column: str = setting("text", "column holding the text (jsonl/parquet/hub)",
                               fixed=True)
    encoding: str = setting("utf-8", "text encoding of local .txt/.jsonl/.json files (for "
                            "example latin-1)", fixed=True)
    tokenizer: str = setting("train", "'train' learns a byte-level BPE on the start of the "
                             "data; or a tokenizer.json, or a folder holding one (a Hugging "
                             "Face tokenizer folder with its tokenizer_config.json too)",
                             fixed=True)
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
    quant: str = setting("none", "quantization-aware training (QAT); python -m infer convert "
                         "turns it into the matching inference format: " + "; ".join(
                             f"{name} = {text}" for name, text in TRAINING_MODE_HELP.items()),
                         choices=tuple(TRAINING_MODES), fixed=True)
    quant_group_size: int = setting(128, "int4 group size along the input dimension for "
                                    "--quant int4w and w4a8 (0: one scale per output channel)",
                                    choices=GROUP_SIZES, fixed=True)
    eval_every: int = setting(100, "evaluate held-out loss every N steps and at the end "
                              "(0: never)")
    eval_batches: int = setting(8, "held-out batches per evaluation")
    save_every: int = setting(100, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep: int = setting(3, "keep the newest N checkpoints (0: keep all)")
    out: str | None = setting(None, "run folder: a new or empty folder, or a training run to "
                              "continue; never one holding other files or the inputs "
                              "(default: runs/PRESET; runs/NAME after --init-from a "
                              "Hugging Face folder NAME)")
    seed: int = setting(0, "random seed (model initialisation, data shuffling)", fixed=True)
    init_from: str | None = setting(None, "start from the weights of this training checkpoint "
                                    "(or run folder: its newest checkpoint) or Hugging Face "
                                    "model folder (Llama, Mistral, Qwen2) with a fresh "
                                    "optimizer at step 0; the model (--preset, --vocab-size) "
                                    "and --tokenizer come from it, a different one is an error; "
                                    "--quant may differ (default: random initialisation)",
                                    metavar="CKPT_OR_HF_DIR", fixed=True)
    dtype: str = setting("f32", "compute dtype of activations and matmuls (parameters stay f32)",
                         choices=tuple(DTYPE_ALIASES))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {field.name: field for field in dataclasses.fields(Settings)}
FLOAT32_MAX = float(np.finfo(np.float32).max)
# JAX turns the seed into a signed 64-bit integer.
MAX_SEED = 2**63 - 1
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


def build_parser() -> argparse.ArgumentParser:
    """The `python -m train` parser: one flag per field of `Settings`, plus --config."""
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
        text, choices = meta["help"], [str(choice) for choice in meta["choices"]]
        if choices:
            text += f": {', '.join(choices)}"
        if "(default" not in text:
            text += f" (default: {field.default})"
        metavar = meta["metavar"] or (
            "{" + ",".join(choices) + "}" if choices
            else {int: "N", float: "F"}.get(kind, name.upper()))
        parser.add_argument(flag(name), dest=name, type=kind, metavar=metavar, help=text)
    return parser


def check_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse a value of the wrong JSON type (a list for --preset, text for --steps...) read
    from `source` (a --config file, a checkpoint's config.json); returns `values`."""
    for name, value in values.items():
        field = FIELDS[name]
        kind = value_type(field)
        fits = (value is None and optional(field)) or (
            isinstance(value, kind) and not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            wanted = {int: "an integer", float: "a number", str: "a string"}[kind]
            wanted += " or null" if optional(field) else ""
            raise UsageError(f"{source}: setting {name!r} must be {wanted}, got "
                             f"{json.dumps(value)[:60]}")
    return values


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
    return check_types(values, f"--config {path}")


def validate(settings: Settings) -> ModelConfig:
    """Check every setting; returns the model config they imply."""
    s = settings
    for name, field in FIELDS.items():
        choices, value = field.metadata["choices"], getattr(s, name)
        if choices and value not in choices and not (value is None and optional(field)):
            raise UsageError(f"unknown {flag(name)} {getattr(s, name)!r}; choose one of "
                             f"{', '.join(map(str, choices))}")
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches")
    non_negative = ("warmup", "eval_every", "save_every", "keep", "seed")
    for name in positive + non_negative:
        value = getattr(s, name)
        least = 1 if name in positive else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive" if least else "a non-negative"
            raise UsageError(f"{flag(name)} must be {kind} integer, got {value!r}")
    # The optimizer computes in float32: a larger number would become infinite there.
    for name in ("lr", "clip", "weight_decay"):
        value, least = getattr(s, name), ">= 0" if name == "weight_decay" else "> 0"
        if (not isinstance(value, int | float) or not math.isfinite(value) or value < 0
                or (value == 0 and name != "weight_decay") or value > FLOAT32_MAX):
            raise UsageError(f"{flag(name)} must be a number {least} and at most "
                             f"{FLOAT32_MAX:.3g} (float32), got {value!r}")
    if s.seed > MAX_SEED:
        raise UsageError(f"--seed must be at most {MAX_SEED} (2**63 - 1), got {s.seed}")
    for name in ("data", "data_config", "split", "text_column", "tokenizer", "out", "init_from"):
        if getattr(s, name) == "":
            raise UsageError(f"{flag(name)} is empty; give a value or leave the flag out")
    if s.preset is not None:
        cfg, model_name = preset(s.preset), f"the {s.preset} preset's"
    elif s.init_from is not None:
        # No preset: the model is the --init-from Hugging Face folder's (read again on
        # --resume, so the folder must stay where it is).
        cfg, model_name = hf_model_config(s.init_from), "the --init-from model's"
    else:
        raise UsageError("--preset is null; give a preset, or --init-from a Hugging Face folder "
                         "whose config.json gives the model")
    if s.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {s.seq_len} is above {model_name} max_seq_len "
                         f"({cfg.max_seq_len}); use --seq-len {cfg.max_seq_len} or less")
    changes: dict[str, Any] = {"compute_dtype": DTYPE_ALIASES[s.dtype]}
    if s.vocab_size is not None:
        changes["vocab_size"] = s.vocab_size
    try:
        return cfg.replace(**changes)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--vocab-size: {error}") from None


def same_path(name: str, value: Any) -> Any:
    """A setting as compared on resume: `--data data/` and `--data data` are the same folder."""
    if name in ("data", "tokenizer") and isinstance(value, str) and value:
        return os.path.normpath(value)
    return value


def out_folder(layered: dict[str, Any]) -> Path:
    """--out, or runs/PRESET when it is not given (runs/NAME for a model without a preset:
    the name of its --init-from folder)."""
    out = layered.get("out")
    if out == "":
        raise UsageError("--out is empty; give a folder or leave the flag out (runs/PRESET)")
    if out is not None:
        return Path(out)
    name = layered.get("preset", Settings.preset)
    if name is None:
        name = Path(layered.get("init_from") or "run").resolve().name
    return Path(f"runs/{name}")


def layer(saved: dict[str, Any], from_file: dict[str, Any], given: dict[str, Any],
          saved_in: str = "the resumed run") -> Settings:
    """The settings of a run: saved (in `saved_in`) < --config file < command line; checked.
    A bad value that came from the saved settings is blamed on them, not on a flag."""
    layered = {**from_file, **given}
    out = out_folder(layered)
    for name in FIXED_ON_RESUME:
        if saved and name in layered and (same_path(name, layered[name])
                                          != same_path(name, saved.get(name))):
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
    try:
        validate(settings)
    except UsageError as error:
        from_saved = [name for name in saved if name not in layered
                      and re.search(rf"{flag(name)}\b", str(error))]
        if not from_saved:
            raise
        name = from_saved[0]
        raise UsageError(f"{saved_in}: the saved setting {name} = {saved[name]!r} is invalid "
                         f"({error}); the checkpoint is damaged, resume from another with "
                         "--resume-from") from None
    return settings
