import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hpllm.checkpoint import (
    CheckpointError,
    load_model,
    load_tree,
    read_config,
    save_model,
    save_tree,
)
from hpllm.config import preset
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
    save_model(tmp_path / "ckpt", second)
    _assert_trees_equal(second, load_model(tmp_path / "ckpt")[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_truncated_weights_give_a_clear_error(tmp_path, key):
    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(tmp_path / "ckpt")


def test_garbage_weights_give_a_clear_error(tmp_path, key):
    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ckpt")


def test_mismatched_config_names_the_tensor(tmp_path, key):
    save_model(tmp_path / "ckpt", Transformer(TINY, key=key))
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
