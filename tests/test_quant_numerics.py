"""Quantizers against independent NumPy / ml_dtypes references and their error bounds."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hpllm.quant import Fp8Weight, Int4Weight, Int8Weight
from hpllm.quant.quantizers import (
    dequantize,
    fake_quant_fp8,
    fake_quant_int8,
    int4_quantize_groups,
    int8_scale,
    pack_int4,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)

# Two float32 roundings (x / scale, then q * scale) each move a value by at most 2^-24 of
# itself; bounds below allow that much on top of the format's own rounding error.
F32_ROUNDING = 2.0**-22


def _normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_int8_per_channel_matches_numpy_and_error_is_at_most_half_a_step():
    w = _normal((48, 24)) * jnp.linspace(0.01, 5.0, 24)[None, :]  # very different channels
    quantized = Int8Weight(w)
    wn = np.asarray(w, np.float64)
    scale = np.abs(wn).max(axis=0) / 127
    np.testing.assert_allclose(quantized.scales, scale, rtol=1e-7)
    # np.round rounds half to even, as jnp.round does.
    q_ref = np.clip(np.round(wn / np.asarray(quantized.scales, np.float64)), -127, 127)
    np.testing.assert_array_equal(quantized.values, q_ref.astype(np.int8))
    error = np.abs(np.asarray(quantized.dequantize(), np.float64) - wn)
    assert np.all(error <= scale[None, :] / 2 * (1 + 127 * F32_ROUNDING))
    assert np.abs(np.asarray(quantized.values)).max() == 127  # absmax maps to the end of range


def test_int8_per_token_scales_rows_independently():
    x = _normal((5, 32)) * jnp.array([1e-3, 1.0, 10.0, 1e3, 0.0])[:, None]
    scale = int8_scale(x, axis=-1)
    assert scale.shape == (5, 1)
    np.testing.assert_allclose(scale[:, 0], np.abs(np.asarray(x)).max(axis=1) / 127, rtol=1e-7)
    error = np.abs(np.asarray(fake_quant_int8(x, axis=-1)) - np.asarray(x))
    assert np.all(error <= np.asarray(scale) / 2 * (1 + 127 * F32_ROUNDING))


def test_zero_tensor_gives_zero_scale_and_zeros():
    zeros = jnp.zeros((4, 8), jnp.float32)
    assert float(int8_scale(zeros).reshape(())) == 0.0
    np.testing.assert_array_equal(fake_quant_int8(zeros), zeros)
    np.testing.assert_array_equal(fake_quant_int8(zeros, axis=-1), zeros)
    np.testing.assert_array_equal(fake_quant_fp8(zeros, "e4m3"), zeros)
    np.testing.assert_array_equal(Int4Weight(zeros, 4).dequantize(), zeros)
    np.testing.assert_array_equal(Fp8Weight(zeros).dequantize(), zeros)


def test_out_of_range_values_saturate_instead_of_overflowing():
    x = jnp.array([-1e9, -500.0, 3.0, 500.0, 1e9], jnp.float32)
    one = jnp.ones((1,), jnp.float32)
    np.testing.assert_array_equal(quantize_int(x, one, 127.0), [-127, -127, 3, 127, 127])
    e4m3 = np.asarray(quantize_fp8(x, one, "e4m3").astype(jnp.float32))
    np.testing.assert_array_equal(e4m3, [-448, -448, 3, 448, 448])
    e5m2 = np.asarray(quantize_fp8(x * 1e3, one, "e5m2").astype(jnp.float32))
    np.testing.assert_array_equal(e5m2, [-57344, -57344, 3072, 57344, 57344])


def test_nan_propagates_to_its_group_and_no_further():
    x = _normal((3, 8)).at[1, 2].set(jnp.nan)
    per_token = np.asarray(fake_quant_int8(x, axis=-1))
    assert np.all(np.isnan(per_token[1])) and np.all(np.isfinite(per_token[[0, 2]]))
    assert np.all(np.isnan(np.asarray(fake_quant_int8(x))))  # per tensor: the whole tensor
    fp8 = np.asarray(quantize_fp8(x, jnp.ones((1, 1)), "e4m3").astype(jnp.float32))
    assert np.isnan(fp8[1, 2]) and np.isfinite(np.delete(fp8.ravel(), 10)).all()
    per_channel = np.asarray(Int8Weight(x).dequantize())
    assert np.all(np.isnan(per_channel[:, 2])) and np.isfinite(np.delete(per_channel, 2, 1)).all()


@pytest.mark.parametrize(("fmt", "dtype", "mantissa_bits", "min_normal", "fmax"), [
    ("e4m3", ml_dtypes.float8_e4m3fn, 3, 2.0**-6, 448.0),
    ("e5m2", ml_dtypes.float8_e5m2, 2, 2.0**-14, 57344.0),
])
def test_fp8_matches_ml_dtypes_and_relative_error_is_half_an_ulp(
        fmt, dtype, mantissa_bits, min_normal, fmax):
    # Log-uniform magnitudes over the whole normal range, both signs.
    u = np.random.default_rng(0).uniform(np.log2(min_normal), np.log2(fmax), 4096)
    signs = np.where(np.arange(4096) % 2, 1.0, -1.0)
    x = jnp.asarray(signs * 2.0**u, jnp.float32)
    one = jnp.ones((1,), jnp.float32)
    q = quantize_fp8(x, one, fmt)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                  np.asarray(x).astype(dtype).view(np.uint8))
    relative = np.abs(np.asarray(dequantize(q, one)) - np.asarray(x)) / np.abs(np.asarray(x))
    # Round to nearest with m mantissa bits: at most half an ulp, 2^-(m+1) of the value.
    assert relative.max() <= 2.0 ** -(mantissa_bits + 1)
    # With current scaling (scale = amax / fmax, not a power of two) two f32 roundings join.
    scaled = np.asarray(fake_quant_fp8(x, fmt))
    relative = np.abs(scaled - np.asarray(x)) / np.abs(np.asarray(x))
    assert relative.max() <= 2.0 ** -(mantissa_bits + 1) + F32_ROUNDING


def test_fp8_weight_per_channel_relative_error():
    w = _normal((64, 16)) * jnp.linspace(0.1, 10.0, 16)[None, :]
    quantized = Fp8Weight(w)
    assert quantized.values.dtype == jnp.float8_e4m3fn
    scaled = np.abs(np.asarray(w)) / np.asarray(quantized.scales)[None, :]
    normal = scaled >= 2.0**-6  # below that e4m3 is subnormal: absolute, not relative, error
    relative = np.abs(np.asarray(quantized.dequantize()) - np.asarray(w)) / np.abs(np.asarray(w))
    assert normal.mean() > 0.9
    assert relative[normal].max() <= 2.0**-4 + F32_ROUNDING


def test_int4_pack_unpack_round_trips_every_value_exactly():
    q = jax.random.randint(jax.random.key(0), (3, 10, 7), -8, 8, jnp.int8)
    packed = pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 7)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    every = jnp.arange(-8, 8, dtype=jnp.int8)
    pairs = jnp.stack(jnp.meshgrid(every, every, indexing="ij")).reshape(2, 256)
    np.testing.assert_array_equal(unpack_int4(pack_int4(pairs)), pairs)


def test_int4_nibble_layout_is_low_then_high():
    q = jnp.array([[1, -1], [-2, 7]], jnp.int8)  # rows 0 and 1 share a byte per column
    # Two's complement nibbles: 1 -> 0x1, -2 -> 0xE, -1 -> 0xF, 7 -> 0x7.
    np.testing.assert_array_equal(pack_int4(q), [[0xE1, 0x7F]])


def test_int4_groupwise_error_bound_and_padding():
    # d_in = 40 is not a multiple of 16: the last group is padded with zeros.
    w = _normal((2, 40, 6))
    quantized = Int4Weight(w, group_size=16)
    assert quantized.packed.shape == (2, 24, 6) and quantized.scales.shape == (2, 3, 6)
    wn = np.asarray(w, np.float64)
    padded = np.concatenate([wn, np.zeros((2, 8, 6))], axis=1).reshape(2, 3, 16, 6)
    scale = np.abs(padded).max(axis=2) / 7
    np.testing.assert_allclose(quantized.scales, scale, rtol=1e-7)
    step = np.repeat(scale, 16, axis=1)[:, :40]
    error = np.abs(np.asarray(quantized.dequantize(), np.float64) - wn)
    assert np.all(error <= step / 2 * (1 + 7 * F32_ROUNDING))
    q, _ = int4_quantize_groups(w, 16)
    assert int(jnp.min(q)) >= -7 and int(jnp.max(q)) == 7  # symmetric grid, absmax hits 7
