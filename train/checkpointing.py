"""Training checkpoints: save every N steps and at the end, keep the last K, resume exactly.

A checkpoint folder `OUT/checkpoints/step_000100/` holds

    config.json             {"format_version", "model", "quant", "step", "train"}
    model.safetensors       the whole model, quant-op state leaves (fp8 amax history) included
    opt_state.safetensors   AdamW moments and counters
    data_state.json         the batch iterator's position
    tokenizer.json          (+ tokenizer_config.json, generation_config.json... for a model
                            imported from Hugging Face: its tokenizer files, as they came)
    manifest.json           size and SHA-256 of each file above, checked before loading

It is written by `hpllm.checkpoint.write_checkpoint` (hidden temporary folder, then rename), so
a kill at any moment leaves either the complete folder or none. Old checkpoints are renamed to
a hidden name before they are deleted, for the same reason.
"""

import dataclasses
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from hpllm.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    load_tree,
    model_config,
    read_config,
    verify_checkpoint,
    write_checkpoint,
)
from hpllm.config import ModelConfig
from hpllm.errors import PathError
from hpllm.hf import ARCHITECTURES, hf_model_config, is_hf_folder, load_weights, read_hf_config
from hpllm.model import Transformer
from hpllm.quant import (
    QuantConfig,
    quantize_for_training,
    split_quant_state,
    strip_training_quant,
)
from train.loop import TrainState

DATA_STATE_FILE = "data_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _host_copy(tree: Any) -> Any:
    """Array leaves gathered to this host (a no-op on one host)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


class Checkpointer:
    """Writes `step_NNNNNN` folders under `run_dir/checkpoints` and prunes old ones."""

    def __init__(self, run_dir: Path, *, keep: int, config: dict[str, Any],
                 tokenizer_files: dict[str, str]):
        self.folder = checkpoint_dir(run_dir)
        self.keep = keep
        self.config = config
        self.tokenizer_files = tokenizer_files

    def remove_leftovers(self) -> None:
        """Delete hidden `.step_*` folders: saves or deletions cut short by a kill."""
        if self.folder.is_dir() and jax.process_index() == 0:
            for path in self.folder.glob(".step_*"):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, state: TrainState, data_state: dict[str, Any]) -> Path:
        step = int(state.step)
        model = _host_copy(state.model())
        opt_state = _host_copy(state.opt_state)
        path = self.folder / f"step_{step:06d}"
        if jax.process_index() == 0:
            write_checkpoint(
                path,
                {**self.config, "step": step},
                {"model": model, "opt_state": opt_state},
                {DATA_STATE_FILE: json.dumps(data_state), **self.tokenizer_files},
                replace=True,  # a step saved again after resuming from an earlier one
            )
            self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
        if self.keep <= 0:
            return
        done = sorted((checkpoint_step(p), p) for p in self.folder.iterdir()
                      if p.is_dir() and checkpoint_step(p) is not None)
        for _, path in done[:-self.keep]:
            # Hidden first, so a kill mid-delete never leaves a half folder named step_*.
            doomed = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex[:8]}"
            try:
                path.rename(doomed)
                shutil.rmtree(doomed)
            except OSError as error:
                raise PathError.from_os_error(error, path, "delete the old checkpoint",
                                              "the new checkpoint was saved") from error


def load_training_checkpoint(path: Path, skeleton: TrainState
                             ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(state, data_state, config) of checkpoint `path`. `skeleton` gives the tree structure
    (shapes only is fine: `eqx.filter_eval_shape` of the initial state)."""
    path = Path(path)
    verify_checkpoint(path)
    config = read_config(path)
    if not isinstance(config.get("step"), int):
        raise CheckpointError(f"{path / CONFIG_FILE}: no integer 'step'; not a training checkpoint")
    model = load_tree(eqx.combine(skeleton.params, skeleton.quant_state),
                      path / "model.safetensors")
    params, quant_state = split_quant_state(model)
    opt_state = load_tree(skeleton.opt_state, path / "opt_state.safetensors")
    data_file = path / DATA_STATE_FILE
    try:
        data_state = json.loads(data_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{data_file}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{data_file}: corrupt JSON ({error})") from None
    step = jnp.asarray(config["step"], jnp.int32)
    return TrainState(params, quant_state, opt_state, step), data_state, config


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Weights a new run starts from (`--init-from`): where they are, the model they fit, the
    settings they fix (preset, vocab_size, tokenizer), how to load them as a float
    `Transformer` of a given config (its compute dtype may differ from the source's), and the
    Hugging Face architecture they came from (recorded in the run, for `infer export`)."""

    path: Path
    model: ModelConfig
    settings: dict[str, Any]
    load: Callable[[ModelConfig], Transformer]
    hf_architecture: str | None = None


def open_init_source(path: str | Path) -> InitSource:
    """What `--init-from PATH` names: a training checkpoint folder, a run folder (its newest
    checkpoint), or a Hugging Face model folder."""
    path = Path(path)
    if is_hf_folder(path):
        return _hf_source(path)
    if path.is_dir() and checkpoint_dir(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"--init-from {path}: this run folder has no complete "
                                  "checkpoint yet")
        path = latest
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"--init-from {path}: not a training checkpoint folder (no "
                              f"{CONFIG_FILE}), a training run folder (no checkpoints/) nor a "
                              "Hugging Face model folder")
    return _training_checkpoint_source(path)


def _training_checkpoint_source(path: Path) -> InitSource:
    file = path / CONFIG_FILE
    config = read_config(path)
    train, quant = config.get("train"), config.get("quant", {"mode": "none"})
    if not isinstance(config.get("step"), int) or not isinstance(train, dict):
        raise CheckpointError(f"--init-from {path}: {file} has no integer 'step' and 'train' "
                              "settings; not a training checkpoint")
    try:
        source_quant = QuantConfig.from_dict(quant)
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{file}: invalid quant section ({error})") from None
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"--init-from {path}: no tokenizer.json there")
    source_model = model_config(config, file)
    fixed = {"preset": train.get("preset"), "vocab_size": source_model.vocab_size,
             "tokenizer": str(path / "tokenizer.json")}

    def load(cfg: ModelConfig) -> Transformer:
        verify_checkpoint(path)
        skeleton = eqx.filter_eval_shape(
            lambda: quantize_for_training(Transformer(cfg, key=jax.random.key(0)),
                                          source_quant))
        return strip_training_quant(load_tree(skeleton, path / "model.safetensors"))

    return InitSource(path, source_model, fixed, load)


def _hf_source(path: Path) -> InitSource:
    """A Hugging Face folder: the model of its config.json (no preset: `preset` is fixed to
    None), its weights read layer by layer, and its own tokenizer files."""
    hf = read_hf_config(path)
    source_model = hf_model_config(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"--init-from {path}: no tokenizer.json there (only fast "
                              "tokenizers are supported)")
    fixed = {"preset": None, "vocab_size": source_model.vocab_size, "tokenizer": str(path)}

    def load(cfg: ModelConfig) -> Transformer:
        return load_weights(path, cfg)

    return InitSource(path, source_model, fixed, load, ARCHITECTURES[hf["model_type"]])
