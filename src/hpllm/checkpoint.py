"""Checkpoint folders: `config.json` + one `<part>.safetensors` per pytree (model, optimizer...)
+ `manifest.json`.

Tensor names are the leaves' key paths (`blocks.attn.wq.weight`), so other tools can read the
files. Nothing is pickled. A checkpoint is written into a hidden temporary folder beside its
destination and renamed into place, so a crash mid-write never leaves a half-written
checkpoint under the final name, and an existing folder is replaced only when the caller asks
(`replace=True`). An OS error during the write (full disk, read-only folder, a path under a
file) removes the temporary folder, leaves whatever was there before untouched, and surfaces
as a one-line `PathError`.

`manifest.json`, written last, records the size and SHA-256 of every other file, so
`sha256sum` can check a checkpoint too. `verify_checkpoint` checks a folder against it without
loading anything (train's resume uses it to skip a damaged checkpoint); `load_model` verifies
before loading. Checkpoints written before manifests existed have none (and no "manifest" key
in config.json): they still load, unverified, and `verify_checkpoint` says so by returning
False. Loading then checks every tensor against a skeleton (from `eqx.filter_eval_shape`) and
names the file and the problem when anything does not match.

SHA-256 runs at about 0.75 GiB/s on this development machine (SHA-NI, one core, shared), so
verifying the 536 MB `base` model adds about 0.7 s to a load; the small presets take
milliseconds.
"""

import contextlib
import dataclasses
import errno
import hashlib
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
from safetensors.numpy import load_file, save

from hpllm.config import ModelConfig
from hpllm.errors import PathError, UserError
from hpllm.model import Transformer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
_HASH_CHUNK = 1 << 20

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


def tree_bytes(tree: Any) -> bytes:
    """The array leaves of `tree` as the bytes of one safetensors file."""
    tensors, metadata = {}, {}
    for name, leaf in _named_leaves(tree):
        encoded, byte_view_dtype = _encode(np.asarray(jax.device_get(leaf)))
        # ascontiguousarray turns a 0-d array (an optimizer step counter) into shape [1].
        tensors[name] = np.ascontiguousarray(encoded).reshape(encoded.shape)
        if byte_view_dtype is not None:
            metadata[name] = json.dumps({"dtype": byte_view_dtype, "shape": list(leaf.shape)})
    return save(tensors, metadata=metadata or None)


def save_tree(tree: Any, file: Path) -> None:
    """Write the array leaves of `tree` to one safetensors file (not atomically: checkpoints
    go through `write_checkpoint`)."""
    Path(file).write_bytes(tree_bytes(tree))


def _read_metadata(file: Path) -> dict[str, str]:
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return metadata


def _byte_view(file: Path, name: str, array: np.ndarray, info_text: str) -> np.ndarray:
    """A uint8 tensor read back as the dtype and shape its metadata records."""
    try:
        info = json.loads(info_text)
        dtype = _BYTE_VIEW_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        return array.view(dtype).reshape(shape)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{file}: tensor {name} has invalid dtype metadata "
                              f"{info_text[:80]!r} ({type(error).__name__})") from None


