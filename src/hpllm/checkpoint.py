"""Checkpoint folders: `config.json` + one `<part>.safetensors` per pytree (model, optimizer...).

Tensor names are the leaves' key paths (`blocks.attn.wq.weight`), so other tools can read the
files. Nothing is pickled. A checkpoint is written into a hidden temporary folder beside its
destination and renamed into place, so a crash mid-write never leaves a half-written
checkpoint under the final name. Loading checks every tensor against a skeleton (from
`eqx.filter_eval_shape`) and names the file and the problem when anything does not match.
"""

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hpllm.config import ModelConfig
from hpllm.errors import UserError
from hpllm.model import Transformer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"

# safetensors' NumPy API knows only NumPy's own dtypes; these travel as raw bytes (uint8) and
# their real dtype is recorded in the file's metadata.
_BYTE_VIEW_DTYPES = {
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or does not match what is being loaded."""


def _is_tensor(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(tree, _is_tensor))
    return [(_leaf_name(path), leaf) for path, leaf in leaves]


def _encode(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    name = array.dtype.name
    if name in _BYTE_VIEW_DTYPES:
        return array.reshape(-1).view(np.uint8), name
    return array, None


def save_tree(tree: Any, file: Path) -> None:
    """Write the array leaves of `tree` to one safetensors file."""
    tensors, metadata = {}, {}
    for name, leaf in _named_leaves(tree):
        encoded, byte_view_dtype = _encode(np.asarray(jax.device_get(leaf)))
        # ascontiguousarray turns a 0-d array (an optimizer step counter) into shape [1].
        tensors[name] = np.ascontiguousarray(encoded).reshape(encoded.shape)
        if byte_view_dtype is not None:
            metadata[name] = json.dumps({"dtype": byte_view_dtype, "shape": list(leaf.shape)})
    save_file(tensors, str(file), metadata=metadata or None)


def _read_metadata(file: Path) -> dict[str, str]:
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return header.get("__metadata__") or {}


def load_tree(skeleton: Any, file: Path) -> Any:
    """Fill the array leaves of `skeleton` (arrays or `jax.ShapeDtypeStruct`s) from `file`."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        tensors = load_file(str(file))
        metadata = _read_metadata(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({error})"
                              ) from None
    expected = _named_leaves(skeleton)
    missing = [name for name, _ in expected if name not in tensors]
    unexpected = sorted(set(tensors) - {name for name, _ in expected})
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: tensors do not match the model (missing: {missing[:5] or 'none'}, "
            f"unexpected: {unexpected[:5] or 'none'}); was it written for another config?")
    values = []
    for name, leaf in expected:
        array = tensors[name]
        if name in metadata:
            info = json.loads(metadata[name])
            array = array.view(_BYTE_VIEW_DTYPES[info["dtype"]]).reshape(info["shape"])
        if array.shape != tuple(leaf.shape) or array.dtype != leaf.dtype:
            raise CheckpointError(
                f"{file}: tensor {name} is {array.dtype}{list(array.shape)}, the model expects "
                f"{leaf.dtype}{list(leaf.shape)}")
        values.append(jax.numpy.asarray(array))
    dynamic, static = eqx.partition(skeleton, _is_tensor)
    treedef = jax.tree_util.tree_structure(dynamic)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), static)


def write_checkpoint(
    path: Path,
    config: dict[str, Any],
    trees: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Atomically write a checkpoint folder at `path`.

    `config` goes to config.json (with the format version added), each entry of `trees` to
    `<name>.safetensors`, each entry of `files` (name -> text) as is. An existing folder at
    `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, tree in trees.items():
            save_tree(tree, tmp / f"{name}.safetensors")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        config_text = json.dumps({"format_version": FORMAT_VERSION, **config}, indent=2)
        (tmp / CONFIG_FILE).write_text(config_text)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (errors name the file)."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder there")
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found (not a checkpoint folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file}: corrupt JSON ({error})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{file}: no 'model' section; not an hpllm checkpoint")
    return config


def model_config(config: dict[str, Any], source: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid model config ({error})") from None


def save_model(path: Path, model: eqx.Module, extra_config: dict[str, Any] | None = None,
               files: dict[str, str] | None = None) -> Path:
    """A checkpoint of one model: config.json ({"model": ..., **extra}) + model.safetensors."""
    config = {"model": model.cfg.to_dict(), **(extra_config or {})}
    return write_checkpoint(path, config, {"model": model}, files)


def load_model(
    path: Path,
    make_skeleton: Callable[[ModelConfig, dict[str, Any]], eqx.Module] | None = None,
) -> tuple[eqx.Module, dict[str, Any]]:
    """Load `model.safetensors` of a checkpoint; returns (model, config dict).

    `make_skeleton(model_config, config)` builds the tree to fill (shapes only); the default
    is a float `Transformer`. Quantized checkpoints pass a function that applies the same
    conversion to the skeleton.
    """
    path = Path(path)
    config = read_config(path)
    cfg = model_config(config, path / CONFIG_FILE)
    if make_skeleton is None:
        skeleton = eqx.filter_eval_shape(Transformer, cfg, key=jax.random.key(0))
    else:
        skeleton = make_skeleton(cfg, config)
    return load_tree(skeleton, path / "model.safetensors"), config


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step_NNNNNN` folder name, None for any other name."""
    name = Path(path).name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder `run_dir/checkpoints/step_*`, or None.

    Hidden temporary folders (a save that was cut short) do not match `step_*`; a folder
    without config.json (written last) is not complete and is skipped.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(checkpoint_step(p), p) for p in folder.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / CONFIG_FILE).is_file()]
    return max(steps)[1] if steps else None
