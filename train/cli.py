"""`python -m train`: command line, resolved settings, run folder, and the error policy.

Settings are resolved in layers, later ones winning: built-in defaults < the checkpoint's saved
settings (with --resume) < `--config FILE.json` < flags given on the command line. The result
is written to OUT/config.json.

User mistakes (bad flag, missing data, corrupt checkpoint, NaN loss...) end with one line
`error: ...` on stderr and exit status 2; nothing already in the run folder is deleted or
overwritten.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp

from hpllm.checkpoint import FORMAT_VERSION, CheckpointError, read_config
from hpllm.config import DTYPE_ALIASES, PRESETS, ModelConfig, preset
from hpllm.errors import UserError
from hpllm.model import Transformer
from hpllm.quant import MODES, QuantConfig, quantize_for_training, split_quant_state
from hpllm.sharding import check_batch_divisible, make_mesh, shard_batch, shard_tree
from hpllm.tokenizer import Tokenizer
from train import data as train_data
from train.checkpointing import Checkpointer, find_resume_checkpoint, load_training_checkpoint
from train.loop import (
    NonFiniteLossError,
    Progress,
    StepBatch,
    TrainState,
    evaluate,
    make_optimizer,
    make_train_step,
    stack_micro_batches,
    train_loop,
)

BUNDLED_DATA = train_data.DEFAULT_DATA


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every training setting; the field names are the flags' names with '_' for '-'."""

    preset: str = "small"
    data: str = str(BUNDLED_DATA)
    data_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    tokenizer: str = "train"
    vocab_size: int | None = None
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 300
    lr: float = 1e-3
    warmup: int | None = None
    weight_decay: float = 0.1
    clip: float = 1.0
    quant: str = "none"
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 3
    out: str | None = None
    seed: int = 0
    dtype: str = "f32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings that shape the model or the batch stream: changing them on --resume would not
# continue the same run, so it is refused.
FIXED_ON_RESUME = ("preset", "data", "data_config", "split", "text_column", "tokenizer",
                   "vocab_size", "seq_len", "batch_size", "grad_accum", "quant", "seed")

HELP = {
    "config": "JSON file of settings (keys are flag names); flags given here override it "
              "(default: none)",
    "preset": f"model size, one of {', '.join(PRESETS)}",
    "data": "training text: a .txt/.jsonl/.parquet file, a folder of them, or a Hugging Face "
            "hub dataset name (needs the network); default: the bundled corpus in data/",
    "data_config": "hub dataset configuration name",
    "split": "dataset split to train on",
    "text_column": "column holding the text (jsonl/parquet/hub)",
    "tokenizer": "'train' learns a byte-level BPE on the start of the data; or a tokenizer.json",
    "vocab_size": "vocabulary size (default: the preset's)",
    "seq_len": "tokens per training window (at most the preset's max_seq_len)",
    "batch_size": "windows per micro-batch, over all devices (a multiple of the device count)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "steps": "total optimizer steps of the run (with --resume: continue up to this step)",
    "lr": "peak learning rate (linear warmup, then cosine decay to 10%% of it)",
    "warmup": "linear warmup steps (default: steps/10, at most 100)",
    "weight_decay": "AdamW weight decay (on weight matrices only)",
    "clip": "clip gradients to this global norm",
    "quant": f"quantization-aware training: {', '.join(MODES)}",
    "eval_every": "evaluate held-out loss every N steps and at the end (0: never)",
    "eval_batches": "held-out batches per evaluation",
    "save_every": "checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "keep": "keep the newest N checkpoints (0: keep all)",
    "out": "run folder (default: runs/PRESET)",
    "resume": "continue from the newest checkpoint in --out, with its saved settings "
              "(default: off, start a new run)",
    "seed": "random seed (model initialisation, data shuffling)",
    "dtype": "compute dtype of activations and matmuls: f32 or bf16 (parameters stay f32)",
}


