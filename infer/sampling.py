"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

`SamplingConfig` is a frozen (hashable) dataclass, so the jitted decode loop takes it as a static
argument: each setting compiles once, and greedy decoding pays for no sort.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """`greedy` takes the argmax. Otherwise logits are divided by `temperature`, cut to the
    `top_k` most likely tokens (0 = no cut), then to the smallest set whose probability reaches
    `top_p` (1.0 = no cut), and sampled. Temperature 0 means greedy."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = no cut), got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def filter_logits(logits: Float[Array, "batch vocab"], config: SamplingConfig
                  ) -> Float[Array, "batch vocab"]:
    """Tempered logits with every token outside the top-k / top-p set set to -inf."""
    logits = logits.astype(jnp.float32) / jnp.float32(config.temperature)
    vocab = logits.shape[-1]
    if config.top_k == 0 and config.top_p == 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1, descending=True)
    threshold = jnp.full(logits.shape[:1], -jnp.inf, jnp.float32)
    if 0 < config.top_k < vocab:
        threshold = ordered[:, config.top_k - 1]
    if config.top_p < 1.0:
        ranks = jnp.arange(vocab)[None, :]
        kept = ordered if config.top_k == 0 else jnp.where(
            ranks < config.top_k, ordered, -jnp.inf)
        probs = jax.nn.softmax(kept, axis=-1)
        # A token is kept while the probability of the tokens ranked before it is below top_p,
        # so the most likely token always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        last_kept = jnp.sum(before < config.top_p, axis=-1) - 1
        threshold = jnp.maximum(threshold, jnp.take_along_axis(
            ordered, last_kept[:, None], axis=-1)[:, 0])
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def sample(logits: Float[Array, "batch vocab"], key: PRNGKeyArray, config: SamplingConfig
           ) -> Int[Array, " batch"]:
    """One token per row."""
    if config.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, config)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
