"""Matmul ops: fake quantization vs real integer matmuls, straight-through gradients,
clipped-gradient masks, quantized backward passes and fp8 delayed scaling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hpllm.quant import (
    DelayedScale,
    Fp8QATDot,
    Int4WeightQATDot,
    Int8QATDot,
    Int8Weight,
    W8A8Dot,
)
from hpllm.quant.fake_quant import fake_quant_ste
from hpllm.quant.integer import fp8_dot, int8_dot
from hpllm.quant.quantizers import (
    fake_quant_fp8,
    fake_quant_int4,
    fake_quant_int8,
    int4_quantize_groups,
    int_qmax,
)


def _int_grid(key, shape, low, high):
    return jax.random.randint(key, shape, low, high + 1, jnp.int32)


def _power_of_two_scaled(q, exponents):
    """Float operands whose absmax scales are exact powers of two: with every row (or
    column) holding a +-127, scale = 127 * 2^e / 127 = 2^e, so dequantization is exact."""
    return q.astype(jnp.float32) * exponents


def test_fake_quant_int8_equals_real_int8_matmul_when_f32_accumulation_is_exact():
    kx, kw = jax.random.split(jax.random.key(0))
    k = 64  # 127 * 127 * 64 < 2^24: every float32 partial sum is an exact integer * 2^e
    qx = _int_grid(kx, (8, k), -127, 127).at[:, 0].set(127)
    qw = _int_grid(kw, (k, 16), -127, 127).at[3, :].set(-127)
    x = _power_of_two_scaled(qx, 2.0 ** jnp.arange(-4, 4, dtype=jnp.float32)[:, None])
    w = _power_of_two_scaled(qw, 2.0 ** -jnp.arange(16, dtype=jnp.float32)[None, :])
    fake = Int8QATDot()(x, w)
    real = int8_dot(x, w)
    np.testing.assert_array_equal(fake, real)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_array_equal(real, exact.astype(np.float32))
    # The W8A8 inference op is the same integer path.
    np.testing.assert_array_equal(W8A8Dot()(x, Int8Weight(w)), real)


def test_fake_and_real_int8_differ_for_large_contracting_dims():
    # All products positive and large, k = 16384: partial sums reach ~2.5e8 > 2^24, where
    # float32 has an ulp of up to 16 and drops the low bits of each odd product; int32 adds
    # exactly (|sum| < 127^2 k < 2^31) and rounds once, when the sum becomes float32.
    kx, kw = jax.random.split(jax.random.key(1))
    k = 16384
    qx = _int_grid(kx, (4, k), 64, 127).at[:, 0].set(127)
    qw = _int_grid(kw, (k, 4), 64, 127).at[0, :].set(127)
    x, w = qx.astype(jnp.float32), qw.astype(jnp.float32)  # scales are exactly 1
    exact = np.asarray(qx, np.int64) @ np.asarray(qw, np.int64)
    real = np.asarray(int8_dot(x, w))
    np.testing.assert_array_equal(real, exact.astype(np.float32))
    fake = np.asarray(Int8QATDot()(x, w))
    assert np.any(fake != real)
    # Each of the k additions rounds by at most half an ulp of the running sum (<= 8 here).
    assert np.abs(fake.astype(np.float64) - exact).max() <= k * 8


def test_fp8_dot_equals_fake_quant_with_exact_accumulation():
    x = _normal((6, 32))
    w = _normal((32, 5), seed=1)
    scale = jnp.max(jnp.abs(x)) / 448 * jnp.max(jnp.abs(w)) / 448
    fake = Fp8QATDot(scaling="current")(x, w)
    # e4m3 values have 4 significant bits, so products have 8 and 32 of them sum exactly in
    # float32; only the rescaling rounds differently (scale applied after vs before the sum).
    np.testing.assert_allclose(fp8_dot(x, w), fake, rtol=1e-6, atol=1e-6 * float(scale) * 448**2)


def _normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _float_grads(x_deq, w_deq, r):
    """Reference: gradients of the float matmul of the dequantized operands."""
    return jax.grad(lambda a, b: jnp.sum((a @ b) * r), argnums=(0, 1))(x_deq, w_deq)


def _op_grads(op, x, w, r):
    return jax.grad(lambda a, b: jnp.sum(op(a, b) * r), argnums=(0, 1))(x, w)


def test_straight_through_gradient_equals_float_gradient_of_dequantized_operands():
    x, w, r = _normal((2, 5, 24)), _normal((24, 12), 1), _normal((2, 5, 12), 2)
    cases = [
        (Int8QATDot(), fake_quant_int8(x, axis=-1), fake_quant_int8(w, axis=-2)),
        (Fp8QATDot(scaling="current"), fake_quant_fp8(x, "e4m3"), fake_quant_fp8(w, "e4m3")),
        (Int4WeightQATDot(group_size=8), x, fake_quant_int4(w, 8)),
    ]
    for op, x_deq, w_deq in cases:
        np.testing.assert_allclose(op(x, w), x_deq @ w_deq, rtol=1e-5, atol=1e-5)
        want_dx, want_dw = _float_grads(x_deq, w_deq, r)
        got_dx, got_dw = _op_grads(op, x, w, r)
        # Same float32 products; only the summation order of XLA's dots may differ.
        np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def test_clipped_positions_get_zero_gradient_only_with_the_mask():
    scale = jnp.ones((1,), jnp.float32)
    cases = [
        # int8 clips after rounding: 127.4 rounds to 127 (kept), 127.5 rounds to 128 (clipped).
        ("int8", [-300.0, -127.0, -3.2, 0.0, 5.0, 127.4, 127.5, 1e6], [0, 1, 1, 1, 1, 1, 0, 0]),
        # fp8 saturates before the cast: anything beyond 448 was changed by the clip.
        ("e4m3", [-500.0, -448.0, -3.2, 0.0, 5.0, 448.0, 449.0, 1e6], [0, 1, 1, 1, 1, 1, 0, 0]),
    ]
    for fmt, values, inside in cases:
        x = jnp.array(values, jnp.float32)
        masked = jax.grad(lambda v, f=fmt: jnp.sum(fake_quant_ste(v, scale, f, True)))(x)
        np.testing.assert_array_equal(masked, np.array(inside, np.float32))
        plain = jax.grad(lambda v, f=fmt: jnp.sum(fake_quant_ste(v, scale, f)))(x)
        np.testing.assert_array_equal(plain, np.ones(8, np.float32))


def test_fp8_delayed_mask_zeroes_gradient_where_the_stale_scale_clipped():
    x, w, r = _normal((4, 16)) * 3, _normal((16, 8), 1), _normal((4, 8), 2)
    op = Fp8QATDot(scaling="delayed", amax_history_len=4, mask_clipped_grads=True)
    # History says amax was 2 (x's amax is ~9), weight history matches w's amax exactly.
    op = eqx.tree_at(lambda o: (o.x_scale.history, o.w_scale.history), op,
                     (jnp.array([2.0, 0, 0, 0]), jnp.array([float(jnp.max(jnp.abs(w))), 0, 0, 0])))
    x_scale = 2.0 / 448
    x_deq = np.clip(np.asarray(x) / x_scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    x_deq = jnp.asarray(x_deq.astype(np.float32) * x_scale)
    w_deq = fake_quant_fp8(w, "e4m3")
    np.testing.assert_allclose(op(x, w), x_deq @ w_deq, rtol=1e-5, atol=1e-5)
    want_dx, want_dw = _float_grads(x_deq, w_deq, r)
    clipped = np.abs(np.asarray(x)) > 2.0
    assert clipped.any() and not clipped.all()
    got_dx, got_dw = _op_grads(op, x, w, r)
    np.testing.assert_allclose(got_dx, np.where(clipped, 0.0, want_dx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def test_int8_quantized_backward_quantizes_the_incoming_gradient():
    x, w, r = _normal((6, 16)), _normal((16, 8), 1), _normal((6, 8), 2)
    x_deq, w_deq = fake_quant_int8(x, axis=-1), fake_quant_int8(w, axis=-2)
    # dx contracts d_out: g scaled per row; dw contracts tokens: g scaled per column.
    want_dx = fake_quant_int8(r, axis=-1) @ w_deq.T
    want_dw = x_deq.T @ fake_quant_int8(r, axis=-2)
    got_dx, got_dw = _op_grads(Int8QATDot(quantize_backward=True), x, w, r)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)
    plain_dx, _ = _op_grads(Int8QATDot(), x, w, r)
    assert not np.allclose(got_dx, plain_dx, rtol=1e-7, atol=0)


def _e4m3(v, scale):
    """Independent reference: ml_dtypes cast of the saturated scaled value, dequantized."""
    q = np.clip(np.asarray(v, np.float32) / np.float32(scale), -448, 448)
    return q.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


def test_delayed_scaling_history_and_scale_after_jitted_steps_match_hand_computation():
    history_len, steps = 3, 6
    op = Fp8QATDot(scaling="delayed", amax_history_len=history_len, quantize_backward=True)
    params, state = eqx.partition(op, lambda leaf: False)  # the op has no parameters
    base_x, w = _normal((4, 8)), _normal((8, 5), 1)
    base_r = _normal((4, 5), 2)
    x_gain = [1.0, 4.0, 0.5, 2.0, 8.0, 0.25]  # amaxes that rise and fall
    g_gain = [1e-3, 1e-2, 1e-4, 1e-3, 1e-1, 1e-2]

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)  # the state's shapes never change
    def step(state, x, r):
        # The gradient w.r.t. the state is the new state.
        y, pullback = jax.vjp(lambda s: eqx.combine(params, s)(x, w), state)
        return y, pullback(r)[0]

    # Hand computation: plain Python floats, newest amax first, scale = max(history) / fmax
    # of the *previous* steps (initially 1.0, kept while the history is all zero).
    hist = {"x": [0.0] * history_len, "w": [0.0] * history_len, "g": [0.0] * history_len}
    scale = {"x": 1.0, "w": 1.0, "g": 1.0}
    fmax = {"x": 448.0, "w": 448.0, "g": 57344.0}
    for t in range(steps):
        x, r = base_x * x_gain[t], base_r * g_gain[t]
        y, state = step(state, x, r)
        amax = {"x": float(jnp.max(jnp.abs(x))), "w": float(jnp.max(jnp.abs(w))),
                "g": float(jnp.max(jnp.abs(r)))}
        for name in hist:
            if max(hist[name]) > 0:
                scale[name] = max(hist[name]) / fmax[name]
            hist[name] = [amax[name]] + hist[name][:-1]
        # The forward used this step's (stale) scales.
        want_y = _e4m3(x, scale["x"]) @ _e4m3(w, scale["w"])
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    for name, meta in (("x", state.x_scale), ("w", state.w_scale), ("g", state.g_scale)):
        np.testing.assert_allclose(meta.history, hist[name], rtol=1e-7)
        np.testing.assert_allclose(meta.scale, scale[name], rtol=1e-6)


def test_delayed_scale_keeps_previous_scale_for_zero_or_nonfinite_history():
    from hpllm.quant.quantizers import delayed_scale

    state = DelayedScale(4)
    assert float(delayed_scale(state, "e4m3")) == 1.0
    state = eqx.tree_at(lambda s: (s.history, s.scale), state,
                        (jnp.array([jnp.inf, 1.0, 0.0, 0.0]), jnp.array(0.5)))
    assert float(delayed_scale(state, "e4m3")) == 0.5
    state = eqx.tree_at(lambda s: s.history, state, jnp.array([448.0, 1.0, 0.0, 0.0]))
    assert float(delayed_scale(state, "e4m3")) == 1.0


def _reference_fake_quant(v, axis, qmax):
    """Absmax quantize -> dequantize in float64 numpy (ties to even, as jnp.round)."""
    v = np.asarray(v, np.float64)
    scale = np.max(np.abs(v), axis=axis, keepdims=True) / qmax
    return np.clip(np.round(v / scale), -qmax, qmax) * scale


def test_int8_per_tensor_activations_use_one_scale_for_the_whole_tensor():
    kx, kw = jax.random.split(jax.random.key(7))
    spread_columns = jnp.arange(1, 49, dtype=jnp.float32)[None, None]
    x = jax.random.normal(kx, (2, 5, 48), jnp.float32) * spread_columns
    w = jax.random.normal(kw, (48, 16), jnp.float32)
    got = Int8QATDot(activations="tensor")(x, w)
    want = _reference_fake_quant(x, None, 127) @ _reference_fake_quant(w, 0, 127)
    # float32 matmul of the same dequantized operands, outputs up to ~540: measured max
    # error 8.5e-5; tolerance a few times that.
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-4)
    per_token = Int8QATDot()(x, w)
    assert float(jnp.max(jnp.abs(per_token - got))) > 1e-3  # the two really differ


@pytest.mark.parametrize(("bits", "qmax"), [(4, 7), (3, 3), (2, 1)])
def test_narrow_weight_grids_round_each_group_to_plus_minus_qmax(bits, qmax):
    w = jax.random.normal(jax.random.key(bits), (2, 64, 24), jnp.float32)
    assert int_qmax(bits) == qmax
    got = fake_quant_int4(w, 32, int_qmax(bits))
    groups = np.asarray(w, np.float64).reshape(2, 2, 32, 24)
    want = _reference_fake_quant(groups, 2, qmax).reshape(2, 64, 24)
    # float32 scales and products, |w| < 4: measured max error 2.7e-7; tolerance 1e-6.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    q, _ = int4_quantize_groups(w, 32, int_qmax(bits))
    assert set(np.unique(np.asarray(q))) <= set(range(-qmax, qmax + 1))
    # The QAT op multiplies by exactly these weights: float32 sums of 64 products, outputs
    # up to ~27, measured max error 4.5e-6; tolerance 2e-5.
    x = jax.random.normal(jax.random.key(9), (3, 64), jnp.float32)
    op = Int4WeightQATDot(group_size=32, bits=bits)
    np.testing.assert_allclose(op(x, w[0]), np.asarray(x, np.float64) @ want[0], rtol=0,
                               atol=2e-5)


def test_weight_bits_outside_two_to_four_are_refused():
    with pytest.raises(ValueError, match="must be 2, 3 or 4"):
        int_qmax(5)