class UsageError(Exception):
    """A bad flag or setting; the message says what to do."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see python -m train --help)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = OneLineParser(
        prog="python -m train",
        description="Train an hpllm model. With no flags: the small preset on the bundled corpus, "
                    "into runs/small.",
        epilog="Loss curves of finished runs: python -m train plot RUN [RUN ...] --out "
               "FILE.png (see python -m train plot --help; needs pip install -e .[plot]).",
        # Flags not given stay absent, so a --config file or a resumed run can supply them.
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.json", help=HELP["config"])
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = {"int": int, "float": float}.get(type(default).__name__, str)
        if field.name in ("vocab_size", "warmup"):
            kind = int
        text = HELP[field.name] if "(default" in HELP[field.name] else (
            HELP[field.name] + f" (default: {default})")
        metavar = {"preset": "{" + ",".join(PRESETS) + "}", "quant": "{" + ",".join(MODES)
                   + "}", "dtype": "{" + ",".join(DTYPE_ALIASES) + "}"}.get(field.name, "N")
        if kind is str and field.name not in ("preset", "quant", "dtype"):
            metavar = field.name.upper()
        elif kind is float:
            metavar = "F"
        parser.add_argument(flag, dest=field.name, type=kind, metavar=metavar, help=text)
    parser.add_argument("--resume", action="store_true", help=HELP["resume"])
    # ArgumentDefaultsHelpFormatter would print "(default: ==SUPPRESS==)"; ours are in the text.
    parser.formatter_class = argparse.HelpFormatter
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
    known = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown settings {', '.join(unknown)}")
    return values


def validate(settings: Settings) -> ModelConfig:
    """Check every setting; returns the model config they imply."""
    s = settings
    if s.preset not in PRESETS:
        raise UsageError(f"unknown --preset {s.preset!r}; choose one of {', '.join(PRESETS)}")
    if s.quant not in MODES:
        raise UsageError(f"unknown --quant {s.quant!r}; choose one of {', '.join(MODES)}")
    if s.dtype not in DTYPE_ALIASES:
        raise UsageError(f"unknown --dtype {s.dtype!r}; choose one of {', '.join(DTYPE_ALIASES)}")
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches")
    non_negative = ("warmup", "eval_every", "save_every", "keep", "seed")
    for name in positive + non_negative:
        value = getattr(s, name)
        least = 1 if name in positive else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            flag = "--" + name.replace("_", "-")
            kind = "a positive" if least else "a non-negative"
            raise UsageError(f"{flag} must be {kind} integer, got {value!r}")
    for name in ("lr", "clip"):
        value = getattr(s, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise UsageError(f"--{name} must be a positive number, got {value!r}")
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


def resolve(argv: list[str] | None) -> tuple[Settings, bool]:
    """(settings, resume) from the command line, --config and a resumed run's saved settings."""
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", False)
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    layered = {**from_file, **given}
    out = Path(layered.get("out") or f"runs/{layered.get('preset', Settings.preset)}")
    saved: dict[str, Any] = {}
    if resume:
        check_run_folder(out, resume)
        saved = saved_settings(out)
        for name in FIXED_ON_RESUME:
            if name in layered and layered[name] != saved.get(name):
                raise UsageError(
                    f"--{name.replace('_', '-')} {layered[name]} differs from the resumed run's "
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
    return settings, resume


def saved_settings(out: Path) -> dict[str, Any]:
    """The training settings stored in the newest checkpoint of `out`."""
    path = find_resume_checkpoint(out)
    train = read_config(path).get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{path / 'config.json'}: no 'train' settings")
    known = {field.name for field in dataclasses.fields(Settings)}
    return {key: value for key, value in train.items() if key in known}


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that is a file, or that holds a run we were not asked to resume."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if not resume and out.is_dir() and ((out / "config.json").exists()
                                        or (out / "checkpoints").exists()):
        raise UsageError(f"--out {out} already holds a training run; pass --resume to continue "
                         f"it, or choose another --out")


