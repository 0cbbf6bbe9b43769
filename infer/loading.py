"""Finding and loading what `python -m infer` is pointed at.

`CKPT` may be
- a training run folder (`python -m train --out DIR`): its newest complete checkpoint is used;
- one training checkpoint (`DIR/checkpoints/step_000100`): float or QAT (fake-quant) weights;
- a converted checkpoint (`python -m infer convert`): config.json has a "weights" section;
- a Hugging Face model folder (Llama, Mistral, Qwen2; see `hpllm.hf`), converted in memory.

The skeleton to load into is built with `eqx.filter_eval_shape` (shapes only, no memory) by
applying the same transformation that produced the file: `quantize_for_training` for a training
checkpoint, `quantize_weights` for a converted one.
"""

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from hpllm.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    latest_checkpoint,
    load_model,
    read_config,
)
from hpllm.config import ModelConfig, preset
from hpllm.hf import is_hf_folder, load_hf
from hpllm.hf_tokenizer import GenerationDefaults, PretrainedTokenizer
from hpllm.model import Transformer
from hpllm.quant import DEFAULT_TARGETS, SCHEMES
from hpllm.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class Loaded:
    """A loaded model with what came with it. `scheme` is None for training checkpoints and
    Hugging Face folders. Imported models (`architecture` set) carry a `PretrainedTokenizer`
    and the default sampling of their generation_config.json."""

    model: Transformer
    tokenizer: Tokenizer | PretrainedTokenizer | None
    config: dict[str, Any]
    path: Path
    scheme: str | None
    architecture: str | None = None
    generation: GenerationDefaults | None = None


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def quantize(model: Transformer, scheme: str, group_size: int = 128,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> Transformer:
    """`model` with the targeted Linear weights converted to `scheme` ("f32": as is)."""
    check_scheme(scheme)
    if scheme == "f32":
        return model
    from hpllm.quant import quantize_weights

    return quantize_weights(model, scheme, group_size=group_size, targets=targets)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder that `path` names (a run folder resolves to its newest one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; give a training run folder, a "
                              "checkpoint folder or a converted checkpoint")
    if path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "checkpoints").is_dir():
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: this run folder has no complete checkpoint yet")
        return latest
    raise CheckpointError(f"{path}: not a checkpoint folder (no {CONFIG_FILE}) nor a training "
                          "run folder (no checkpoints/)")


def _skeleton(cfg: ModelConfig, config: dict[str, Any]) -> Transformer:
    def float_model() -> Transformer:
        return Transformer(cfg, key=jax.random.key(0))

    if "weights" in config:
        weights = config["weights"]
        if not isinstance(weights, dict) or weights.get("scheme") not in SCHEMES:
            raise CheckpointError(f"config.json: unknown weight scheme in {weights!r}")
        scheme, group_size = weights["scheme"], int(weights.get("group_size", 128))
        targets = tuple(weights.get("targets", DEFAULT_TARGETS))
        return eqx.filter_eval_shape(lambda: quantize(float_model(), scheme, group_size,
                                                      targets))
    if config.get("quant") and config["quant"].get("mode", "none") != "none":
        from hpllm.quant import QuantConfig, quantize_for_training

        try:
            qcfg = QuantConfig.from_dict(config["quant"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"config.json: invalid quant section ({error})") from None
        return eqx.filter_eval_shape(lambda: quantize_for_training(float_model(), qcfg))
    return eqx.filter_eval_shape(float_model)


def _find_tokenizer(checkpoint: Path) -> Tokenizer | PretrainedTokenizer | None:
    if (checkpoint / "tokenizer_config.json").is_file():  # converted from a Hugging Face model
        return PretrainedTokenizer.from_folder(checkpoint)
    # A checkpoint carries its own copy; the run folder two levels up has one too.
    for candidate in (checkpoint / TOKENIZER_FILE, checkpoint.parent.parent / TOKENIZER_FILE):
        if candidate.is_file():
            try:
                return Tokenizer.load(candidate)
            except (OSError, ValueError) as error:
                raise CheckpointError(str(error)) from None
    return None


def load_hf_folder(path: str | Path, scheme: str | None = None, group_size: int = 128,
                   quantize_head: bool = False) -> Loaded:
    """A Hugging Face folder, converted to `scheme` (None: float32) layer by layer."""
    imported = load_hf(path, scheme=scheme, group_size=group_size, quantize_head=quantize_head)
    config = {"model": imported.model.cfg.to_dict(), "hf_architecture": imported.architecture}
    return Loaded(imported.model, imported.tokenizer, config, imported.path, None,
                  imported.architecture, imported.generation)


def load(path: str | Path) -> Loaded:
    """Load the model (and tokenizer, when there is one) that `path` names."""
    if is_hf_folder(path):
        return load_hf_folder(path)
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    model, config = load_model(checkpoint, _skeleton)
    scheme = config["weights"]["scheme"] if "weights" in config else None
    tokenizer = _find_tokenizer(checkpoint)
    generation = tokenizer.generation if isinstance(tokenizer, PretrainedTokenizer) else None
    return Loaded(model, tokenizer, config, checkpoint, scheme, config.get("hf_architecture"),
                  generation)


def random_model(preset_name: str, *, seed: int = 0, compute_dtype: str | None = None
                 ) -> Transformer:
    """A randomly initialised model of a preset's shape (for benchmarks)."""
    cfg = preset(preset_name)
    if compute_dtype is not None:
        cfg = cfg.replace(compute_dtype=compute_dtype)
    return Transformer(cfg, key=jax.random.key(seed))


def require_tokenizer(loaded: Loaded) -> Tokenizer | PretrainedTokenizer:
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path}: no {TOKENIZER_FILE} beside the checkpoint or in "
                              "its run folder; text generation needs one")
    return loaded.tokenizer
