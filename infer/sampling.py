"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

`SamplingConfig` is a frozen (hashable) dataclass, so the jitted decode loop takes it as a static
argument: each setting compiles once, and greedy decoding pays for no sort.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from hpllm.errors import UserError

# Logits are O(10); divided by 1e-6 they stay far below float32's 3.4e38, and 1e6 is far past
# the point where every token is equally likely.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """`greedy` takes the argmax. Otherwise logits are divided by `temperature`, cut to the
    `top_k` most likely tokens (0 = no cut), then to the smallest set whose probability reaches
    `top_p` (1.0 = no cut), and sampled. Temperature 0 means greedy; otherwise it lies in
    [MIN_TEMPERATURE, MAX_TEMPERATURE], where float32 logits divided by it stay finite. A
    `top_k` of the vocabulary size or more cuts nothing. Settings out of range raise
    `UserError` (they come from the command line's flags)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature == 0
                or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):  # rejects NaN too
            raise UserError(f"--temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} "
                            f"and {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = no cut), got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def filter_logits(logits: Float[Array, "batch vocab"], config: SamplingConfig
                  ) -> Float[Array, "batch vocab"]:
    """Tempered logits with every token outside the top-k / top-p set set to -inf."""
    logits = logits.astype(jnp.float32) / jnp.float32(config.temperature)
    vocab = logits.shape[-1]
    top_k = config.top_k if config.top_k < vocab else 0  # the whole vocabulary: no cut
    if top_k == 0 and config.top_p == 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1, descending=True)
    threshold = jnp.full(logits.shape[:1], -jnp.inf, jnp.float32)
    if top_k > 0:
        threshold = ordered[:, top_k - 1]
    if config.top_p < 1.0:
        ranks = jnp.arange(vocab)[None, :]
        kept = ordered if top_k == 0 else jnp.where(ranks < top_k, ordered, -jnp.inf)
        probs = jax.nn.softmax(kept, axis=-1)
        # A token is kept while the probability of the tokens ranked before it is below top_p,
        # so the most likely token always survives (also when top_p is below float32's
        # smallest number and the comparison keeps nothing).
        before = jnp.cumsum(probs, axis=-1) - probs
        last_kept = jnp.maximum(jnp.sum(before < config.top_p, axis=-1) - 1, 0)
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
