"""Weight-only quantization for inference: quantized weight tensors and the matching ops.

Decoding at small batch is memory bound: each step reads every weight once, so weight bytes
set the speed. These formats store int8 (1 byte), packed int4 (0.5 byte + a scale per group)
or fp8 e4m3 (1 byte) per weight; activations stay float (f32/bf16). The ops dequantize
inside the jitted matmul:

- int8 and fp8, per-channel scales: `(x @ q) * scale` - the scale is constant along the
  contracted d_in axis, so it is applied once to the output instead of to every weight;
- int4, group-wise scales: the scale varies along d_in, so the weight is unpacked and scaled
  (`q * scale[group]`) right before the dot; XLA fuses unpack + convert + scale into one loop.

Where XLA can feed converted operands straight to its matmul (GPU), no float copy of the
weight reaches memory; the CPU backend materialises the converted operand in a temporary
(see docs/numerics.md for what that costs here).

Weight tensors may carry leading layer axes (`Transformer.blocks` is stacked); `lax.scan`
hands each op one layer's slice.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, UInt8

from hpllm.linear import MatmulOp
from hpllm.quant.quantizers import (
    E4M3_MAX,
    INT8_MAX,
    absmax,
    dequantize,
    int4_dequantize_groups,
    int4_quantize_groups,
    pack_int4,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)


def _per_channel_scale(w: Float[Array, "*layers d_in d_out"], qmax: float
                       ) -> Float[Array, "*layers 1 d_out"]:
    return absmax(w, axis=-2) / qmax


def _scale_columns(y: Float[Array, "*batch d_out"], scales: Float[Array, " d_out"]
                   ) -> Float[Array, "*batch d_out"]:
    return y * scales.reshape((1,) * (y.ndim - 1) + (-1,))


class Int8Weight(eqx.Module):
    """int8 values with one absmax scale per output channel."""

    values: Int8[Array, "*layers d_in d_out"]
    scales: Float[Array, "*layers d_out"]

    def __init__(self, w: Float[Array, "*layers d_in d_out"]):
        scale = _per_channel_scale(w, INT8_MAX)
        self.values = quantize_int(w, scale, INT8_MAX)
        self.scales = scale[..., 0, :]

    def dequantize(self) -> Float[Array, "*layers d_in d_out"]:
        return dequantize(self.values, self.scales[..., None, :])


class Int4Weight(eqx.Module):
    """int4 values packed two per byte along d_in, one absmax scale per `group_size` inputs
    of each output channel (0: one per channel). d_in is zero-padded to whole groups."""

    packed: UInt8[Array, "*layers half_padded_d_in d_out"]
    scales: Float[Array, "*layers groups d_out"]
    d_in: int = eqx.field(static=True)
    group_size: int = eqx.field(static=True)

    def __init__(self, w: Float[Array, "*layers d_in d_out"], group_size: int = 128):
        if group_size < 0 or group_size % 2:
            raise ValueError(f"group_size must be an even number >= 0 (0: per channel), got "
                             f"{group_size}")
        q, self.scales = int4_quantize_groups(w, group_size)
        self.packed = pack_int4(q)
        self.d_in = w.shape[-2]
        self.group_size = group_size

    def dequantize(self) -> Float[Array, "*layers d_in d_out"]:
        return int4_dequantize_groups(unpack_int4(self.packed), self.scales, self.d_in)


class Fp8Weight(eqx.Module):
    """float8_e4m3fn values with one absmax scale per output channel."""

    values: Float[Array, "*layers d_in d_out"]
    scales: Float[Array, "*layers d_out"]

    def __init__(self, w: Float[Array, "*layers d_in d_out"]):
        scale = _per_channel_scale(w, E4M3_MAX)
        self.values = quantize_fp8(w, scale, "e4m3")
        self.scales = scale[..., 0, :]

    def dequantize(self) -> Float[Array, "*layers d_in d_out"]:
        return dequantize(self.values, self.scales[..., None, :])


def int8_weight_only_matmul(x: Float[Array, "*batch d_in"], values: Int8[Array, "d_in d_out"],
                            scales: Float[Array, " d_out"]) -> Float[Array, "*batch d_out"]:
    """`(x @ values) * scales`: the scale is constant along d_in, so it is applied once to the
    output instead of to every weight."""
    y = jnp.matmul(x, values.astype(x.dtype), preferred_element_type=jnp.float32)
    return _scale_columns(y, scales).astype(x.dtype)


def int4_weight_only_matmul(x: Float[Array, "*batch d_in"],
                            packed: UInt8[Array, "half_padded_d_in d_out"],
                            scales: Float[Array, "groups d_out"], d_in: int
                            ) -> Float[Array, "*batch d_out"]:
    """`x @ (q * scale[group])`: unpacked and scaled right before the dot."""
    w = int4_dequantize_groups(unpack_int4(packed), scales, d_in).astype(x.dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


class Int8WeightOnlyDot(MatmulOp):
    """`(x @ q) * scale` with int8 weights; int8 values are exact in bf16 and f32."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int8Weight
                 ) -> Float[Array, "*batch d_out"]:
        return int8_weight_only_matmul(x, weight.values, weight.scales)


class Fp8WeightOnlyDot(MatmulOp):
    """`(x @ q) * scale` with e4m3 weights; e4m3 values are exact in bf16 and f32."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Fp8Weight
                 ) -> Float[Array, "*batch d_out"]:
        y = jnp.matmul(x, weight.values.astype(x.dtype), preferred_element_type=jnp.float32)
        return _scale_columns(y, weight.scales).astype(x.dtype)


class Int4WeightOnlyDot(MatmulOp):
    """Unpack, scale per group, matmul: `x @ (q * scale[group])`."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Int4Weight
                 ) -> Float[Array, "*batch d_out"]:
        return int4_weight_only_matmul(x, weight.packed, weight.scales, weight.d_in)