def load_tree(skeleton: Any, file: Path) -> Any:
    """Fill the array leaves of `skeleton` (arrays or `jax.ShapeDtypeStruct`s) from `file`."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        tensors = load_file(str(file))
        metadata = _read_metadata(file)
    except PermissionError as error:
        raise PathError.from_os_error(error, file, "read") from error
    except (SafetensorError, OSError, ValueError, AttributeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({reason})"
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
            array = _byte_view(file, name, array, metadata[name])
        if array.shape != tuple(leaf.shape) or array.dtype != leaf.dtype:
            raise CheckpointError(
                f"{file}: tensor {name} is {array.dtype}{list(array.shape)}, the model expects "
                f"{leaf.dtype}{list(leaf.shape)}")
        values.append(jax.numpy.asarray(array))
    dynamic, static = eqx.partition(skeleton, _is_tensor)
    treedef = jax.tree_util.tree_structure(dynamic)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), static)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(file: Path, data: bytes) -> None:
    with open(file, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    path: Path,
    config: dict[str, Any],
    trees: dict[str, Any],
    files: dict[str, str] | None = None,
    *,
    replace: bool = False,
) -> Path:
    """Atomically write a checkpoint folder at `path`.

    `config` goes to config.json (with the format version and the manifest's name added),
    each entry of `trees` to `<name>.safetensors`, each entry of `files` (name -> text) as is,
    and last `manifest.json` with the size and SHA-256 of each of those files. Everything is
    written into a hidden temporary folder beside `path`, synced, and renamed into place.

    If something exists at `path`, it is replaced only with `replace=True` (after the new
    folder is complete, so a failure leaves it as it was); otherwise a `PathError` refuses.
    Deciding whether a path may be replaced is `hpllm.outputs.check_output`'s job; pass what
    it returns. An OS error (full disk, read-only or missing permission, a file where a folder
    should be) removes the temporary folder and raises `PathError` naming `path`; so does
    Ctrl-C, minus the `PathError`.
    """
    path = Path(path)
    if not replace and os.path.lexists(path):
        raise PathError(f"cannot write {path}: it already exists (not replaced)")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except FileExistsError as error:  # how mkdir says "a file is in the way"
        raise PathError.from_os_error(NotADirectoryError(errno.ENOTDIR, "Not a directory"),
                                      path, "write") from error
    except OSError as error:
        raise PathError.from_os_error(error, path, "write") from error
    written: dict[str, dict[str, Any]] = {}

    def put(name: str, data: bytes) -> None:  # one file's bytes in memory at a time
        _write_file(tmp / name, data)
        written[name] = {"bytes": len(data), "sha256": _sha256(data)}

    try:
        for name, tree in trees.items():
            put(f"{name}.safetensors", tree_bytes(tree))
        for name, text in (files or {}).items():
            put(name, text.encode())
        put(CONFIG_FILE, json.dumps(
            {"format_version": FORMAT_VERSION, **config, "manifest": MANIFEST_FILE},
            indent=2).encode())
        manifest = {"algorithm": "sha256", "files": dict(sorted(written.items()))}
        _write_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_folder(tmp)
        _move_into_place(tmp, path, replace)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PathError.from_os_error(error, path, "write", "nothing there was changed"
                                      ) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # the rename is done; this only hastens durability
        _fsync_folder(path.parent)
    return path


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    if not (replace and os.path.lexists(path)):
        # rename (not replace) fails on a non-empty folder that appeared meanwhile.
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _load_manifest(path: Path) -> dict[str, tuple[int, str]] | None:
    """{file name: (bytes, sha256)} from the manifest; None if the checkpoint predates them."""
    file = path / MANIFEST_FILE
    try:
        text = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PathError.from_os_error(error, file, "read") from error
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict):
            raise TypeError("not a JSON object")
        if manifest["algorithm"] != "sha256":
            raise ValueError(f"unknown algorithm {manifest['algorithm']!r}")
        entries = {}
        for name, entry in manifest["files"].items():
            if (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
                    or not isinstance(entry["bytes"], int) or not isinstance(entry["sha256"], str)):
                raise ValueError(f"bad entry {name!r}")
            entries[name] = (entry["bytes"], entry["sha256"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{file}: corrupt manifest ({type(error).__name__}: "
                              f"{str(error)[:80]}); the checkpoint cannot be verified") from None
    return entries


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> bool:
    """Check every file of checkpoint folder `path` against its `manifest.json`.

    Returns True when all files match, False for a checkpoint written before manifests
    existed (no manifest and no "manifest" key in config.json): it can be loaded, but nothing
    vouches for its bytes. Raises `CheckpointError` naming the first file that is missing,
    has the wrong size or the wrong checksum (or a corrupt manifest, or a missing one that
    config.json says should be there). Loads nothing: a checksum is all it computes.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder there")
    entries = _load_manifest(path)
    if entries is None:
        if _config_names_a_manifest(path):
            raise CheckpointError(f"{path / MANIFEST_FILE}: file not found, though config.json "
                                  "says this checkpoint has one; the checkpoint is damaged")
        return False
    for name, (size, digest) in entries.items():
        file = path / name
        try:
            actual_size = file.stat().st_size
            if actual_size == size:
                actual_digest = _file_sha256(file)
        except FileNotFoundError:
            raise CheckpointError(f"{file}: file not found (listed in {MANIFEST_FILE}); the "
                                  "checkpoint is damaged") from None
        except OSError as error:
            raise PathError.from_os_error(error, file, "read") from error
        if actual_size != size:
            raise CheckpointError(f"{file}: does not match {MANIFEST_FILE} ({actual_size} "
                                  f"bytes, {size} recorded); the file is truncated, damaged "
                                  "or was edited")
        if actual_digest != digest:
            raise CheckpointError(f"{file}: does not match {MANIFEST_FILE} (SHA-256 differs); "
                                  "the file is damaged or was edited")
    return True


def _config_names_a_manifest(path: Path) -> bool:
    try:
        config = json.loads((path / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return False  # read_config reports this when the checkpoint is loaded
    return isinstance(config, dict) and "manifest" in config


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (errors name the file)."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder there")
    try:
        config = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found (not a checkpoint folder?)") from None
    except OSError as error:
        raise PathError.from_os_error(error, file, "read") from error
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{file}: corrupt JSON ({error})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{file}: no 'model' section; not an hpllm checkpoint")
    return config


def _check_field_types(section: dict[str, Any], source: Path, prefix: str) -> None:
    """JSON types of a ModelConfig section: ints are ints (not bools), floats numbers, ..."""
    for field in dataclasses.fields(ModelConfig):
        if field.name not in section:
            continue
        value = section[field.name]
        if field.type is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif field.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, field.type)
        if not ok:
            raise CheckpointError(f"{source}: {prefix}.{field.name} must be a JSON "
                                  f"{_json_type(field.type)}, got {value!r:.60}")


def _json_type(python_type: type) -> str:
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(
        python_type, python_type.__name__)


def model_config(config: dict[str, Any], source: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json `source`; errors name the file and field."""
    section = config.get("model")
    if not isinstance(section, dict):
        raise CheckpointError(f"{source}: 'model' must be a JSON object, got {section!r:.60}")
    _check_field_types(section, source, "model")
    try:
        return ModelConfig.from_dict(section)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid model config ({error})") from None


def save_model(path: Path, model: eqx.Module, extra_config: dict[str, Any] | None = None,
               files: dict[str, str] | None = None, *, replace: bool = False) -> Path:
    """A checkpoint of one model: config.json ({"model": ..., **extra}) + model.safetensors
    (+ manifest.json), by `write_checkpoint` (same `replace` rule)."""
    config = {"model": model.cfg.to_dict(), **(extra_config or {})}
    return write_checkpoint(path, config, {"model": model}, files, replace=replace)


def load_model(
    path: Path,
    make_skeleton: Callable[[ModelConfig, dict[str, Any]], eqx.Module] | None = None,
    *,
    verify: bool = True,
) -> tuple[eqx.Module, dict[str, Any]]:
    """Load `model.safetensors` of a checkpoint; returns (model, config dict).

    `make_skeleton(model_config, config)` builds the tree to fill (shapes only); the default
    is a float `Transformer`. Quantized checkpoints pass a function that applies the same
    conversion to the skeleton. The folder is checked against its manifest first
    (`verify_checkpoint`) unless `verify=False` (for a caller that just did).
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
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


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders `run_dir/checkpoints/step_*`, newest first (none: []).

    Hidden temporary folders (a save that was cut short) do not match `step_*`; a folder
    without config.json is not a checkpoint and is skipped. Whether one is intact is
    `verify_checkpoint`'s question: train's resume walks this list to the newest that is.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    steps = [(checkpoint_step(p), p) for p in folder.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / CONFIG_FILE).is_file()]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder `run_dir/checkpoints/step_*` (see `list_checkpoints`),
    or None."""
    found = list_checkpoints(run_dir)
    return found[0] if found else None


def is_training_output(path: Path) -> bool:
    """Whether `path` is (or holds) something `python -m train` wrote: a run folder
    (checkpoints/, metrics.jsonl) or one training checkpoint (optimizer state, a step)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists() or (
            path / "opt_state.safetensors").exists():
        return True
    try:
        config = json.loads((path / CONFIG_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and ("step" in config or "train" in config)
