"""Quantizers: symmetric absmax scaling for int8, fp8 (e4m3 / e5m2) and int4.

Convention used everywhere in `hpllm.quant`: `scale` is the *dequantization* scale,
`x ~= q * scale`, and absmax scaling maps the largest magnitude to the format's largest value
(`scale = amax / qmax`). Edge cases, chosen so that bad numbers are never hidden:

- a zero tensor (or group) has amax 0, so scale 0 and every q is 0: no division by zero;
- values beyond the range (possible when the scale is not this tensor's own, as with delayed
  scaling) saturate to +-qmax, never to inf;
- a NaN makes its group's amax, hence its scale, NaN, so the dequantized group is NaN.

Reductions keep their axes (`keepdims`), so a scale broadcasts against its tensor without
rank promotion. Weights are `[*layers, d_in, d_out]`: "per channel" means one scale per output
column (reduce over d_in), "per token" one scale per row of activations (reduce over the last
axis), and int4 groups run along d_in.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int8, UInt8

INT8_MAX = 127.0
# Symmetric int4 uses [-7, 7]; -8 is representable (and round-trips through packing) but
# absmax scaling never produces it, so the grid stays symmetric around zero.
INT4_MAX = 7.0
E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
E5M2_MAX = float(jnp.finfo(jnp.float8_e5m2).max)  # 57344

FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
FP8_MAX = {"e4m3": E4M3_MAX, "e5m2": E5M2_MAX}


def absmax(x: Float[Array, "..."], axis: int | tuple[int, ...] | None = None
           ) -> Float[Array, "..."]:
    """`max |x|` in float32 over `axis` (all axes when None), dimensions kept. NaN wins."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)


def _divide_by_scale(x: Float[Array, "..."], scale: Float[Array, "..."]) -> Float[Array, "..."]:
    """`x / scale`, with 0 where the scale is 0 (a zero tensor), never a division by zero.

    A NaN scale fails `scale > 0`, giving 0 here; dequantization multiplies by the NaN scale
    again, so the group still comes back NaN.
    """
    positive = scale > 0
    safe = jnp.where(positive, scale, jnp.ones_like(scale))
    return jnp.where(positive, x.astype(jnp.float32) / safe, jnp.zeros((), jnp.float32))


def quantize_int(x: Float[Array, "..."], scale: Float[Array, "..."], qmax: float
                 ) -> Int8[Array, "..."]:
    """Round to nearest (ties to even) and clip to [-qmax, qmax], stored as int8."""
    return jnp.clip(jnp.round(_divide_by_scale(x, scale)), -qmax, qmax).astype(jnp.int8)


def quantize_fp8(x: Float[Array, "..."], scale: Float[Array, "..."], fmt: str
                 ) -> Float[Array, "..."]:
    """Cast `x / scale` to fp8 (`fmt` "e4m3" or "e5m2") after saturating to the format's max.

    The clip comes first because e4m3fn has no inf: an out-of-range cast would give NaN.
    NaN passes through the clip and the cast unchanged.
    """
    fmax = FP8_MAX[fmt]
    return jnp.clip(_divide_by_scale(x, scale), -fmax, fmax).astype(FP8_DTYPES[fmt])


def in_range(x: Float[Array, "..."], scale: Float[Array, "..."], qmax: float, integer: bool
             ) -> Bool[Array, "..."]:
    """Where quantizing with `scale` is not changed by the clip (for gradient masks).

    Integer formats clip after rounding, so values up to the edge of the last rounding bucket
    (qmax + 1/2, exclusive: 127.5 rounds to even 128) are not clipped; fp8 clips before the
    cast, so anything beyond qmax is.
    """
    magnitude = jnp.abs(_divide_by_scale(x, scale))
    return magnitude < qmax + 0.5 if integer else magnitude <= qmax


def dequantize(q: Array, scale: Float[Array, "..."]) -> Float[Array, "..."]:
    """`q * scale` in float32 (q is int8, int4 unpacked to int8, or fp8)."""
    return q.astype(jnp.float32) * scale


# --- int8 ---------------------------------------------------------------------------------

def int8_scale(x: Float[Array, "..."], axis: int | tuple[int, ...] | None = None
               ) -> Float[Array, "..."]:
    """Absmax scale mapping `max |x|` over `axis` to 127 (per tensor when axis is None)."""
    return absmax(x, axis) / INT8_MAX


def fake_quant_int8(x: Float[Array, "..."], axis: int | tuple[int, ...] | None = None
                    ) -> Float[Array, "..."]:
    """Quantize to int8 with absmax scaling over `axis`, then dequantize (float32)."""
    scale = int8_scale(x, axis)
    return dequantize(quantize_int(x, scale, INT8_MAX), scale)


# --- fp8 ----------------------------------------------------------------------------------

def fp8_scale(x: Float[Array, "..."], fmt: str, axis: int | tuple[int, ...] | None = None
              ) -> Float[Array, "..."]:
    """Current scaling: this tensor's amax maps to the format's max (448 or 57344)."""
    return absmax(x, axis) / FP8_MAX[fmt]


def fake_quant_fp8(x: Float[Array, "..."], fmt: str, scale: Float[Array, "..."] | None = None
                   ) -> Float[Array, "..."]:
    """Quantize to fp8 (current per-tensor scaling unless `scale` is given), dequantize."""
    if scale is None:
        scale = fp8_scale(x, fmt)
    return dequantize(quantize_fp8(x, scale, fmt), scale)


