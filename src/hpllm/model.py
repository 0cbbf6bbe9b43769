"""A Llama-style decoder: token embedding, pre-norm RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, final norm, LM head.

One set of modules serves both flows. `Transformer.__call__` is the training forward over whole
windows (causal mask, optional segment ids for packed documents); `Transformer.decode` writes
new keys/values into a preallocated `KVCache` and attends over it (prefill and decode are the
same code with different lengths). Layers are stacked along a leading axis at init and run with
`lax.scan`, so compile time does not grow with depth; `Transformer.unstacked()` gives the
per-layer layout that decoding runs fastest in (one model class, two layer layouts).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from hpllm.config import ModelConfig, RopeScaling
from hpllm.kvcache import KVCache
from hpllm.linear import Linear

Rotary = tuple[Float[Array, "batch seq half_head_dim"], Float[Array, "batch seq half_head_dim"]]


class RMSNorm(eqx.Module):
    """`x / rms(x) * scale`, computed in float32 whatever the activation dtype."""

    scale: Float[Array, " d_model"]
    eps: float = eqx.field(static=True)

    def __init__(self, d_model: int, eps: float):
        self.scale = jnp.ones((d_model,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch d_model"]) -> Float[Array, "*batch d_model"]:
        x32 = x.astype(jnp.float32)
        inv_rms = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale.reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * inv_rms * scale).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> Float[Array, " half_head_dim"]:
    """`theta^(-2i/head_dim)` for i < head_dim/2, stretched by `scaling` (see `RopeScaling`)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep short wavelengths, divide long ones by `factor`, blend the band between.
    wavelength = 2 * jnp.pi / inv_freq
    long_limit = scaling.original_max_position / scaling.low_freq_factor
    short_limit = scaling.original_max_position / scaling.high_freq_factor
    smooth = ((scaling.original_max_position / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    stretched = jnp.where(wavelength > long_limit, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= short_limit) & (wavelength <= long_limit)
    return jnp.where(in_band, blended, stretched)


def rope_angles(positions: Int[Array, "batch seq"], head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> Rotary:
    """cos and sin of `position * theta^(-2i/head_dim)` for each of the head_dim/2 frequencies."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "batch seq heads head_dim"], rotary: Rotary
               ) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate the pairs (x[i], x[i + head_dim/2]) by the position's angle (the "rotate half"
    layout of Llama and GPT-NeoX)."""
    cos, sin = (a[:, :, None, :] for a in rotary)  # broadcast over heads
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def causal_mask(positions: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"] | None
                ) -> Bool[Array, "batch seq seq"]:
    """Query i sees key j when j is not in its future and, if packed, in the same document."""
    mask = positions[:, None, :] <= positions[:, :, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def cache_mask(positions: Int[Array, "batch seq"], max_len: int
               ) -> Bool[Array, "batch seq max_len"]:
    """Query at position p sees cache slots 0..p: later slots are empty or hold padding."""
    return jnp.arange(max_len)[None, None, :] <= positions[:, :, None]


class DecodeAttention(eqx.Module):
    """A replacement for the XLA attention over the KV cache (decode steps and prefills) with
    float32 queries, reading one layer's cache as it is stored (`infer.kernels` has a native
    one, which reads only the slots the mask shows and widens bf16 / int8 entries in registers,
    where the XLA path first makes a float32 copy of the whole cache and attends over every
    slot). It must compute what `Attention._attend` does on `cache.read(float32)` before the
    output projection."""

    def reads(self, cache: KVCache) -> bool:
        """Whether it attends over a cache of this one's storage dtype (else the XLA path)."""
        raise NotImplementedError

    def __call__(self, q: Float[Array, "batch seq heads head_dim"], cache: KVCache,
                 mask: Bool[Array, "batch seq max_len"]
                 ) -> Float[Array, "batch seq heads head_dim"]:
        raise NotImplementedError


class Attention(eqx.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    decode_attention: DecodeAttention | None  # None: the XLA einsums (`_attend`)
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        hd = cfg.head_dim
        self.wq = Linear(cfg.d_model, cfg.n_heads * hd, key=kq, bias=cfg.qkv_bias)
        self.wk = Linear(cfg.d_model, cfg.n_kv_heads * hd, key=kk, bias=cfg.qkv_bias)
        self.wv = Linear(cfg.d_model, cfg.n_kv_heads * hd, key=kv, bias=cfg.qkv_bias)
        # Scaled down so the residual stream does not grow with depth at init.
        self.wo = Linear(cfg.n_heads * hd, cfg.d_model, key=ko, scale=1 / (2 * cfg.n_layers) ** 0.5,
                         bias=cfg.out_bias)
        self.decode_attention = None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd

    def _project(self, x: Float[Array, "batch seq d_model"], rotary: Rotary):
        b, s, _ = x.shape
        q = self.wq(x).reshape(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).reshape(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).reshape(b, s, self.n_kv_heads, self.head_dim)
        return apply_rope(q, rotary), apply_rope(k, rotary), v

    def _attend(
        self,
        q: Float[Array, "batch seq heads head_dim"],
        k: Float[Array, "batch kv_seq kv_heads head_dim"],
        v: Float[Array, "batch kv_seq kv_heads head_dim"],
        mask: Bool[Array, "batch seq kv_seq"],
    ) -> Float[Array, "batch seq d_model"]:
        b, s, _, hd = q.shape
        groups = self.n_heads // self.n_kv_heads
        # Query heads of one group share a key/value head: fold them into one axis, no copies.
        q = q.reshape(b, s, self.n_kv_heads, groups, hd)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(hd))
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", weights, v, preferred_element_type=jnp.float32)
        return self.wo(out.reshape(b, s, self.n_heads * hd).astype(q.dtype))

    def __call__(self, x: Float[Array, "batch seq d_model"], rotary: Rotary,
                 mask: Bool[Array, "batch seq seq"]) -> Float[Array, "batch seq d_model"]:
        q, k, v = self._project(x, rotary)
        return self._attend(q, k, v, mask)

    def decode(
        self,
        x: Float[Array, "batch seq d_model"],
        rotary: Rotary,
        mask: Bool[Array, "batch seq max_len"],
        cache: KVCache,
        slots: Int[Array, "batch seq"],
    ) -> tuple[Float[Array, "batch seq d_model"], KVCache]:
        """Write this layer's new keys/values into its own `cache` at `slots`, then attend
        over the whole cache (masked)."""
        q, k, v = self._project(x, rotary)
        cache = cache.write(k, v, slots)
        b, s, _, _ = q.shape
        if (self.decode_attention is not None and q.dtype == jnp.float32
                and self.decode_attention.reads(cache)):
            out = self.decode_attention(q, cache, mask)
            return self.wo(out.reshape(b, s, self.n_heads * self.head_dim)), cache
        k_all, v_all = cache.read(x.dtype)
        return self._attend(q, k_all, v_all, mask), cache


class MLP(eqx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    w_gate: Linear
    w_up: Linear
    w_down: Linear

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        self.w_gate = Linear(cfg.d_model, cfg.d_ff, key=kg)
        self.w_up = Linear(cfg.d_model, cfg.d_ff, key=ku)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, key=kd, scale=1 / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(eqx.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, key=ka)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, key=km)

    def __call__(self, x: Float[Array, "batch seq d_model"], rotary: Rotary,
                 mask: Bool[Array, "batch seq seq"]) -> Float[Array, "batch seq d_model"]:
        x = x + self.attn(self.attn_norm(x), rotary, mask)
        return x + self.mlp(self.mlp_norm(x))

    def decode(
        self,
        x: Float[Array, "batch seq d_model"],
        rotary: Rotary,
        mask: Bool[Array, "batch seq max_len"],
        cache: KVCache,
        slots: Int[Array, "batch seq"],
    ) -> tuple[Float[Array, "batch seq d_model"], KVCache]:
        attn_out, cache = self.attn.decode(self.attn_norm(x), rotary, mask, cache, slots)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache


ModelCache = KVCache | tuple[KVCache, ...]
"""A model's KV cache, laid out like its blocks: one `KVCache` with a leading layer axis for
stacked blocks, one `KVCache` per layer for unstacked ones (`Transformer.allocate_cache`)."""


def cache_max_len(cache: ModelCache) -> int:
    """Slots per row of a model's cache, in either layout."""
    return (cache[0] if isinstance(cache, tuple) else cache).max_len


class Transformer(eqx.Module):
    """The decoder. Its `blocks` are in one of two layer layouts:

    - stacked (as built; for training): one `Block` whose leaves carry a leading layer axis,
      run with `lax.scan`, so compile time does not grow with depth;
    - unstacked (for decoding): a tuple of per-layer `Block`s, run by a loop unrolled at trace
      time. Each layer's weights and KV cache are buffers of their own, so on a CPU every
      matmul reads its weight in place and every cache write updates its buffer in place;
      scanning instead slices each layer out of the stacked weights and cache at every step
      (docs/performance.md has the figures).

    `unstacked()` and `stacked()` convert between them; every method works in both.
    """

    embed: Float[Array, "vocab d_model"]
    blocks: Block | tuple[Block, ...]
    final_norm: RMSNorm
    lm_head: Linear | None
    cfg: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k_embed, k_blocks, k_head = jax.random.split(key, 3)
        self.cfg = cfg
        self.embed = jax.random.normal(k_embed, (cfg.vocab_size, cfg.d_model), jnp.float32)
        layer_keys = jax.random.split(k_blocks, cfg.n_layers)
        self.blocks = eqx.filter_vmap(lambda k: Block(cfg, key=k))(layer_keys)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # A small head gives near-uniform predictions at init (loss ~ log(vocab)).
        self.lm_head = (None if cfg.tie_embeddings
                        else Linear(cfg.d_model, cfg.vocab_size, key=k_head, scale=0.1))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.cfg.compute_dtype)

    @property
    def is_stacked(self) -> bool:
        return not isinstance(self.blocks, tuple)

    def unstacked(self) -> "Transformer":
        """This model with one `Block` per layer (the decoding layout); itself if it already
        is. Run eagerly, each layer's leaves are new, contiguous buffers (slices are copies)."""
        if not self.is_stacked:
            return self
        blocks = tuple(
            jax.tree.map(lambda leaf, i=i: leaf[i] if eqx.is_array(leaf) else leaf, self.blocks)
            for i in range(self.cfg.n_layers))
        return eqx.tree_at(lambda m: m.blocks, self, blocks)

    def stacked(self) -> "Transformer":
        """This model with its layers stacked along a leading axis (the training layout);
        itself if it already is."""
        if self.is_stacked:
            return self
        blocks = jax.tree.map(lambda *leaves: jnp.stack(leaves) if eqx.is_array(leaves[0])
                              else leaves[0], *self.blocks)
        return eqx.tree_at(lambda m: m.blocks, self, blocks)

    def allocate_cache(self, batch: int, max_len: int | None = None, dtype: str = "float32"
                       ) -> ModelCache:
        """An empty KV cache for `decode`, in this model's layer layout (`max_len` defaults to
        the context, `dtype` is one of `hpllm.kvcache.CACHE_DTYPES`)."""
        if self.is_stacked:
            return KVCache.allocate(self.cfg, batch, max_len, dtype, n_layers=self.cfg.n_layers)
        # Separate buffers per layer, each donated and updated in place.
        return tuple(KVCache.allocate(self.cfg, batch, max_len, dtype)
                     for _ in range(self.cfg.n_layers))

    def _over_layers(self, step: Callable, x: Float[Array, "batch seq d_model"], per_layer: Any
                     ) -> tuple[Float[Array, "batch seq d_model"], Any]:
        """`x, out = step(block, x, per_layer_input)` for every layer in order. `per_layer`
        (the KV cache, or None) and the collected outputs are laid out like the blocks:
        a leading layer axis (scanned with the stacked blocks) or a tuple."""
        if self.is_stacked:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def scan_step(x, inputs):
                layer_params, layer_input = inputs
                return step(eqx.combine(layer_params, static), x, layer_input)

            return lax.scan(scan_step, x, (params, per_layer))
        inputs = (None,) * len(self.blocks) if per_layer is None else per_layer
        outputs = []
        for block, layer_input in zip(self.blocks, inputs, strict=True):
            x, out = step(block, x, layer_input)
            outputs.append(out)
        return x, tuple(outputs)

    def _embed(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq d_model"]:
        return jnp.take(self.embed, tokens, axis=0).astype(self.compute_dtype)

    def _logits(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        """Final norm, then the LM head (or the tied embeddings) -> float32 logits."""
        x = self.final_norm(x)
        if self.lm_head is None:
            head = self.embed.T.astype(x.dtype)
            if self.cfg.scale_tied_head:  # unit-RMS embeddings give unit logits (trained here)
                head = head / jnp.sqrt(jnp.float32(x.shape[-1])).astype(x.dtype)
            logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Training forward over whole windows: causal, and blocked across documents when
        `segment_ids` marks packed documents. Returns float32 logits."""
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        rotary = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta,
                             self.cfg.rope_scaling)
        mask = causal_mask(positions, segment_ids)
        x, _ = self._over_layers(lambda block, x, _: (block(x, rotary, mask), None),
                                 self._embed(tokens), None)
        return self._logits(x)

    def decode(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        cache: ModelCache,
        *,
        active: Bool[Array, " batch"] | None = None,
        logits_at: Int[Array, " batch"] | None = None,
    ) -> tuple[Float[Array, "batch scored vocab"], ModelCache]:
        """Inference forward over a KV cache from `allocate_cache`: `tokens[b]` sit at
        `positions[b]` (consecutive). Their keys/values are written into cache slots
        `positions[b]`, and each query attends to the slots up to its own position. Prefill is
        this call with the whole (right-padded) prompt; decode is this call with one token.

        Rows where `active` is False (finished ones) write nothing into the cache, and neither
        does a position at or past its end; such rows' logits are meaningless. With
        `logits_at`, row b returns the logits of its token `logits_at[b]` only (scored = 1):
        the LM head, a vocab-wide matmul, runs for that token alone. Otherwise scored = seq.
        """
        max_len = cache_max_len(cache)
        cfg = self.cfg
        batch, seq = tokens.shape
        # Computed from the positions, cos and sin get fused by XLA:CPU into each layer's RoPE
        # of q and of k, which recomputes them for every head: 2 x head_dim of them per head,
        # token and layer (at batch 16, more time than the rest of a step's elementwise work
        # together). A table of every cache slot's cos and sin, looked up by position, depends
        # on no step's input, so XLA hoists it out of a decode loop: max_len x head_dim of them
        # once per chunk. Used where that is fewer (docs/performance.md); the values are the
        # same either way (the same float32 angle into the same cos and sin). A position past
        # the cache (a finished row's, prompt padding's) takes the last slot's: its outputs
        # are never used.
        if max_len <= 2 * batch * seq * (cfg.n_heads + cfg.n_kv_heads) * cfg.n_layers:
            table = rope_angles(jnp.arange(max_len, dtype=jnp.int32)[None], cfg.head_dim,
                                cfg.rope_theta, cfg.rope_scaling)
            rotary = tuple(jnp.take(t[0], positions, axis=0, mode="clip") for t in table)
        else:
            rotary = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        mask = cache_mask(positions, max_len)
        slots = positions if active is None else jnp.where(active[:, None], positions, max_len)

        def layer_step(block, x, layer_cache):
            return block.decode(x, rotary, mask, layer_cache, slots)

        x, cache = self._over_layers(layer_step, self._embed(tokens), cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        return self._logits(x), cache
