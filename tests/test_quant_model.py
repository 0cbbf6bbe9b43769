"""Model-level quantization: QuantConfig, QAT training of the model model in every mode,
delayed-scaling state through `lax.scan`, conversion, checkpoints and logit accuracy."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hpllm.checkpoint import load_model, save_model
from hpllm.config import preset
from hpllm.linear import FloatDot, Linear
from hpllm.model import Transformer
from hpllm.quant import (
    GROUP_SIZES,
    TRAINING_MODE_HELP,
    TRAINING_MODES,
    Fp8QATDot,
    Int4WeightOnlyDot,
    Int8QATDot,
    Int8WeightOnlyDot,
    QuantConfig,
    W4A8Dot,
    W8A8Dot,
    inference_mismatch,
    inference_scheme,
    linear_paths,
    quantize_for_training,
    quantize_weights,
    split_quant_state,
    strip_training_quant,
    training_op,
)

TINY = preset("tiny")


@pytest.fixture(scope="module")
def model():
    """One float model shared by the tests (building it eagerly takes seconds). Trees are
    immutable; `_train` copies what it donates."""
    return Transformer(TINY, key=jax.random.key(0))


def _tokens(seed=1, batch=4, seq=17):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, TINY.vocab_size, jnp.int32)


def test_quant_config_round_trips_through_json():
    qcfg = QuantConfig(mode="fp8", scaling="delayed", amax_history_len=8, quantize_backward=True,
                       mask_clipped_grads=True, group_size=32, targets=("blocks.mlp.*",))
    again = QuantConfig.from_dict(json.loads(json.dumps(qcfg.to_dict())))
    assert again == qcfg and again.targets == ("blocks.mlp.*",)


def test_every_training_mode_name_is_one_config():
    assert TRAINING_MODE_HELP.keys() == TRAINING_MODES.keys()  # each mode is documented
    for name in TRAINING_MODES:
        assert QuantConfig.named(name).name == name
    assert QuantConfig.named("fp8-current") == QuantConfig(mode="fp8", scaling="current")
    assert QuantConfig.named("w4a8", group_size=0).group_size == 0
    assert 0 in GROUP_SIZES


@pytest.mark.parametrize("qcfg", [
    {"mode": "int8"}, {"mode": "int4w"}, {"mode": "w4a8"}, {"mode": "fp8", "scaling": "current"},
])
def test_mask_clipped_grads_is_an_error_where_nothing_clips(qcfg):
    # Absmax scaling maps the largest value to the edge of the range: nothing ever clips.
    with pytest.raises(ValueError, match="mask_clipped_grads applies to fp8 delayed"):
        QuantConfig(**qcfg, mask_clipped_grads=True)


def test_study_settings_build_their_ops_and_convert_with_a_note():
    int8 = QuantConfig.from_dict(QuantConfig(mode="int8", activations="tensor").to_dict())
    assert training_op(int8).activations == "tensor"
    int3 = QuantConfig(mode="int4w", group_size=32, weight_bits=3)
    assert training_op(int3).bits == 3
    # No inference op computes these: conversion picks the nearest format and says so.
    assert inference_scheme(int3) == ("int4", 32) and "int4 grid" in inference_mismatch(int3)
    assert "per token" in inference_mismatch(int8)
    assert inference_mismatch(QuantConfig.named("w4a8")) is None


def test_old_files_with_a_mask_that_did_nothing_still_load():
    old = {"mode": "int8", "scaling": "delayed", "amax_history_len": 16,
           "quantize_backward": False, "mask_clipped_grads": True, "group_size": 128,
           "targets": ["blocks.*"]}
    assert QuantConfig.from_dict(old) == QuantConfig(mode="int8")
    assert QuantConfig.from_dict({"mode": "int4w"}).group_size == 128


@pytest.mark.parametrize(("changes", "field"), [
    ({"mode": "int3"}, "mode"),
    ({"mode": "fp8", "scaling": "lazy"}, "scaling"),
    ({"amax_history_len": 0}, "amax_history_len"),
    ({"group_size": 33}, "group_size"),
    ({"group_size": -2}, "group_size"),
    ({"quantize_backward": "yes"}, "quantize_backward"),
    ({"mode": "int4w", "quantize_backward": True}, "quantize_backward"),
    ({"targets": ()}, "targets"),
    ({"targets": "blocks.*"}, "targets"),
    ({"colour": "blue"}, "colour"),
    ({"mode": "int8", "activations": "channel"}, "activations"),
    ({"mode": "w4a8", "activations": "tensor"}, "activations"),
    ({"mode": "int4w", "weight_bits": 5}, "weight_bits"),
    ({"mode": "int4w", "weight_bits": True}, "weight_bits"),
    ({"mode": "int8", "weight_bits": 3}, "weight_bits"),
])
def test_quant_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig.from_dict(changes)


def test_default_targets_keep_embedding_and_head_float(model):
    # Only the structure matters here: shapes, no arithmetic.
    qat = eqx.filter_eval_shape(quantize_for_training, model, QuantConfig(mode="int8"))
    assert isinstance(qat.lm_head.op, FloatDot)
    assert isinstance(qat.blocks.attn.wq.op, Int8QATDot)
    assert isinstance(qat.blocks.mlp.w_down.op, Int8QATDot)
    converted = eqx.filter_eval_shape(quantize_weights, model, "int8")
    assert converted.lm_head.weight.dtype == jnp.float32 and converted.embed.dtype == jnp.float32
    assert isinstance(converted.blocks.mlp.w_up.op, Int8WeightOnlyDot)
    assert quantize_for_training(model, QuantConfig()) is model
    only_mlp = eqx.filter_eval_shape(quantize_for_training, model,
                                     QuantConfig(mode="int8", targets=("blocks.mlp.*",)))
    assert isinstance(only_mlp.blocks.attn.wq.op, FloatDot)
    assert isinstance(only_mlp.blocks.mlp.w_gate.op, Int8QATDot)
    with pytest.raises(ValueError, match="match no Linear"):
        quantize_weights(model, "int8", targets=("blocks.attn.w_nothing",))
    with pytest.raises(ValueError, match="scheme"):
        quantize_weights(model, "int5")
    assert "lm_head" in linear_paths(model) and "blocks.attn.wq" in linear_paths(model)


def test_delayed_state_has_the_layer_axis_and_splits_from_parameters(model):
    model = quantize_for_training(model,
                                  QuantConfig(mode="fp8", amax_history_len=5,
                                              quantize_backward=True))
    params, state = split_quant_state(model)
    op = state.blocks.attn.wq.op
    assert op.x_scale.history.shape == (TINY.n_layers, 5) and op.g_scale.scale.shape == (2,)
    assert state.blocks.attn.wq.weight is None and params.blocks.attn.wq.op.x_scale.history is None
    rebuilt = eqx.combine(params, state)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(model)
    _, no_state = split_quant_state(quantize_for_training(model, QuantConfig(mode="int8")))
    assert all(leaf is None for leaf in jax.tree.leaves(no_state, is_leaf=lambda x: x is None))


def _train(model, steps, tokens, lr=1e-2):
    """The train step of the `hpllm.quant.api` docstring: the gradient w.r.t. the quant
    state is the new state."""
    # Fresh buffers: the step donates them, and `model` may share arrays with other tests.
    params, state = jax.tree.map(jnp.copy, split_quant_state(model))
    optim = optax.adam(lr)
    opt_state = optim.init(eqx.filter(params, eqx.is_array))

    @eqx.filter_jit(donate="all-except-first")
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(tokens, params, state, opt_state):
        def loss_fn(params_and_state):
            logits = eqx.combine(*params_and_state)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, (g_params, new_state) = eqx.filter_value_and_grad(loss_fn)((params, state))
        # optax's Adam mixes Python floats and int32 step counts: standard promotion here.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(g_params, opt_state, eqx.filter(params, eqx.is_array))
        return eqx.apply_updates(params, updates), new_state, opt_state, loss

    losses, weights_seen = [], []
    for _ in range(steps):
        weights_seen.append(np.asarray(params.blocks.attn.wq.weight))  # donated below
        params, state, opt_state, loss = step(tokens, params, state, opt_state)
        losses.append(float(loss))
    return eqx.combine(params, state), losses, weights_seen


@pytest.mark.parametrize("qcfg", [
    QuantConfig(mode="int8"),
    QuantConfig(mode="fp8", scaling="delayed", amax_history_len=4),
    QuantConfig(mode="fp8", scaling="current"),
    QuantConfig(mode="int4w", group_size=32),
], ids=["int8", "fp8-delayed", "fp8-current", "int4w"])
def test_tiny_model_trains_with_each_qat_mode(model, qcfg):
    model = quantize_for_training(model, qcfg)
    steps = 6
    trained, losses, weights_seen = _train(model, steps, _tokens())
    assert np.all(np.isfinite(losses))
    # One batch, repeated: Adam at 1e-2 must drive the loss down steadily (~0.2 per step in
    # float); a broken gradient path would leave it at log(vocab) = 6.24.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.5, losses
    if qcfg.scaling == "delayed" and qcfg.mode == "fp8":
        # The amax history flowed through lax.scan per layer: the weight's history holds
        # max|W_layer| of the weights each step saw, newest first (history length 4).
        history = np.asarray(trained.blocks.attn.wq.op.w_scale.history)
        for layer in range(TINY.n_layers):
            want = [float(np.max(np.abs(w[layer]))) for w in weights_seen[::-1][:4]]
            np.testing.assert_allclose(history[layer], want, rtol=1e-6)
        assert history[0, 0] != history[1, 0]
        x_history = np.asarray(trained.blocks.mlp.w_down.op.x_scale.history)
        assert np.all(x_history > 0)


def test_quantized_backward_and_masks_train_in_bf16_too(key):
    # bf16 activations exercise the dtype casts of the custom gradients (the cotangent of a
    # bf16 input must be bf16, of a float32 weight float32, of the state float32).
    cfg = TINY.replace(compute_dtype="bfloat16")
    qcfg = QuantConfig(mode="fp8", amax_history_len=4, quantize_backward=True,
                       mask_clipped_grads=True)
    model = quantize_for_training(Transformer(cfg, key=key), qcfg)
    trained, losses, _ = _train(model, 4, _tokens())
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
    assert trained.blocks.attn.wo.weight.dtype == jnp.float32
    assert np.all(np.asarray(trained.blocks.attn.wo.op.g_scale.history) > 0)


def _numpy_dequantized(w, scheme, group_size):
    """Independent reference for what the converted weight should hold (float64)."""
    w = np.asarray(w, np.float64)
    if scheme in ("int8", "w8a8"):
        scale = np.abs(w).max(axis=-2, keepdims=True) / 127
        return np.clip(np.round(w / scale), -127, 127) * scale
    if scheme == "int4":
        *lead, d_in, d_out = w.shape
        rows = -(-d_in // group_size) * group_size
        padded = np.concatenate([w, np.zeros((*lead, rows - d_in, d_out))], axis=-2)
        grouped = padded.reshape(*lead, rows // group_size, group_size, d_out)
        scale = np.abs(grouped).max(axis=-2, keepdims=True) / 7
        q = np.clip(np.round(grouped / scale), -7, 7)
        return (q * scale).reshape(*lead, rows, d_out)[..., :d_in, :]
    raise ValueError(scheme)


@pytest.mark.parametrize(("scheme", "group_size"), [("int8", 128), ("int4", 32)])
def test_converted_model_equals_float_model_with_dequantized_weights(model, scheme, group_size):
    converted = quantize_weights(model, scheme, group_size=group_size)

    def dequantize_in_numpy(x):
        if isinstance(x, Linear) and x is not model.lm_head:
            return eqx.tree_at(lambda lin: lin.weight, x, jnp.asarray(
                _numpy_dequantized(x.weight, scheme, group_size), jnp.float32))
        return x

    reference = jax.tree.map(dequantize_in_numpy, model, is_leaf=lambda x: isinstance(x, Linear))
    tokens = _tokens()
    # Same products up to float32 rounding of the scales and of where they are applied.
    np.testing.assert_allclose(converted(tokens), reference(tokens), rtol=1e-4, atol=1e-5)


# Per-weight rounding noise relative to the weights' spread, for Gaussian weights whose
# channel absmax is ~3 sigma (64-176 values): int8 3/(127 sqrt 12) = 0.7%; e4m3 keeps 3
# mantissa bits, a relative error uniform within +-2^-4..2^-5, rms ~2.6%; int4
# 3/(7 sqrt 12) = 12% (g32 groups have smaller absmax, ~9%). A dot product with inputs
# independent of the noise has the same relative error, the float LM head and residual
# stream add none, and two quantized layers in series grow it by at most ~sqrt 2: the
# tolerance on the rms logit error is twice the per-weight figure.
LOGIT_RELATIVE_RMS_TOLERANCE = {"int8": 0.014, "w8a8": 0.02, "fp8": 0.052, "int4": 0.24}


@pytest.mark.parametrize("scheme", list(LOGIT_RELATIVE_RMS_TOLERANCE))
def test_quantized_logits_stay_close_to_float_logits(model, scheme):
    tokens = _tokens(batch=4, seq=32)
    want = model(tokens)
    got = quantize_weights(model, scheme, group_size=32)(tokens)
    relative_rms = jnp.sqrt(jnp.mean((got - want) ** 2) / jnp.mean(want**2))
    assert float(relative_rms) <= LOGIT_RELATIVE_RMS_TOLERANCE[scheme]
    assert float(relative_rms) > 0


# |fake-quant loss - converted loss| on random tokens (tiny preset, seed 0, 4 x 32 tokens;
# quantization itself moves the loss by 2e-4 (int8) to 1.3e-3 (int4)). Where the activations
# are quantized too (int8 -> w8a8, w4a8 -> w4a8), the fake-quant f32 dot of dequantized values
# and the integer one rounded apart by an ulp now and then (on a Zen 4 only 28% of a 64-deep
# w4a8 product's outputs were bit-equal), and an ulp can carry an activation of the next layer
# across an int8 rounding edge: over 30 token sets (AMD EPYC Zen 4) the loss moved by up to
# 1.1e-5 (int8) and 1.9e-5 (w4a8), and by 0.0 in two thirds of them. int4w -> int4 rounds
# nothing apart (both sides are x @ the same dequantized weight): 0.0 in all 30. Tolerances:
# a few times the largest, and 2 float32 ulps of a loss near 6.3 (1e-6) where it was exact.
TRAINED_FORMAT_LOSS_TOLERANCE = {"int8": 5e-5, "int4w": 1e-6, "w4a8": 5e-5}


@pytest.mark.parametrize(("name", "group_size", "scheme", "op"), [
    ("int8", 128, "w8a8", W8A8Dot),
    ("int4w", 32, "int4", Int4WeightOnlyDot),
    ("int4w", 0, "int4", Int4WeightOnlyDot),
    ("w4a8", 32, "w4a8", W4A8Dot),
    ("w4a8", 0, "w4a8", W4A8Dot),
])
def test_the_trained_format_computes_what_qat_trained(model, name, group_size, scheme, op):
    qcfg = QuantConfig.named(name, group_size=group_size)
    assert inference_scheme(qcfg) == (scheme, group_size)
    converted = quantize_weights(model, scheme, group_size=group_size)
    assert isinstance(converted.blocks.mlp.w_down.op, op)
    if group_size == 0:  # one scale per output channel
        assert converted.blocks.mlp.w_down.weight.scales.shape[-2] == 1
    tokens = _tokens(batch=4, seq=33)

    def loss(m):
        logits = m(tokens[:, :-1])
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits, tokens[:, 1:])))

    fake, real, float_loss = loss(quantize_for_training(model, qcfg)), loss(converted), loss(model)
    assert abs(fake - real) <= TRAINED_FORMAT_LOSS_TOLERANCE[name], (fake, real)
    assert abs(fake - float_loss) > 10 * TRAINED_FORMAT_LOSS_TOLERANCE[name] or name == "int8"


@pytest.mark.parametrize(("scheme", "group_size"), [("int8", 128), ("int4", 32), ("fp8", 128)])
def test_converted_model_round_trips_through_checkpoint_with_eval_shape_skeleton(
        tmp_path, model, scheme, group_size):
    converted = quantize_weights(model, scheme, group_size=group_size)
    save_model(tmp_path / "ckpt", converted,
               {"weights": {"scheme": scheme, "group_size": group_size}})

    def make_skeleton(cfg, config):
        weights = config["weights"]
        return eqx.filter_eval_shape(lambda: quantize_weights(
            Transformer(cfg, key=jax.random.key(0)), weights["scheme"],
            group_size=weights["group_size"]))

    loaded, _ = load_model(tmp_path / "ckpt", make_skeleton)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    tokens = _tokens()
    np.testing.assert_array_equal(loaded(tokens), converted(tokens))
    if scheme == "int4":
        assert isinstance(loaded.blocks.mlp.w_down.op, Int4WeightOnlyDot)
        assert loaded.blocks.mlp.w_down.weight.packed.dtype == jnp.uint8


def test_qat_checkpoint_keeps_the_delayed_state_and_converts_like_a_float_model(tmp_path, model):
    qcfg = QuantConfig(mode="fp8", amax_history_len=4)
    trained, _, _ = _train(quantize_for_training(model, qcfg), 2, _tokens())
    save_model(tmp_path / "ckpt", trained, {"quant": qcfg.to_dict()})

    def make_skeleton(cfg, config):
        return eqx.filter_eval_shape(lambda: quantize_for_training(
            Transformer(cfg, key=jax.random.key(0)), QuantConfig.from_dict(config["quant"])))

    loaded, _ = load_model(tmp_path / "ckpt", make_skeleton)
    assert isinstance(loaded.blocks.attn.wq.op, Fp8QATDot)
    np.testing.assert_array_equal(loaded.blocks.attn.wq.op.x_scale.history,
                                  trained.blocks.attn.wq.op.x_scale.history)
    assert float(jnp.min(loaded.blocks.attn.wq.op.x_scale.history[:, :2])) > 0
    # Conversion reads the float weights whatever the op.
    stripped = strip_training_quant(loaded)
    assert isinstance(stripped.blocks.attn.wq.op, FloatDot)
    from_qat = quantize_weights(loaded, "int8")
    from_float = quantize_weights(stripped, "int8")
    for a, b in zip(jax.tree.leaves(from_qat), jax.tree.leaves(from_float), strict=True):
        np.testing.assert_array_equal(a, b)