def write_json_atomically(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (steps that will be run again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def initial_state(cfg: ModelConfig, qcfg: QuantConfig, settings: Settings) -> TrainState:
    model = quantize_for_training(Transformer(cfg, key=jax.random.key(settings.seed)), qcfg)
    params, quant_state = split_quant_state(model)
    optimizer = optimizer_for(params, settings)
    return TrainState(params, quant_state, optimizer.init(params), jnp.zeros((), jnp.int32))


def optimizer_for(params: Transformer, settings: Settings):
    return make_optimizer(params, lr=settings.lr, warmup=settings.warmup, steps=settings.steps,
                          weight_decay=settings.weight_decay, clip=settings.clip)


class SigintFlag:
    """Ctrl-C sets a flag that the loop checks after each step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run(settings: Settings, resume: bool) -> int:
    out = Path(settings.out)
    check_run_folder(out, resume)
    cfg = validate(settings)
    qcfg = QuantConfig(mode=settings.quant)
    mesh = make_mesh()
    try:
        check_batch_divisible(settings.batch_size, mesh)
    except ValueError as error:
        raise UsageError(str(error)) from None

    splits = train_data.open_splits(settings.data, data_config=settings.data_config,
                                    split=settings.split, text_column=settings.text_column)
    data_state = None
    if resume:
        checkpoint = find_resume_checkpoint(out)
        tokenizer = read_checkpoint_tokenizer(checkpoint)
    else:
        checkpoint = None
        tokenizer = train_data.get_tokenizer(settings.tokenizer, splits.train, cfg.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {cfg.vocab_size}; pass --vocab-size {tokenizer.vocab_size}")

    if checkpoint is None:
        state = initial_state(cfg, qcfg, settings)
    else:
        skeleton = eqx.filter_eval_shape(initial_state, cfg, qcfg, settings)
        state, data_state, _ = load_training_checkpoint(checkpoint, skeleton)
    start = int(state.step)
    if start >= settings.steps:
        print(f"{out}: already at step {start} (--steps {settings.steps}); nothing to do",
              file=sys.stderr)
        return 0
    state = shard_tree(state, mesh)

    # Every check has passed: only now is anything written.
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"model": cfg.to_dict(), "quant": qcfg.to_dict(), "train": settings.to_dict(),
                  "devices": len(mesh.devices.flat)}
    write_json_atomically(out / "config.json", {"format_version": FORMAT_VERSION, **run_config})
    tokenizer.save(out / "tokenizer.json")
    metrics_path = out / "metrics.jsonl"
    if resume:
        trim_metrics(metrics_path, start)

    batches = train_data.TrainBatches(splits.train, tokenizer, settings.seq_len,
                                      settings.batch_size, seed=settings.seed, state=data_state)
    # The held-out batches are the same at every evaluation: packed once.
    held_out = train_data.eval_batches(splits.validation, tokenizer, settings.seq_len,
                                       settings.batch_size, max_batches=settings.eval_batches)
    checkpointer = Checkpointer(out, keep=settings.keep, tokenizer_json=tokenizer.to_json(),
                                config={k: v for k, v in run_config.items() if k != "devices"})
    checkpointer.remove_leftovers()
    optimizer = optimizer_for(state.params, settings)
    step_fn = make_train_step(optimizer, peak_lr=settings.lr, warmup=settings.warmup,
                              total_steps=settings.steps,
                              state_shardings=jax.tree.map(lambda x: x.sharding, state))

    def put_batch(host_batches: list) -> StepBatch:
        arrays = stack_micro_batches(host_batches)
        return StepBatch(**{k: shard_batch(v, mesh, batch_axis=1) for k, v in arrays.items()})

    def put_eval_batch(batch) -> list[jax.Array]:
        arrays = stack_micro_batches([batch])
        return [shard_batch(arrays[k][0], mesh) for k in
                ("inputs", "targets", "segment_ids", "loss_mask")]

    def run_eval(model: Transformer) -> float:
        return evaluate(model, iter(held_out), put_eval_batch)

    with open(metrics_path, "a") as metrics_file:
        def log_metrics(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        sigint = SigintFlag()
        try:
            state, completed = train_loop(
                state, step_fn, batches,
                total_steps=settings.steps, grad_accum=settings.grad_accum, put_batch=put_batch,
                eval_every=settings.eval_every, run_eval=run_eval,
                save_every=settings.save_every,
                save=lambda s: checkpointer.save(s, batches.state()),
                log_metrics=log_metrics, progress=Progress(settings.steps),
                interrupted=lambda: sigint.raised)
        finally:
            sigint.restore()
            batches.close()
    step = int(state.step)
    if completed:
        print(f"\ndone: {step} steps; checkpoint {checkpointer.folder / f'step_{step:06d}'}",
              file=sys.stderr)
    else:
        print(f"\ninterrupted at step {step}; saved {checkpointer.folder / f'step_{step:06d}'}. "
              f"Continue with: python -m train --out {out} --resume", file=sys.stderr)
    return 0


def read_checkpoint_tokenizer(checkpoint: Path) -> Tokenizer:
    file = checkpoint / "tokenizer.json"
    try:
        return Tokenizer.load(file)
    except (OSError, ValueError, UserError) as error:
        raise CheckpointError(f"{file}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        settings, resume = resolve(argv)
        return run(settings, resume)
    except (UsageError, CheckpointError, NonFiniteLossError, train_data.DataError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        # Ctrl-C before the first step, or a second Ctrl-C: the checkpoints already written
        # are complete (atomic saves); nothing new was saved.
        print("\ninterrupted; no new checkpoint written", file=sys.stderr)
        return 130
