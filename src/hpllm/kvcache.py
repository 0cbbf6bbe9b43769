"""Preallocated key/value cache for incremental decoding.

Shapes are fixed at allocation, so the jitted decode step never sees a new shape and never
recompiles. New keys/values are written in place at each sequence's own slots; nothing is
ever concatenated.

A `KVCache` holds one layer (`[batch, max_len, kv_heads, head_dim]`), or every layer stacked
along a leading axis for a model whose blocks are stacked (`lax.scan` hands each block its own
layer's slice). Which slots hold real tokens is not recorded here: the caller owns the
positions (`infer.generate.DecodeState.positions`) and passes them to every write and read.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Int8, UInt16

from hpllm.config import DTYPE_ALIASES, ModelConfig

# Short name (as the command lines take it) -> the cache's storage dtype.
CACHE_DTYPE_ALIASES = {**DTYPE_ALIASES, "int8": "int8"}
CACHE_DTYPES = tuple(CACHE_DTYPE_ALIASES.values())

# float32 entries, bfloat16 ones held as their uint16 bits (see KVCache), or int8 ones.
CacheArray = (Float[Array, "*layers batch max_len kv_heads head_dim"]
              | UInt16[Array, "*layers batch max_len kv_heads head_dim"]
              | Int8[Array, "*layers batch max_len kv_heads head_dim"])
CacheScale = Float[Array, "*layers batch max_len kv_heads"]


def _quantize_per_head(
    x: Float[Array, "batch seq kv_heads head_dim"],
) -> tuple[Int8[Array, "batch seq kv_heads head_dim"], Float[Array, "batch seq kv_heads"]]:
    """Symmetric absmax int8 with one scale per token and head (zeros get scale 0)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = amax / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / safe[..., None]), -127, 127)
    return q.astype(jnp.int8), scale


def _write_slots(buffer: Array, new: Array, slots: Int[Array, "batch seq"]) -> Array:
    """`buffer[b, slots[b, s]] = new[b, s]`, skipping every slot outside the buffer."""
    rows = jnp.arange(buffer.shape[0], dtype=jnp.int32)[:, None]
    # "drop", not the clamping of dynamic_update_slice: a write past the end must not land
    # on the last slot.
    return buffer.at[rows, slots].set(new.astype(buffer.dtype), mode="drop")


class KVCache(eqx.Module):
    """Keys and values of one layer, `[batch, max_len, kv_heads, head_dim]` (or of every layer,
    with a leading layer axis).

    With `dtype="int8"` the values are int8 with one float32 scale per (row, slot, head), which
    halves the bytes of a bf16 cache that every decode step reads. With `dtype="bfloat16"` the
    buffers hold the bf16 bits as uint16: XLA:CPU scatters into a bf16 buffer by converting all
    of it to f32 and back, where a uint16 scatter updates it in place (`bench/kv_cache_write.py`,
    figures in docs/performance.md). `dtype` is the stored values' type either way. `k`, `v`
    and the scales are separate buffers (never one array twice), so every leaf can be donated.
    """

    k: CacheArray
    v: CacheArray
    k_scale: CacheScale | None
    v_scale: CacheScale | None

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int | None = None,
                 dtype: str = "float32", *, n_layers: int | None = None) -> "KVCache":
        """An empty cache of one layer, or of `n_layers` layers stacked along a leading axis."""
        max_len = cfg.max_seq_len if max_len is None else max_len
        layers = () if n_layers is None else (n_layers,)
        return cls.empty((*layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: str = "float32") -> "KVCache":
        """An empty cache of `shape` ([*layers, batch, max_len, kv_heads, head_dim])."""
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"KV-cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        storage = jnp.uint16 if dtype == "bfloat16" else jnp.dtype(dtype)
        quantized = dtype == "int8"
        return cls(k=jnp.zeros(shape, storage), v=jnp.zeros(shape, storage),
                   k_scale=jnp.zeros(shape[:-1], jnp.float32) if quantized else None,
                   v_scale=jnp.zeros(shape[:-1], jnp.float32) if quantized else None)

    @property
    def max_len(self) -> int:
        return self.k.shape[-3]

    @property
    def quantized(self) -> bool:
        return self.k.dtype == jnp.int8

    @property
    def dtype(self) -> jnp.dtype:
        """The stored values' type: float32, bfloat16 (held as uint16 bits) or int8."""
        return jnp.dtype(jnp.bfloat16) if self.k.dtype == jnp.uint16 else self.k.dtype

    def write(
        self,
        k: Float[Array, "batch seq kv_heads head_dim"],
        v: Float[Array, "batch seq kv_heads head_dim"],
        slots: Int[Array, "batch seq"],
    ) -> "KVCache":
        """Store new keys/values of one layer: token s of row b goes to slot `slots[b, s]`.

        A slot outside `[0, max_len)` writes nothing, which is how a finished row leaves its
        cache untouched.
        """
        if not self.quantized:
            if self.dtype == jnp.bfloat16:
                k, v = (x.astype(jnp.bfloat16).view(jnp.uint16) for x in (k, v))
            return eqx.tree_at(lambda c: (c.k, c.v), self,
                               (_write_slots(self.k, k, slots), _write_slots(self.v, v, slots)))
        qk, sk = _quantize_per_head(k)
        qv, sv = _quantize_per_head(v)
        return eqx.tree_at(
            lambda c: (c.k, c.v, c.k_scale, c.v_scale), self,
            (_write_slots(self.k, qk, slots), _write_slots(self.v, qv, slots),
             _write_slots(self.k_scale, sk, slots), _write_slots(self.v_scale, sv, slots)))

    def read(
        self, dtype: jnp.dtype
    ) -> tuple[Float[Array, "batch max_len kv_heads head_dim"],
               Float[Array, "batch max_len kv_heads head_dim"]]:
        """This layer's keys and values as `dtype` (int8 values are dequantized here)."""
        k, v = self.k, self.v
        if self.dtype == jnp.bfloat16:
            k, v = k.view(jnp.bfloat16), v.view(jnp.bfloat16)
        if self.quantized:
            k = k.astype(jnp.float32) * self.k_scale[..., None]
            v = v.astype(jnp.float32) * self.v_scale[..., None]
        return k.astype(dtype), v.astype(dtype)
