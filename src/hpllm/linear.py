"""`Linear` with a pluggable matmul op: the one place where a matmul happens.

The op is a small module called as `op(x, weight)`. Float, fake-quant (QAT) and weight-only
quantized ops share that call, so quantization is a tree map that swaps ops (and weights),
never an edit to the model code.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

# What an op multiplies by: a float matrix, or a quantized tensor module (int8/int4/fp8 values
# plus their scales, in `hpllm.quant.weight_only`) that the matching op knows how to read.
Weight = Float[Array, "d_in d_out"] | eqx.Module


class MatmulOp(eqx.Module):
    """`op(x, weight) -> x @ weight`, in the dtype of `x`. Subclasses decide the numerics and
    narrow `weight` to the one format they read."""

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Weight
                 ) -> Float[Array, "*batch d_out"]:
        raise NotImplementedError


class FloatDot(MatmulOp):
    """Plain matmul: the weight is cast to the activation dtype, accumulation is in float32."""

    def __call__(
        self, x: Float[Array, "*batch d_in"], weight: Float[Array, "d_in d_out"]
    ) -> Float[Array, "*batch d_out"]:
        y = jnp.matmul(x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)


class Linear(eqx.Module):
    """`y = op(x, weight) (+ bias)`. The weight is stored `[d_in, d_out]` so `x @ weight` needs
    no transpose. The optional bias (Qwen2's query/key/value projections) stays float whatever
    the op; conversion and QAT replace only the weight and the op.

    `weight` is a float array for float and QAT ops; conversion replaces it with a quantized
    tensor (int8/int4/fp8 values plus scales) together with the matching weight-only op.
    Inside a model whose layers are stacked for `lax.scan`, every leaf (the weight, a quantized
    weight's values and scales, an op's state) has the leading layer axis too.
    """

    weight: Float[Array, "*layers d_in d_out"] | eqx.Module
    op: MatmulOp
    bias: Float[Array, "*layers d_out"] | None = None

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, scale: float = 1.0,
                 bias: bool = False):
        # Normal init scaled by fan-in: the activations keep unit variance through the layer.
        std = scale / math.sqrt(d_in)
        self.weight = std * jax.random.normal(key, (d_in, d_out), jnp.float32)
        self.op = FloatDot()
        self.bias = jnp.zeros((d_out,), jnp.float32) if bias else None

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        y = self.op(x, self.weight)
        if self.bias is None:
            return y
        return y + self.bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
