"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

`SamplingConfig` is a frozen (hashable) dataclass, so the jitted decode loop takes it as a static
argument: each setting compiles once, and greedy decoding pays for no sort.
"""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from hpllm.errors import UserError

# Logits are O(10); divided by 1e-6 they stay far below float32's 3.4e38, and 1e6 is far past
# the point where every token is equally likely.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
INT32_MAX = 2**31 - 1
# Block width of `argmax_rows`' first level (128 and 256 timed alike, 64 and 512 slower).
ARGMAX_BLOCK = 128


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


class RowSampling(eqx.Module):
    """Sampling settings per row, as arrays (a server's rows each serve their own request):
    the same meaning as `SamplingConfig`'s fields, temperature 0 meaning greedy."""

    temperature: Float[Array, " batch"]
    top_k: Int[Array, " batch"]
    top_p: Float[Array, " batch"]

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig]) -> "RowSampling":
        return cls(
            temperature=jnp.asarray([0.0 if c.is_greedy else c.temperature for c in configs],
                                    jnp.float32),
            # Any top_k past the vocabulary cuts nothing; clamped so it fits an int32.
            top_k=jnp.asarray([min(c.top_k, INT32_MAX) for c in configs], jnp.int32),
            top_p=jnp.asarray([c.top_p for c in configs], jnp.float32))


def argmax_rows(logits: Float[Array, "batch vocab"]) -> Int[Array, " batch"]:
    """`jnp.argmax(logits, axis=-1)`, the same answer (the first of equal largest values, a NaN
    counting as the largest), found in two levels: the largest value of each block of
    ARGMAX_BLOCK tokens, the first block holding the row's largest, then the first position
    in that block. XLA:CPU runs a row-wise argmax as one scalar loop: on 16 x 32000 logits
    (batch-16 greedy decoding of a Llama vocabulary) 2.3-2.5 ms against 0.2-0.3 ms this way,
    and 0.15-0.17 against 0.03-0.05 ms on one row (one jitted call each, the best of 7 x 50,
    2-core Xeon, AVX-512; /tmp scratch script, not kept).

    XLA:CPU's vectorised max reduction may drop a NaN (tests/test_generate.py caught it), so a
    batch with a NaN in any row (its row sum is NaN) takes `jnp.argmax` itself."""
    batch, vocab = logits.shape

    def two_levels() -> Int[Array, " batch"]:
        padding = -vocab % ARGMAX_BLOCK  # -inf after the last token: never first among equals
        padded = jnp.pad(logits, ((0, 0), (0, padding)), constant_values=-jnp.inf)
        blocks = padded.reshape(batch, -1, ARGMAX_BLOCK)
        block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
        inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
        return (block * ARGMAX_BLOCK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)

    def whole_rows() -> Int[Array, " batch"]:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(jnp.isnan(jnp.sum(logits, axis=-1))), whole_rows, two_levels)


def filter_rows(logits: Float[Array, "batch vocab"], rows: RowSampling
                ) -> Float[Array, "batch vocab"]:
    """Tempered logits with every token outside its row's top-k / top-p set set to -inf
    (a greedy row is tempered by 1)."""
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)
    logits = logits.astype(jnp.float32) / temperature[:, None]
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1, descending=True)
    ranks = jnp.arange(vocab)[None, :]
    cut_k = (rows.top_k > 0) & (rows.top_k < vocab)
    kth = jnp.take_along_axis(ordered, jnp.clip(rows.top_k - 1, 0, vocab - 1)[:, None],
                              axis=-1)[:, 0]
    threshold = jnp.where(cut_k, kth, -jnp.inf)
    kept = jnp.where((rows.top_k[:, None] == 0) | (ranks < rows.top_k[:, None]), ordered,
                     -jnp.inf)
    probs = jax.nn.softmax(kept, axis=-1)
    # A token is kept while the probability of the tokens ranked before it is below top_p,
    # so the most likely token always survives.
    before = jnp.cumsum(probs, axis=-1) - probs
    # At least rank 0: a top_p below float32's smallest number compares true nowhere.
    last_kept = jnp.maximum(jnp.sum(before < rows.top_p[:, None], axis=-1) - 1, 0)
    nucleus = jnp.take_along_axis(ordered, last_kept[:, None], axis=-1)[:, 0]
    threshold = jnp.where(rows.top_p < 1.0, jnp.maximum(threshold, nucleus), threshold)
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def filter_logits(logits: Float[Array, "batch vocab"], config: SamplingConfig
                  ) -> Float[Array, "batch vocab"]:
    """Tempered logits with every token outside the top-k / top-p set set to -inf."""
    if config.top_k == 0 and config.top_p == 1.0:
        return logits.astype(jnp.float32) / jnp.float32(config.temperature)
    batch = logits.shape[0]
    rows = RowSampling(temperature=jnp.full((batch,), config.temperature, jnp.float32),
                       top_k=jnp.full((batch,), min(config.top_k, INT32_MAX), jnp.int32),
                       top_p=jnp.full((batch,), config.top_p, jnp.float32))
    return filter_rows(logits, rows)


def sample(logits: Float[Array, "batch vocab"], key: PRNGKeyArray, config: SamplingConfig
           ) -> Int[Array, " batch"]:
    """One token per row."""
    if config.is_greedy:
        return argmax_rows(logits)
    filtered = filter_logits(logits, config)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def sample_rows(logits: Float[Array, "batch vocab"], keys: Key[Array, " batch"],
                rows: RowSampling
                ) -> Int[Array, " batch"]:
    """One token per row, each row with its own settings and its own key (`keys[b]`), so a
    row's draws do not depend on which other rows share the batch. The sort that top-k /
    top-p need is skipped when every row is greedy."""
    greedy = argmax_rows(logits)

    def draw() -> Int[Array, " batch"]:
        filtered = filter_rows(logits, rows)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(
            keys, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda: greedy)
    return jnp.where(rows.temperature > 0, drawn, greedy)
