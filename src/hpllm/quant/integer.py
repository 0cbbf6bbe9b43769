"""Real low-precision matmuls: int8 x int8 -> int32, and fp8 x fp8 with float32 accumulation.

Fake quantization (fake_quant.py) multiplies dequantized floats and accumulates in float32;
a real integer matmul multiplies the int8 values and accumulates exactly in int32, then
rescales once. The two agree exactly while every float32 partial sum is an integer below
2^24 times the scales (true for small contracting dims: 127 * 127 * k < 2^24 needs
k <= 1040); beyond that float32 accumulation rounds and int32 does not (tests show a case).

Scales must be constant along the contracted axis to factor out of the sum, which is why
activations are scaled per token (row) and weights per output channel (column).
"""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, Int32, UInt8

from hpllm.linear import MatmulOp
from hpllm.quant.quantizers import (
    INT8_MAX,
    fp8_scale,
    int8_scale,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)
from hpllm.quant.weight_only import Int4Weight, Int8Weight


def int8_matmul(qx: Int8[Array, "*batch k"], qw: Int8[Array, "k n"]) -> Int32[Array, "*batch n"]:
    """Exact integer matmul: int8 products summed in int32 (|sum| <= 127^2 k, no overflow
    below k = 133 000)."""
    return jnp.matmul(qx, qw, preferred_element_type=jnp.int32)


def int8_scaled_matmul(
    qx: Int8[Array, "*batch k"],
    x_scale: Float[Array, "*batch 1"],
    qw: Int8[Array, "k n"],
    w_scale: Float[Array, "1 n"],
) -> Float[Array, "*batch n"]:
    """`(qx @ qw) * x_scale * w_scale`: per-row activation scales, per-column weight scales."""
    acc = int8_matmul(qx, qw).astype(jnp.float32)
    return acc * x_scale * w_scale.reshape((1,) * (acc.ndim - 1) + (-1,))


def int8_dot(x: Float[Array, "*batch k"], w: Float[Array, "k n"]) -> Float[Array, "*batch n"]:
    """Dynamic int8 matmul of float operands: x per token, w per output channel (absmax),
    int32 accumulation. The integer twin of `Int8QATDot`'s forward (float32 result)."""
    x_scale, w_scale = int8_scale(x, axis=-1), int8_scale(w, axis=-2)
    return int8_scaled_matmul(quantize_int(x, x_scale, INT8_MAX), x_scale,
                              quantize_int(w, w_scale, INT8_MAX), w_scale)


def fp8_matmul(qx: Float[Array, "*batch k"], qw: Float[Array, "k n"]
               ) -> Float[Array, "*batch n"]:
    """fp8 x fp8 with float32 accumulation. Backends with fp8 matrix units (H100 and later)
    run it natively; the CPU backend widens the operands to float32 first."""
    return jnp.matmul(qx, qw, preferred_element_type=jnp.float32)


def fp8_dot(x: Float[Array, "*batch k"], w: Float[Array, "k n"]) -> Float[Array, "*batch n"]:
    """Per-tensor current-scaled e4m3 matmul of float operands (float32 result)."""
    x_scale, w_scale = fp8_scale(x, "e4m3"), fp8_scale(w, "e4m3")
    acc = fp8_matmul(quantize_fp8(x, x_scale, "e4m3"), quantize_fp8(w, w_scale, "e4m3"))
    return acc * (x_scale.reshape(()) * w_scale.reshape(()))


class W8A8Dot(MatmulOp):
    """W8A8 inference op: int8 weights (per channel) and activations quantized per token on
    the fly, multiplied in int8 with int32 accumulation."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int8Weight
                 ) -> Float[Array, "*batch d_out"]:
        x_scale = int8_scale(x, axis=-1)
        y = int8_scaled_matmul(quantize_int(x, x_scale, INT8_MAX), x_scale,
                               weight.values, weight.scales[None, :])
        return y.astype(x.dtype)


def w4a8_matmul(x: Float[Array, "*batch d_in"], packed: UInt8[Array, "half_padded_d_in d_out"],
                scales: Float[Array, "groups d_out"], d_in: int) -> Float[Array, "*batch d_out"]:
    """int4 group-wise weights (`Int4Weight`'s packed values and scales) times activations
    quantized to int8 per token: each group an exact int32 matmul, rescaled by its group's
    scales; the groups summed in float32, then the token's scale."""
    x_scale = int8_scale(x, axis=-1)
    qx = quantize_int(x, x_scale, INT8_MAX)
    qw = unpack_int4(packed)  # [padded_d_in, d_out]
    groups, d_out = scales.shape
    rows = qw.shape[0]
    pad = [(0, 0)] * (qx.ndim - 1) + [(0, rows - d_in)]
    qx = jnp.pad(qx, pad).reshape(*qx.shape[:-1], groups, rows // groups)
    acc = jnp.einsum("...gk,gkn->...gn", qx, qw.reshape(groups, rows // groups, d_out),
                     preferred_element_type=jnp.int32)
    w_scales = scales.reshape((1,) * (acc.ndim - 2) + (groups, d_out))
    y = jnp.sum(acc.astype(jnp.float32) * w_scales, axis=-2) * x_scale
    return y.astype(x.dtype)


class W4A8Dot(MatmulOp):
    """W4A8 inference op: int4 group-wise weights and activations quantized to int8 per token
    on the fly. The weight scale varies along d_in, so each group is an exact int32 matmul,
    rescaled by its group's scales, and the groups are summed in float32 (`w4a8_matmul`)."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int4Weight
                 ) -> Float[Array, "*batch d_out"]:
        return w4a8_matmul(x, weight.packed, weight.scales, weight.d_in)
