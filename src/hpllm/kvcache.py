"""Preallocated key/value cache for incremental decoding.

Shapes are fixed at allocation, so the jitted decode step never sees a new shape and never
recompiles. New keys/values are written in place with `lax.dynamic_update_slice` at each
sequence's own position; nothing is ever concatenated.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Int8

from hpllm.config import DTYPE_ALIASES, ModelConfig

# Short name (as the command lines take it) -> the cache's storage dtype.
CACHE_DTYPE_ALIASES = {**DTYPE_ALIASES, "int8": "int8"}
CACHE_DTYPES = tuple(CACHE_DTYPE_ALIASES.values())

CacheArray = Float[Array, "layers batch max_len kv_heads head_dim"] | Int8[
    Array, "layers batch max_len kv_heads head_dim"]
CacheScale = Float[Array, "layers batch max_len kv_heads"]


def _quantize_per_head(
    x: Float[Array, "batch seq kv_heads head_dim"],
) -> tuple[Int8[Array, "batch seq kv_heads head_dim"], Float[Array, "batch seq kv_heads"]]:
    """Symmetric absmax int8 with one scale per token and head (zeros get scale 0)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = amax / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / safe[..., None]), -127, 127)
    return q.astype(jnp.int8), scale


def _write_rows(buffer: Array, new: Array, layer: Int[Array, ""], start: Int[Array, " batch"]
                ) -> Array:
    """Write `new[b]` (shape [seq, ...]) into `buffer[layer, b, start[b]:start[b]+seq]`."""

    def write_row(row: Array, new_row: Array, row_start: Int[Array, ""]) -> Array:
        index = (layer, row_start) + (0,) * (new_row.ndim - 1)
        return lax.dynamic_update_slice(row, new_row[None].astype(row.dtype), index)

    return jax.vmap(write_row, in_axes=(1, 0, 0), out_axes=1)(buffer, new, start)


class KVCache(eqx.Module):
    """Keys and values of every layer: `[layers, batch, max_len, kv_heads, head_dim]`.

    `lengths[b]` counts the positions of row `b` that hold real tokens. With `dtype="int8"` the
    values are int8 with one float32 scale per (layer, row, position, head), which halves the
    bytes of a bf16 cache that every decode step reads.
    """

    k: CacheArray
    v: CacheArray
    k_scale: CacheScale | None
    v_scale: CacheScale | None
    lengths: Int[Array, " batch"]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int | None = None,
                 dtype: str = "float32") -> "KVCache":
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"KV-cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        k = jnp.zeros(shape, jnp.dtype(dtype))
        v = jnp.zeros(shape, jnp.dtype(dtype))
        quantized = dtype == "int8"
        # Separate buffers (never one array twice) so every leaf can be donated.
        k_scale = jnp.zeros(shape[:-1], jnp.float32) if quantized else None
        v_scale = jnp.zeros(shape[:-1], jnp.float32) if quantized else None
        return cls(k=k, v=v, k_scale=k_scale, v_scale=v_scale,
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k.dtype == jnp.int8

    def write(
        self,
        layer: Int[Array, ""],
        k: Float[Array, "batch seq kv_heads head_dim"],
        v: Float[Array, "batch seq kv_heads head_dim"],
        start: Int[Array, " batch"],
    ) -> "KVCache":
        """Store this layer's new keys/values at positions `start[b] ...` of each row.

        The caller keeps `start[b] + seq <= max_len`: `dynamic_update_slice` clamps indices
        instead of failing, which would silently overwrite earlier positions.
        """
        if not self.quantized:
            return eqx.tree_at(lambda c: (c.k, c.v), self,
                               (_write_rows(self.k, k, layer, start),
                                _write_rows(self.v, v, layer, start)))
        qk, sk = _quantize_per_head(k)
        qv, sv = _quantize_per_head(v)
        return eqx.tree_at(
            lambda c: (c.k, c.v, c.k_scale, c.v_scale), self,
            (_write_rows(self.k, qk, layer, start), _write_rows(self.v, qv, layer, start),
             _write_rows(self.k_scale, sk, layer, start),
             _write_rows(self.v_scale, sv, layer, start)))

    def read(
        self, layer: Int[Array, ""], dtype: jnp.dtype
    ) -> tuple[Float[Array, "batch max_len kv_heads head_dim"],
               Float[Array, "batch max_len kv_heads head_dim"]]:
        """This layer's keys and values as `dtype` (int8 values are dequantized here)."""
        k = lax.dynamic_index_in_dim(self.k, layer, axis=0, keepdims=False)
        v = lax.dynamic_index_in_dim(self.v, layer, axis=0, keepdims=False)
        if self.quantized:
            k_scale = lax.dynamic_index_in_dim(self.k_scale, layer, axis=0, keepdims=False)
            v_scale = lax.dynamic_index_in_dim(self.v_scale, layer, axis=0, keepdims=False)
            k = k.astype(jnp.float32) * k_scale[..., None]
            v = v.astype(jnp.float32) * v_scale[..., None]
        return k.astype(dtype), v.astype(dtype)

    def with_lengths(self, lengths: Int[Array, " batch"]) -> "KVCache":
        return eqx.tree_at(lambda c: c.lengths, self, lengths.astype(jnp.int32))

    def nbytes(self) -> int:
        """Bytes held by the cache (what a decode step reads at most)."""
        leaves = jax.tree.leaves(eqx.filter(self, eqx.is_array))
        return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
