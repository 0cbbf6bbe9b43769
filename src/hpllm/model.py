"""A Llama-style decoder: token embedding, pre-norm RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, final norm, LM head.

One set of modules serves both flows. `Transformer.__call__` is the training forward over whole
windows (causal mask, optional segment ids for packed documents); `Transformer.decode` writes
new keys/values into a preallocated `KVCache` and attends over it (prefill and decode are the
same code with different lengths). Layers are stacked along a leading axis at init and run with
`lax.scan`, so compile time does not grow with depth.
"""

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


class Attention(eqx.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
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
        layer: Int[Array, ""],
        start: Int[Array, " batch"],
    ) -> tuple[Float[Array, "batch seq d_model"], KVCache]:
        q, k, v = self._project(x, rotary)
        cache = cache.write(layer, k, v, start)
        k_all, v_all = cache.read(layer, x.dtype)
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
        layer: Int[Array, ""],
        start: Int[Array, " batch"],
    ) -> tuple[Float[Array, "batch seq d_model"], KVCache]:
        attn_out, cache = self.attn.decode(self.attn_norm(x), rotary, mask, cache, layer, start)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache


def output_logits(
    x: Float[Array, "batch seq d_model"],
    final_norm: RMSNorm,
    embed: Float[Array, "vocab d_model"],
    lm_head: Linear | None,
    scale_tied_head: bool = True,
) -> Float[Array, "batch seq vocab"]:
    """Final norm, then the LM head (or the tied embeddings) -> float32 logits."""
    x = final_norm(x)
    if lm_head is None:
        head = embed.T.astype(x.dtype)
        if scale_tied_head:  # so unit-RMS embeddings give unit logits (models trained here)
            head = head / jnp.sqrt(jnp.float32(x.shape[-1])).astype(x.dtype)
        logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    else:
        logits = lm_head(x)
    return logits.astype(jnp.float32)


class Transformer(eqx.Module):
    """The decoder. `blocks` holds every layer's leaves stacked along a leading layer axis."""

    embed: Float[Array, "vocab d_model"]
    blocks: Block
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

    def _embed(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq d_model"]:
        return jnp.take(self.embed, tokens, axis=0).astype(self.compute_dtype)

    def _logits(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        return output_logits(x, self.final_norm, self.embed, self.lm_head,
                             self.cfg.scale_tied_head)

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
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def layer_step(x, layer_params):
            block = eqx.combine(layer_params, static)
            return block(x, rotary, mask), None

        x, _ = lax.scan(layer_step, self._embed(tokens), params)
        return self._logits(x)

    def decode(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        cache: KVCache,
    ) -> tuple[Float[Array, "batch seq vocab"], KVCache]:
        """Inference forward: `tokens[b]` sit at `positions[b]` (consecutive, starting at the
        row's current length). Their keys/values are written into the cache, each query attends
        to the cache up to its own position, and `lengths` becomes `positions[:, -1] + 1`.

        Prefill is this call with the whole (padded) prompt; decode is this call with one token.
        """
        rotary = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta,
                             self.cfg.rope_scaling)
        mask = cache_mask(positions, cache.max_len)
        start = positions[:, 0]
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def layer_step(carry, layer_inputs):
            x, cache = carry
            layer_params, layer = layer_inputs
            block = eqx.combine(layer_params, static)
            x, cache = block.decode(x, rotary, mask, cache, layer, start)
            return (x, cache), None

        layers = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
        (x, cache), _ = lax.scan(layer_step, (self._embed(tokens), cache), (params, layers))
        return self._logits(x), cache.with_lengths(positions[:, -1] + 1)
