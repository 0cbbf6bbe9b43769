import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hpllm.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    load_model,
    load_tree,
    read_config,
    save_model,
    save_tree,
    verify_checkpoint,
    write_checkpoint,
)
from hpllm.config import preset
from hpllm.errors import PathError
from hpllm.model import Transformer

TINY = preset("tiny")


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact(tmp_path, key):
    model = Transformer(TINY, key=key)
    save_model(tmp_path / "ckpt", model, {"note": "hello"})
    loaded, config = load_model(tmp_path / "ckpt")
    _assert_trees_equal(model, loaded)
    assert loaded.cfg == TINY
    assert config["note"] == "hello"
    assert config["format_version"] == 1


def test_tensor_names_are_readable_key_paths(tmp_path, key):
    from safetensors.numpy import load_file

    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    names = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "blocks.attn.wq.weight" in names
    assert names["blocks.attn.wq.weight"].shape == (TINY.n_layers, TINY.d_model, TINY.d_model)


def test_low_precision_dtypes_round_trip(tmp_path):
    tree = {
        "bf16": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "e4m3": jnp.array([0.5, -448.0, 3.0], ml_dtypes.float8_e4m3fn),
        "e5m2": jnp.array([1.0, -57344.0], ml_dtypes.float8_e5m2),
        "int8": jnp.array([-127, 0, 127], jnp.int8),
        "packed": jnp.array([0x0F, 0xF0], jnp.uint8),
    }
    save_tree(tree, tmp_path / "t.safetensors")
    _assert_trees_equal(tree, load_tree(tree, tmp_path / "t.safetensors"))


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, key):
    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    second = Transformer(TINY, key=jax.random.key(1))
    save_model(tmp_path / "ckpt", second, replace=True)
    _assert_trees_equal(second, load_model(tmp_path / "ckpt")[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path, key):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(PathError, match="already exists"):
        save_model(folder, Transformer(TINY, key=key))
    assert (folder / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def _unseal(path):
    """Make `path` look like a checkpoint from before manifests, so the loader's own checks
    (not the checksums) meet the damage."""
    (path / MANIFEST_FILE).unlink()
    config = json.loads((path / "config.json").read_text())
    del config["manifest"]
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_weights_give_a_clear_error(tmp_path, key):
    _unseal(save_model(tmp_path / "ckpt", Transformer(TINY, key=key)))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(tmp_path / "ckpt")


def test_garbage_weights_give_a_clear_error(tmp_path, key):
    _unseal(save_model(tmp_path / "ckpt", Transformer(TINY, key=key)))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ckpt")


def test_mismatched_config_names_the_tensor(tmp_path, key):
    _unseal(save_model(tmp_path / "ckpt", Transformer(TINY, key=key)))
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["model"]["d_ff"] = 128
    config_file.write_text(json.dumps(config))
    message = (r"tensor blocks\.mlp\.w_gate\.weight is float32\[2, 64, 176\], "
               r"the model expects float32\[2, 64, 128\]")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ckpt")


def test_missing_and_corrupt_config(tmp_path, key):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "nowhere")
    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    (tmp_path / "ckpt" / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        read_config(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        read_config(tmp_path / "ckpt")


def _sealed(tmp_path, key):
    path = save_model(tmp_path / "ckpt", Transformer(TINY, key=key), {"note": "hello"},
                      {"tokenizer.json": "{}"})
    return path


def test_manifest_records_the_sha256_of_every_file(tmp_path, key):
    path = _sealed(tmp_path, key)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_FILE)
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(manifest["files"]) == files
    for name in files:
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(path) is True


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_changed_bytes_are_caught_and_the_file_named(tmp_path, key, name):
    path = _sealed(tmp_path, key)
    file = path / name
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = b"\xff" * len(data[middle:middle + 400])  # same size
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name}: does not match manifest\.json \(SHA"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"{name}: does not match manifest\.json"):
        load_model(path)


def test_truncated_and_missing_files_are_named(tmp_path, key):
    path = _sealed(tmp_path, key)
    (path / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError,
                       match=r"tokenizer\.json: does not match manifest\.json \(1 bytes, 2 rec"):
        verify_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found \(listed in"):
        verify_checkpoint(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: file not found, though"):
        load_model(path)


def test_a_corrupt_manifest_is_an_error(tmp_path, key):
    path = _sealed(tmp_path, key)
    for text in ("{", "[]", '{"algorithm": "sha256", "files": {"../x": {"bytes": 1, '
                 '"sha256": "00"}}}', '{"algorithm": "md4", "files": {}}'):
        (path / MANIFEST_FILE).write_text(text)
        with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt manifest"):
            verify_checkpoint(path)


def test_checkpoints_from_before_manifests_still_load(tmp_path, key):
    """A checkpoint written before manifests existed: no manifest.json and no "manifest" key
    in config.json. It loads; verify_checkpoint reports it unverified."""
    model = Transformer(TINY, key=key)
    path = save_model(tmp_path / "ckpt", model)
    _unseal(path)
    assert verify_checkpoint(path) is False
    _assert_trees_equal(model, load_model(path)[0])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("d_model", "64", r"model\.d_model must be a JSON integer, got '64'"),
    ("n_layers", True, r"model\.n_layers must be a JSON integer, got True"),
    ("rope_theta", [1], r"model\.rope_theta must be a JSON number"),
    ("tie_embeddings", "yes", r"model\.tie_embeddings must be a JSON true/false"),
    ("compute_dtype", 3, r"model\.compute_dtype must be a JSON string"),
])
def test_wrong_json_types_in_the_model_config_name_the_file_and_field(
        tmp_path, key, field, value, message):
    path = save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    _unseal(path)  # as if hand-edited in a checkpoint from before manifests
    config = json.loads((path / "config.json").read_text())
    config["model"][field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_model(path)


def test_a_full_disk_leaves_no_temporary_and_earlier_checkpoints_load(
        small_filesystem, key):
    disk = small_filesystem.mount("1m")  # one tiny checkpoint (~0.65 MB) fits, two do not
    first = Transformer(TINY, key=key)
    save_model(disk / "step_1", first)
    second = Transformer(TINY, key=jax.random.key(1))
    with pytest.raises(PathError, match=r"cannot write .*step_2: No space left on device"):
        save_model(disk / "step_2", second)
    with pytest.raises(PathError, match=r"step_1: No space left on device"):
        save_model(disk / "step_1", second, replace=True)
    assert [p.name for p in disk.iterdir()] == ["step_1"]
    _assert_trees_equal(first, load_model(disk / "step_1")[0])


def test_a_read_only_disk_is_one_clear_error(small_filesystem, key):
    disk = small_filesystem.mount("4m")
    small_filesystem.remount_read_only(disk)
    with pytest.raises(PathError, match=r"cannot write .*ckpt: Read-only file system"):
        save_model(disk / "ckpt", Transformer(TINY, key=key))


@pytest.mark.parametrize(("where", "reason"), [
    ("file/ckpt", "Not a directory"),
    ("/proc/hpllm-test/ckpt", "No such file or directory"),
])
def test_impossible_paths_are_one_clear_error(tmp_path, key, where, reason):
    (tmp_path / "file").write_text("a file")
    path = tmp_path / where  # an absolute `where` stays itself
    with pytest.raises(PathError, match=rf"cannot write {path}: {reason}"):
        write_checkpoint(path, {"model": TINY.to_dict()}, {"model": Transformer(TINY, key=key)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_permission_denied_on_read_is_one_clear_error(tmp_path, key):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = _sealed(tmp_path, key)
    (path / "model.safetensors").chmod(0)
    with pytest.raises(PathError, match=r"cannot read .*Permission denied"):
        load_model(path)
