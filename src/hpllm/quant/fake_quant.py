"""Quantization-aware training (QAT) ops: fake quantization with a straight-through estimator.

Forward: quantize -> dequantize both operands, then an ordinary float matmul, so the model
sees exactly the rounding it will see after conversion. Backward (`jax.custom_vjp`): the
rounding has zero derivative almost everywhere, so the straight-through estimator (STE)
treats it as the identity: `dx = g @ w_q.T`, `dw = x_q.T @ g`, the float gradients of the
dequantized operands. Options:

- `mask_clipped_grads`: zero the gradient where the forward saturated (the value lay outside
  the quantizer's range, so nudging it changes nothing);
- `quantize_backward`: also quantize the incoming gradient `g` of the two backward matmuls,
  as AQT (int8) and Transformer Engine (fp8: e5m2, whose range suits gradients) do.

fp8 delayed scaling keeps state (`DelayedScale`: amax history + scale) as array leaves of the
op. The new state is produced during the forward/backward pass, and it leaves the pass as the
*cotangent* of the state: the gradient of the loss w.r.t. the state IS the updated state.
`hpllm.quant.split_quant_state` separates it from the parameters so the optimizer never sees
it; the train step replaces the old state with its "gradient". Two consequences: call the op
once per loss evaluation (two calls would add two new states), and a forward that is not
differentiated (evaluation) leaves the state unchanged.
"""

import dataclasses
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from hpllm.linear import MatmulOp
from hpllm.quant.quantizers import (
    E4M3_MAX,
    E5M2_MAX,
    INT4_MAX,
    INT8_MAX,
    DelayedScale,
    absmax,
    delayed_scale,
    dequantize,
    fp8_scale,
    in_range,
    int4_dequantize_groups,
    int4_quantize_groups,
    int8_scale,
    int_qmax,
    quantize_fp8,
    quantize_int,
    record_amax,
)