class DelayedScale(eqx.Module):
    """Delayed-scaling state of one fp8 operand (Transformer Engine's recipe).

    `history[0]` is the newest amax. A step quantizes with a scale derived from the history
    of *earlier* steps (so no reduction over the tensor is needed before the cast), then
    records its own amax, dropping the oldest. Both arrays are checkpointed like weights.
    """

    history: Float[Array, " history_len"]
    scale: Float[Array, ""]

    def __init__(self, history_len: int):
        self.history = jnp.zeros((history_len,), jnp.float32)
        # Transformer Engine starts from scale 1 (a plain cast) until an amax has been seen.
        self.scale = jnp.ones((), jnp.float32)


def delayed_scale(state: DelayedScale, fmt: str) -> Float[Array, ""]:
    """The scale for this step: `max(history) / fmt_max`, keeping the previous scale when the
    history holds no usable amax (all zero at the start, or inf/NaN after an overflow)."""
    amax = jnp.max(state.history)
    ok = (amax > 0) & jnp.isfinite(amax)
    return jnp.where(ok, amax / FP8_MAX[fmt], state.scale)


def record_amax(state: DelayedScale, amax: Float[Array, ""], scale: Float[Array, ""]
                ) -> DelayedScale:
    """The state after a step that used `scale` and saw `amax`: history rolled by one."""
    history = jnp.concatenate([amax.reshape(1), state.history[:-1]])
    return eqx.tree_at(lambda s: (s.history, s.scale), state, (history, scale))


# --- int4 ---------------------------------------------------------------------------------

def pack_int4(q: Int8[Array, "*lead rows cols"]) -> UInt8[Array, "*lead half_rows cols"]:
    """Two signed 4-bit values per byte along the row axis (-2): row 2i in the low nibble,
    row 2i+1 in the high nibble, two's complement. Needs an even number of rows."""
    if q.shape[-2] % 2:
        raise ValueError(f"pack_int4 needs an even number of rows, got {q.shape[-2]}")
    nibbles = q.astype(jnp.uint8) & jnp.uint8(0x0F)
    low, high = nibbles[..., 0::2, :], nibbles[..., 1::2, :]
    return low | (high << jnp.uint8(4))


def unpack_int4(packed: UInt8[Array, "*lead half_rows cols"]) -> Int8[Array, "*lead rows cols"]:
    """Inverse of `pack_int4`: int8 values in [-8, 7], rows interleaved back in order."""
    low = (packed & jnp.uint8(0x0F)).astype(jnp.int8)
    high = (packed >> jnp.uint8(4)).astype(jnp.int8)
    # Sign-extend the 4-bit two's complement: 8..15 stand for -8..-1.
    low = jnp.where(low > 7, low - jnp.int8(16), low)
    high = jnp.where(high > 7, high - jnp.int8(16), high)
    *lead, half_rows, cols = packed.shape
    return jnp.stack([low, high], axis=-2).reshape(*lead, 2 * half_rows, cols)


def padded_rows(rows: int, group_size: int) -> int:
    """Rows rounded up to whole groups: a partial last group is padded with zeros, which
    neither change its absmax nor contribute to a matmul."""
    return -(-rows // group_size) * group_size


def int_qmax(bits: int) -> float:
    """The largest value of a symmetric signed grid of `bits` bits: 7 (int4), 3, 1 (int2).
    Narrower grids than int4 are stored in int4 nibbles."""
    if bits not in (2, 3, 4):
        raise ValueError(f"weight bits must be 2, 3 or 4, got {bits!r}")
    return float(2 ** (bits - 1) - 1)


def int4_quantize_groups(w: Float[Array, "*lead d_in d_out"], group_size: int,
                         qmax: float = INT4_MAX
                         ) -> tuple[Int8[Array, "*lead padded_d_in d_out"],
                                    Float[Array, "*lead groups d_out"]]:
    """Group-wise absmax int4: one scale per `group_size` consecutive inputs of each output
    column (`group_size` 0: one group of all d_in, i.e. per channel). Returns unpacked int8
    values (d_in padded to whole groups) and the scales. `qmax` below 7 (`int_qmax`) gives
    the narrower int3/int2 grids."""
    *lead, d_in, d_out = w.shape
    group_size = group_size or d_in + d_in % 2  # packing needs an even number of rows
    rows = padded_rows(d_in, group_size)
    pad = [(0, 0)] * len(lead) + [(0, rows - d_in), (0, 0)]
    grouped = jnp.pad(w.astype(jnp.float32), pad).reshape(*lead, rows // group_size,
                                                          group_size, d_out)
    scale = absmax(grouped, axis=-2) / qmax  # [*lead, groups, 1, d_out]
    q = quantize_int(grouped, scale, qmax).reshape(*lead, rows, d_out)
    return q, scale.reshape(*lead, rows // group_size, d_out)


def int4_dequantize_groups(q: Int8[Array, "*lead padded_d_in d_out"],
                           scale: Float[Array, "*lead groups d_out"], d_in: int
                           ) -> Float[Array, "*lead d_in d_out"]:
    """Inverse of `int4_quantize_groups` (float32), the padding rows dropped."""
    *lead, rows, d_out = q.shape
    groups = scale.shape[-2]
    grouped = q.reshape(*lead, groups, rows // groups, d_out).astype(jnp.float32)
    w = (grouped * scale[..., :, None, :]).reshape(*lead, rows, d_out)
    return w[..., :d_in, :]


def fake_quant_int4(w: Float[Array, "*lead d_in d_out"], group_size: int,
                    qmax: float = INT4_MAX) -> Float[Array, "*lead d_in d_out"]:
    """Group-wise int4 (or narrower, `qmax`) quantize -> dequantize (float32)."""
    q, scale = int4_quantize_groups(w, group_size, qmax)
    return int4_dequantize_groups(q, scale, w.shape[-2])
