"""The inference layout of a `Transformer`: one buffer per layer, layers unrolled.

Training stacks every layer's weights along a leading axis and runs them with `lax.scan`, which
keeps compile time flat. For decoding on a CPU that layout is slow (measured in
docs/performance.md): each scanned step slices its layer out of the stacked weights and the
stacked KV cache, and the cache update inside the scan carry copies the whole cache. Here every
layer owns its weights and its own single-layer `KVCache`, and the layer loop is unrolled at
trace time, so each matmul reads its weight buffer in place and each cache write is an in-place
update of that layer's buffer. The blocks themselves are the model's `Block`s: same numerics.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from hpllm.config import ModelConfig
from hpllm.kvcache import KVCache
from hpllm.linear import Linear
from hpllm.model import Block, RMSNorm, Transformer, cache_mask, output_logits, rope_angles

LayerCaches = tuple[KVCache, ...]


def unstack(tree, n: int) -> list:
    """Split the leading (layer) axis of every array leaf into `n` separate trees."""
    return [jax.tree.map(lambda x, i=i: x[i] if eqx.is_array(x) else x, tree) for i in range(n)]


class UnrolledDecoder(eqx.Module):
    """Same parameters as `Transformer`, with `blocks` split into a tuple of per-layer blocks."""

    embed: Float[Array, "vocab d_model"]
    layers: tuple[Block, ...]
    final_norm: RMSNorm
    lm_head: Linear | None
    cfg: ModelConfig = eqx.field(static=True)

    def __init__(self, model: Transformer):
        self.cfg = model.cfg
        self.embed = model.embed
        # Copies, so that each layer's weights are one contiguous buffer of their own.
        self.layers = tuple(jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x)
                                         else x, block)
                            for block in unstack(model.blocks, model.cfg.n_layers))
        self.final_norm = model.final_norm
        self.lm_head = model.lm_head

    def allocate_cache(self, batch: int, max_len: int, dtype: str) -> LayerCaches:
        one_layer = self.cfg.replace(n_layers=1)
        return tuple(KVCache.allocate(one_layer, batch, max_len, dtype)
                     for _ in range(self.cfg.n_layers))

    def logits(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        return output_logits(x, self.final_norm, self.embed, self.lm_head,
                             self.cfg.scale_tied_head)

    def hidden(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        caches: LayerCaches,
    ) -> tuple[Float[Array, "batch seq d_model"], LayerCaches]:
        """The final residual stream (before the final norm); keys/values go into `caches`."""
        rotary = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta,
                             self.cfg.rope_scaling)
        mask = cache_mask(positions, caches[0].max_len)
        start = positions[:, 0]
        x = jnp.take(self.embed, tokens, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))
        layer0 = jnp.int32(0)
        new_caches = []
        for block, cache in zip(self.layers, caches, strict=True):
            x, cache = block.decode(x, rotary, mask, cache, layer0, start)
            new_caches.append(cache.with_lengths(positions[:, -1] + 1))
        return x, tuple(new_caches)

    def decode(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        caches: LayerCaches,
    ) -> tuple[Float[Array, "batch seq vocab"], LayerCaches]:
        """Like `Transformer.decode`, with per-layer caches."""
        x, caches = self.hidden(tokens, positions, caches)
        return self.logits(x), caches
