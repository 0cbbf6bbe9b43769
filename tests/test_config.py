import equinox as eqx
import jax
import pytest

from hpllm.config import PRESETS, ModelConfig, preset
from hpllm.model import Transformer


def _counted_params(cfg: ModelConfig) -> int:
    model = eqx.filter_eval_shape(Transformer, cfg, key=jax.random.key(0))
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return sum(leaf.size for leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_n_params_equals_counted_leaves(name):
    cfg = PRESETS[name]
    assert cfg.n_params == _counted_params(cfg)


def test_n_params_with_tied_embeddings_and_gqa():
    cfg = preset("tiny").replace(tie_embeddings=True, n_kv_heads=1)
    assert cfg.n_params == _counted_params(cfg)


def test_preset_sizes():
    assert preset("tiny").n_params < 1_000_000
    assert 10_000_000 <= preset("small").n_params <= 20_000_000
    base = preset("base")
    assert (base.d_model, base.n_layers, base.n_heads, base.n_kv_heads, base.d_ff,
            base.vocab_size, base.max_seq_len, base.tie_embeddings) == (
        768, 12, 12, 12, 2048, 32000, 1024, False)
    assert 133_000_000 < base.n_params < 135_000_000


def test_json_round_trip():
    cfg = preset("small").replace(compute_dtype="bfloat16", tie_embeddings=True)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"d_model": 66, "n_heads": 4}, "d_model"),
        ({"d_model": 12, "n_heads": 4, "n_kv_heads": 4}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny").replace(**changes)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "colour": "red"})
