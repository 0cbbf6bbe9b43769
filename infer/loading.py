"""Finding and loading what `python -m infer` is pointed at.

`CKPT` may be
- a training run folder (`python -m train --out DIR`): its newest complete checkpoint is used;
- one training checkpoint (`DIR/checkpoints/step_000100`): float or QAT (fake-quant) weights;
- a converted checkpoint (`python -m infer convert`): config.json has a "weights" section;
- a Hugging Face model folder (Llama, Mistral, Qwen2; see `hpllm.hf`), converted in memory.

The skeleton to load into is built with `eqx.filter_eval_shape` (shapes only, no memory) by
applying the same transformation that produced the file: `quantize_for_training` for a training
checkpoint, `quantize_weights` for a converted one. Every file is first checked against the
checkpoint's manifest (`hpllm.checkpoint.verify_checkpoint`); a checkpoint from before
manifests loads unverified (`Loaded.verified` is False). Anything wrong with the folder is a
`CheckpointError` naming the file (and the field, for config.json).
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from hpllm.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    CheckpointError,
    latest_checkpoint,
    load_model,
    read_config,
    verify_checkpoint,
)
from hpllm.config import ModelConfig, preset
from hpllm.errors import UserError
from hpllm.hf import is_hf_folder, load_hf
from hpllm.hf_tokenizer import TOKENIZER_FILES, GenerationDefaults, PretrainedTokenizer
from hpllm.model import Transformer
from hpllm.quant import DEFAULT_TARGETS, GROUP_SIZES, SCHEMES
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
    verified: bool = True  # False: written before manifests, so no checksums to check
    architecture: str | None = None  # the Hugging Face architecture it came from, if any
    generation: GenerationDefaults | None = None


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """The "weights" section of a converted checkpoint's config.json."""

    scheme: str
    group_size: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def weight_format(config: dict[str, Any], source: Path) -> WeightFormat:
    """The checked "weights" section of config.json `source`; errors name the file and field."""
    weights = config["weights"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source}: weights must be a JSON object, got {weights!r:.60}")
    scheme = weights.get("scheme")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise CheckpointError(f"{source}: weights.scheme must be one of {', '.join(SCHEMES)}, "
                              f"got {scheme!r:.60}")
    group_size = weights.get("group_size", 128)
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise CheckpointError(f"{source}: weights.group_size must be one of "
                              f"{', '.join(map(str, GROUP_SIZES))}, got {group_size!r:.60}")
    targets = weights.get("targets", list(DEFAULT_TARGETS))
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) and t for t in targets):
        raise CheckpointError(f"{source}: weights.targets must be a non-empty list of layer "
                              f"patterns such as {list(DEFAULT_TARGETS)}, got {targets!r:.60}")
    return WeightFormat(scheme, group_size, tuple(targets))


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


def input_paths(source: str | Path) -> list[Path]:
    """What a command reading `source` reads: the path itself, the checkpoint it resolves to
    and that checkpoint's run folder (it holds the tokenizer); for `check_output`'s inputs."""
    inputs = [Path(source)]
    if Path(source).exists():
        checkpoint = resolve_checkpoint(source)
        inputs.append(checkpoint)
        if checkpoint.parent.name == "checkpoints":
            inputs.append(checkpoint.parent.parent)
    return inputs


def _skeleton(cfg: ModelConfig, config: dict[str, Any], *, source: Path) -> Transformer:
    """Shapes of the model that config.json `source` describes (float, QAT or converted)."""
    def float_model() -> Transformer:
        return Transformer(cfg, key=jax.random.key(0))

    if "weights" in config:
        weights = weight_format(config, source)
        return eqx.filter_eval_shape(lambda: quantize(
            float_model(), weights.scheme, weights.group_size, weights.targets))
    quant = config.get("quant")
    if quant is None:
        return eqx.filter_eval_shape(float_model)
    from hpllm.quant import QuantConfig, quantize_for_training

    if not isinstance(quant, dict):
        raise CheckpointError(f"{source}: quant must be a JSON object, got {quant!r:.60}")
    try:
        qcfg = QuantConfig.from_dict(quant)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid quant section ({error})") from None
    if qcfg.mode == "none":
        return eqx.filter_eval_shape(float_model)
    return eqx.filter_eval_shape(lambda: quantize_for_training(float_model(), qcfg))


def _find_tokenizer(checkpoint: Path) -> Tokenizer | PretrainedTokenizer | None:
    if (checkpoint / "tokenizer_config.json").is_file():  # converted from a Hugging Face model
        return PretrainedTokenizer.from_folder(checkpoint)
    # A checkpoint carries its own copy; the run folder two levels up has one too.
    for candidate in (checkpoint / TOKENIZER_FILE, checkpoint.parent.parent / TOKENIZER_FILE):
        if candidate.is_file():
            try:
                return Tokenizer.load(candidate)
            except UserError as error:
                raise CheckpointError(str(error)) from None
    return None


def load_hf_folder(path: str | Path, scheme: str | None = None, group_size: int = 128,
                   quantize_head: bool = False) -> Loaded:
    """A Hugging Face folder, converted to `scheme` (None: float32) layer by layer."""
    imported = load_hf(path, scheme=scheme, group_size=group_size, quantize_head=quantize_head)
    config = {"model": imported.model.cfg.to_dict(), "hf_architecture": imported.architecture}
    return Loaded(imported.model, imported.tokenizer, config, imported.path, None,
                  architecture=imported.architecture, generation=imported.generation)


def load(path: str | Path) -> Loaded:
    """Load the model (and tokenizer, when there is one) that `path` names."""
    if is_hf_folder(path):
        return load_hf_folder(path)
    checkpoint = resolve_checkpoint(path)
    verified = verify_checkpoint(checkpoint)
    model, config = load_model(
        checkpoint, functools.partial(_skeleton, source=checkpoint / CONFIG_FILE), verify=False)
    scheme = config["weights"]["scheme"] if "weights" in config else None
    tokenizer = _find_tokenizer(checkpoint)
    generation = tokenizer.generation if isinstance(tokenizer, PretrainedTokenizer) else None
    return Loaded(model, tokenizer, config, checkpoint, scheme, verified=verified,
                  architecture=config.get("hf_architecture"), generation=generation)


def is_converted_checkpoint(path: Path) -> bool:
    """Whether `path` is an earlier output of `convert` and holds nothing else: the only
    folder `convert --force` may replace."""
    path = Path(path)
    written_by_convert = {CONFIG_FILE, "model.safetensors", MANIFEST_FILE, *TOKENIZER_FILES}
    try:
        if not {p.name for p in path.iterdir()} <= written_by_convert:
            return False
        config = read_config(path)
    except (OSError, CheckpointError):
        return False
    return isinstance(config.get("weights"), dict) and "step" not in config


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