Meta = DelayedScale | None
# The reduction axis of the activations' int8 scale: one per token (row), or one per tensor.
ACTIVATION_AXES = {"token": -1, "tensor": None}
Metas = tuple[Meta, Meta, Meta]  # for x, weight, incoming gradient


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How each of the three matmul operands is quantized (static, hashable).

    x: "float" | "int8" (per token, or per tensor with `x_axis` None) | "e4m3" (per tensor)
    w: "float" | "int8" (per output channel) | "e4m3" (per tensor) | "int4" (group-wise, on
        the grid [-w_qmax, w_qmax]: 7 is int4, 3 int3, 1 int2)
    grad: "float" | "int8" (per row for dx, per column for dw) | "e5m2" (per tensor)
    """

    x: str
    w: str
    grad: str = "float"
    group_size: int = 128
    mask_clipped: bool = False
    x_axis: int | None = -1
    w_qmax: float = INT4_MAX


def _fake_quant(kind: str, v: Float[Array, "..."], meta: Meta, axis: int | None,
                group_size: int = 128, qmax: float = INT4_MAX
                ) -> tuple[Float[Array, "..."], Bool[Array, "..."], Meta]:
    """Quantize -> dequantize `v` (float32); also where it was in range, and the new state.

    `axis` is the reduction axis of int8 scales (None: per tensor); fp8 is always per
    tensor, int4 always group-wise along axis -2 on the grid [-qmax, qmax].
    """
    ok = jnp.ones(v.shape, jnp.bool_)
    if kind == "float":
        return v.astype(jnp.float32), ok, meta
    if kind == "int8":
        scale = int8_scale(v, axis)
        return dequantize(quantize_int(v, scale, INT8_MAX), scale), ok, meta
    if kind == "int4":
        q, scale = int4_quantize_groups(v, group_size, qmax)
        return int4_dequantize_groups(q, scale, v.shape[-2]), ok, meta
    fmt = kind  # "e4m3" or "e5m2"
    if meta is None:  # current scaling: nothing can clip
        scale = fp8_scale(v, fmt)
    else:
        scale = delayed_scale(meta, fmt).reshape((1,) * v.ndim)
        ok = in_range(v, scale, E4M3_MAX if fmt == "e4m3" else E5M2_MAX, integer=False)
        meta = record_amax(meta, absmax(v).reshape(()), scale.reshape(()))
    return dequantize(quantize_fp8(v, scale, fmt), scale), ok, meta


def _forward(recipe: Recipe, x, w, metas: Metas):
    x_meta, w_meta, g_meta = metas
    # Per token: one scale per row of x; per channel: one scale per column of w.
    xq, x_ok, x_meta = _fake_quant(recipe.x, x, x_meta, axis=recipe.x_axis)
    wq, w_ok, w_meta = _fake_quant(recipe.w, w, w_meta, axis=-2, group_size=recipe.group_size,
                                   qmax=recipe.w_qmax)
    xq, wq = xq.astype(x.dtype), wq.astype(x.dtype)
    y = jnp.matmul(xq, wq, preferred_element_type=jnp.float32).astype(x.dtype)
    masks = (x_ok, w_ok) if recipe.mask_clipped else None
    # A zero-size array remembers the weight's dtype, which its cotangent must have.
    w_dtype = jnp.zeros((0,), w.dtype)
    return y, (xq, wq, w_dtype, masks, (x_meta, w_meta, g_meta))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def qat_matmul(recipe: Recipe, x: Float[Array, "*batch d_in"], w: Float[Array, "d_in d_out"],
               metas: Metas) -> Float[Array, "*batch d_out"]:
    """`fake_quant(x) @ fake_quant(w)` with the STE backward described in the module doc."""
    return _forward(recipe, x, w, metas)[0]


def _qat_matmul_fwd(recipe: Recipe, x, w, metas: Metas):
    return _forward(recipe, x, w, metas)


def _qat_matmul_bwd(recipe: Recipe, residuals, g):
    xq, wq, w_dtype, masks, (x_meta, w_meta, g_meta) = residuals
    d_in, d_out = wq.shape
    xq2 = xq.reshape(-1, d_in)  # tokens x d_in
    g2 = g.reshape(-1, d_out)
    if recipe.grad == "int8":
        # Scales constant along each backward matmul's contracting axis, so both could run
        # as integer matmuls: per row of g for dx (contracts d_out), per column for dw
        # (contracts tokens).
        g_dx = _fake_quant("int8", g2, None, axis=-1)[0]
        g_dw = _fake_quant("int8", g2, None, axis=-2)[0]
    elif recipe.grad == "e5m2":
        g_dx, _, g_meta = _fake_quant("e5m2", g2, g_meta, axis=None)
        g_dw = g_dx
    else:
        g_dx = g_dw = g2
    g_dx, g_dw = g_dx.astype(xq.dtype), g_dw.astype(xq.dtype)
    dx = jnp.matmul(g_dx, wq.T, preferred_element_type=jnp.float32).reshape(xq.shape)
    dw = jnp.matmul(xq2.T, g_dw, preferred_element_type=jnp.float32)
    if masks is not None:
        x_ok, w_ok = masks
        dx, dw = jnp.where(x_ok, dx, 0.0), jnp.where(w_ok, dw, 0.0)
    # The state's cotangent carries the new state out of the backward pass (module doc).
    return dx.astype(xq.dtype), dw.astype(w_dtype.dtype), (x_meta, w_meta, g_meta)


qat_matmul.defvjp(_qat_matmul_fwd, _qat_matmul_bwd)


def fake_quant_ste(x: Float[Array, "..."], scale: Float[Array, "..."], fmt: str,
                   mask_clipped: bool = False) -> Float[Array, "..."]:
    """One operand's fake quantization with a given scale ("int8", "int4", "e4m3", "e5m2"),
    straight-through in the backward pass (zero where clipped if `mask_clipped`).

    The building block of the ops above, exposed for tests and experiments.
    """
    return _fake_quant_ste(fmt, mask_clipped, x, scale)


def _qmax(fmt: str) -> float:
    return {"int8": INT8_MAX, "int4": INT4_MAX, "e4m3": E4M3_MAX, "e5m2": E5M2_MAX}[fmt]


def _quant_dequant(fmt: str, x, scale):
    if fmt in ("int8", "int4"):
        return dequantize(quantize_int(x, scale, _qmax(fmt)), scale).astype(x.dtype)
    return dequantize(quantize_fp8(x, scale, fmt), scale).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fake_quant_ste(fmt: str, mask_clipped: bool, x, scale):
    return _quant_dequant(fmt, x, scale)


def _fake_quant_ste_fwd(fmt, mask_clipped, x, scale):
    ok = in_range(x, scale, _qmax(fmt), integer=fmt in ("int8", "int4"))
    return _quant_dequant(fmt, x, scale), (ok, scale)


def _fake_quant_ste_bwd(fmt, mask_clipped, residuals, g):
    ok, scale = residuals
    dx = jnp.where(ok, g, jnp.zeros((), g.dtype)) if mask_clipped else g
    return dx, jnp.zeros_like(scale)  # the scale is treated as a constant


_fake_quant_ste.defvjp(_fake_quant_ste_fwd, _fake_quant_ste_bwd)


# --- ops that plug into Linear -------------------------------------------------------------

class Int8QATDot(MatmulOp):
    """int8 fake quantization: activations per token (or with `activations` "tensor" one
    absmax scale for the whole activation tensor of the call), weights per output channel."""

    quantize_backward: bool = eqx.field(static=True, default=False)
    mask_clipped_grads: bool = eqx.field(static=True, default=False)
    activations: str = eqx.field(static=True, default="token")

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Float[Array, "d_in d_out"]
                 ) -> Float[Array, "*batch d_out"]:
        recipe = Recipe(x="int8", w="int8", grad="int8" if self.quantize_backward else "float",
                        mask_clipped=self.mask_clipped_grads,
                        x_axis=ACTIVATION_AXES[self.activations])
        return qat_matmul(recipe, x, weight, (None, None, None))


class Fp8QATDot(MatmulOp):
    """fp8 fake quantization: e4m3 activations and weights (per tensor), e5m2 for the incoming
    gradient when `quantize_backward`. Scaling "current" uses each tensor's own amax;
    "delayed" uses the `DelayedScale` state (None for current scaling)."""

    x_scale: DelayedScale | None
    w_scale: DelayedScale | None
    g_scale: DelayedScale | None
    scaling: str = eqx.field(static=True)
    quantize_backward: bool = eqx.field(static=True)
    mask_clipped_grads: bool = eqx.field(static=True)

    def __init__(self, scaling: str = "delayed", amax_history_len: int = 16,
                 quantize_backward: bool = False, mask_clipped_grads: bool = False):
        if scaling not in ("delayed", "current"):
            raise ValueError(f"scaling must be 'delayed' or 'current', got {scaling!r}")
        delayed = scaling == "delayed"
        self.x_scale = DelayedScale(amax_history_len) if delayed else None
        self.w_scale = DelayedScale(amax_history_len) if delayed else None
        self.g_scale = (DelayedScale(amax_history_len) if delayed and quantize_backward
                        else None)
        self.scaling = scaling
        self.quantize_backward = quantize_backward
        self.mask_clipped_grads = mask_clipped_grads

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Float[Array, "d_in d_out"]
                 ) -> Float[Array, "*batch d_out"]:
        recipe = Recipe(x="e4m3", w="e4m3", grad="e5m2" if self.quantize_backward else "float",
                        mask_clipped=self.mask_clipped_grads)
        return qat_matmul(recipe, x, weight, (self.x_scale, self.w_scale, self.g_scale))


class Int4WeightQATDot(MatmulOp):
    """int4 group-wise fake quantization of the weight (`group_size` 0: per channel);
    activations stay float, or with `quantize_activations` become int8 per token (W4A8).
    `bits` 3 or 2 narrow the weight grid to [-3, 3] or [-1, 1] (still stored in int4)."""

    group_size: int = eqx.field(static=True, default=128)
    mask_clipped_grads: bool = eqx.field(static=True, default=False)
    quantize_activations: bool = eqx.field(static=True, default=False)
    bits: int = eqx.field(static=True, default=4)

    def __call__(self, x: Float[Array, "*batch d_in"], weight: Float[Array, "d_in d_out"]
                 ) -> Float[Array, "*batch d_out"]:
        recipe = Recipe(x="int8" if self.quantize_activations else "float", w="int4",
                        group_size=self.group_size,
                        mask_clipped=self.mask_clipped_grads, w_qmax=int_qmax(self.bits))
        return qat_matmul(recipe, x, weight, (None, None, None))


QAT_OPS = (Int8QATDot, Fp8QATDot, Int4WeightQATDot)
