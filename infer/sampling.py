"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

`SamplingConfig` is a frozen (hashable) dataclass, so the jitted decode loop takes it as a static
argument: each setting compiles once, and greedy decoding pays for no sort.
"""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray, UInt32

from hpllm.errors import UserError

# Logits are O(10); divided by 1e-6 they stay far below float32's 3.4e38, and 1e6 is far past
# the point where every token is equally likely.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
INT32_MAX = 2**31 - 1
# Block width of `argmax_rows`' first level (128 and 256 timed alike, 64 and 512 slower).
ARGMAX_BLOCK = 128
# Candidates per row that top-k / top-p rank before falling back to a full sort.
CANDIDATES = 128
# Block width of `draw_rows`' first level.
DRAW_BLOCK = 128


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
    (batch-16 greedy decoding of a Llama vocabulary) 1.4-2.5 ms against 0.2-0.3 ms this way,
    and 0.15-0.17 against 0.03-0.05 ms on one row (`bench/argmax_cost.py`; 2-core Xeon,
    AVX-512; docs/performance.md).

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


def _tempered(logits: Float[Array, "batch vocab"], rows: RowSampling
              ) -> Float[Array, "batch vocab"]:
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)
    return logits.astype(jnp.float32) / temperature[:, None]


def _cuts_k(rows: RowSampling, vocab: int) -> Bool[Array, " batch"]:
    return (rows.top_k > 0) & (rows.top_k < vocab)


def _ranked_thresholds(ordered: Float[Array, "batch n"], rows: RowSampling, vocab: int,
                       no_k_mass: Float[Array, " batch"] | None = None
                       ) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Each row's smallest kept tempered logit (-inf: no cut), from the row's `n` largest
    tempered logits in descending order (`n` is the vocabulary or the candidates' count).
    `no_k_mass` is sum(exp(logit - max)) over the whole row, the softmax's denominator for a
    row that top-k does not cut when `ordered` holds only candidates (None: the whole row is
    given). Also returns the probability ranked before the last of `ordered`: where a row's
    nucleus is not decided inside the candidates, it is below the row's top_p."""
    n = ordered.shape[-1]
    ranks = jnp.arange(n)[None, :]
    cut_k = _cuts_k(rows, vocab)
    kth = jnp.take_along_axis(ordered, jnp.clip(rows.top_k - 1, 0, n - 1)[:, None],
                              axis=-1)[:, 0]
    threshold = jnp.where(cut_k, kth, -jnp.inf)
    in_k = (rows.top_k[:, None] == 0) | (ranks < rows.top_k[:, None])
    # Rank 0 is always in the top-k set, so it is the kept set's max: the softmax's shift.
    weights = jnp.where(in_k, jnp.exp(ordered - ordered[:, :1]), 0.0)
    mass = jnp.sum(weights, axis=-1)
    if no_k_mass is not None:
        mass = jnp.where(cut_k, mass, no_k_mass)
    probs = weights / mass[:, None]
    # A token is kept while the probability of the tokens ranked before it is below top_p,
    # so the most likely token always survives.
    before = jnp.cumsum(probs, axis=-1) - probs
    # At least rank 0: a top_p below float32's smallest number compares true nowhere.
    last_kept = jnp.maximum(jnp.sum(before < rows.top_p[:, None], axis=-1) - 1, 0)
    nucleus = jnp.take_along_axis(ordered, last_kept[:, None], axis=-1)[:, 0]
    threshold = jnp.where(rows.top_p < 1.0, jnp.maximum(threshold, nucleus), threshold)
    return threshold, before[:, -1]


def _sorted_thresholds(tempered: Float[Array, "batch vocab"], rows: RowSampling
                       ) -> Float[Array, " batch"]:
    """The exact rule over the whole sorted row: any top_k, any nucleus size."""
    ordered = jnp.sort(tempered, axis=-1, descending=True)
    return _ranked_thresholds(ordered, rows, tempered.shape[-1])[0]


def _float_order(values: Float[Array, "*shape"]) -> UInt32[Array, "*shape"]:
    """float32 -> uint32 with the same order (-inf first; -0 just below +0)."""
    bits = jax.lax.bitcast_convert_type(values, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(2**31))


def _searched_thresholds(tempered: Float[Array, "batch vocab"], rows: RowSampling
                         ) -> Float[Array, " batch"]:
    """The rule's threshold for a row with only a top-k cut or only a top-p cut, found by a
    binary search over float32 values instead of a sort: the smallest logit v of the row with
    fewer than top_k tokens above it, or with the probability above it below top_p (equal
    logits fall together, as the rule's ranking keeps them). 32 halvings of the uint32 order,
    each a pass over the row: ~10 ms for 16 x 32000 against the sort's ~160 ms. Rows with
    neither cut get -inf (garbage where both cut: the caller sorts those)."""
    vocab = tempered.shape[-1]
    cut_k = _cuts_k(rows, vocab)
    top = jnp.max(tempered, axis=-1, keepdims=True)
    weights = jnp.exp(tempered - top)
    mass = jnp.sum(weights, axis=-1)
    order = _float_order(tempered)
    # One sum per halving: a top-k row counts tokens (exact in float32 below 2^24 tokens),
    # a top-p row adds their weights.
    counted = jnp.where(cut_k[:, None], 1.0, weights)
    limit = jnp.where(cut_k, rows.top_k.astype(jnp.float32), rows.top_p * mass)

    def reaches(key: UInt32[Array, " batch"]) -> Bool[Array, " batch"]:
        return jnp.sum(jnp.where(order > key[:, None], counted, 0.0), axis=-1) < limit

    def halve(_, bounds: tuple[UInt32[Array, " batch"], UInt32[Array, " batch"]]):
        low, high = bounds  # `reaches` is true at high, false at low (0 is below -inf)
        middle = low + (high - low) // 2
        ok = reaches(middle)
        return jnp.where(ok, low, middle), jnp.where(ok, middle, high)

    # The row's largest logit always reaches: nothing is above it.
    high = _float_order(top[:, 0])
    low = jnp.zeros_like(high)
    low, high = jax.lax.fori_loop(0, 32, halve, (low, high))
    # `reaches` changes only at the row's logits, so `high` is one: take it from the row.
    threshold = jnp.min(jnp.where(order >= high[:, None], tempered, jnp.inf), axis=-1)
    return jnp.where(cut_k | (rows.top_p < 1.0), threshold, -jnp.inf)


def _thresholds(tempered: Float[Array, "batch vocab"], rows: RowSampling
                ) -> Float[Array, " batch"]:
    """Each row's smallest kept tempered logit (-inf where nothing is cut).

    A full sort of a 32000 vocabulary costs ~160 ms for 16 rows on XLA:CPU, ten times a decode
    step, though top-k and top-p only look at the head of the ranking. So: no row cuts, no
    ranking at all; otherwise `lax.top_k` picks CANDIDATES per row and the rule runs on them,
    the softmax's denominator of a row without a top-k cut coming from the whole row. Where
    a row needs more (a top_k past the candidates, or a nucleus that the candidates' mass does
    not complete) a binary search finds its threshold (`_searched_thresholds`), or, for a
    top_k past the candidates with a top_p, the whole batch takes the full sort: the answer
    is always the rule's."""
    vocab = tempered.shape[-1]
    cut_k = _cuts_k(rows, vocab)
    cuts = cut_k | (rows.top_p < 1.0)
    if vocab <= CANDIDATES:
        return jax.lax.cond(jnp.any(cuts), _sorted_thresholds, lambda *_: jnp.full(
            tempered.shape[:1], -jnp.inf), tempered, rows)

    def from_candidates() -> Float[Array, " batch"]:
        # The barrier keeps XLA from folding the slices taken below into the top-k, which
        # turns it back into a full sort (175 ms instead of 4 for 16 x 32000, k 128).
        ordered = jax.lax.optimization_barrier(jax.lax.top_k(tempered, CANDIDATES)[0])
        row_mass = jnp.sum(jnp.exp(tempered - ordered[:, :1]), axis=-1)
        threshold, before_last = _ranked_thresholds(ordered, rows, vocab, row_mass)
        k_inside = cut_k & (rows.top_k <= CANDIDATES)
        needs_more = ((cut_k & ~k_inside)
                      | ((rows.top_p < 1.0) & ~k_inside & (before_last < rows.top_p)))

        def beyond_candidates() -> Float[Array, " batch"]:
            searched = jnp.where(needs_more, _searched_thresholds(tempered, rows), threshold)
            # A top_k past the candidates together with a top_p: the nucleus' softmax is over
            # exactly top_k tokens, ties at the k-th split by rank, which only a sort knows.
            return jax.lax.cond(jnp.any(cut_k & ~k_inside & (rows.top_p < 1.0)),
                                _sorted_thresholds, lambda *_: searched, tempered, rows)

        return jax.lax.cond(jnp.any(needs_more), beyond_candidates, lambda: threshold)

    return jax.lax.cond(jnp.any(cuts), from_candidates,
                        lambda: jnp.full(tempered.shape[:1], -jnp.inf))


def filter_rows(logits: Float[Array, "batch vocab"], rows: RowSampling
                ) -> Float[Array, "batch vocab"]:
    """Tempered logits with every token outside its row's top-k / top-p set set to -inf
    (a greedy row is tempered by 1). Ties with the smallest kept logit are kept."""
    tempered = _tempered(logits, rows)
    threshold = _thresholds(tempered, rows)
    return jnp.where(tempered >= threshold[:, None], tempered, -jnp.inf)


def _first_past(cumulative: Float[Array, "batch n"], weights: Float[Array, "batch n"],
                target: Float[Array, " batch"]) -> Int[Array, " batch"]:
    """The first position with weight whose running sum passes `target`, or the last position
    with weight when float rounding left the sum short of it: never a weightless one. Plain
    min/max reductions: XLA:CPU runs a row-wise argmax as a scalar loop."""
    n = weights.shape[-1]
    positions = jnp.arange(n, dtype=jnp.int32)[None, :]
    has_weight = weights > 0
    first = jnp.min(jnp.where(has_weight & (cumulative > target[:, None]), positions, n),
                    axis=-1)
    last = jnp.max(jnp.where(has_weight, positions, 0), axis=-1)
    return jnp.minimum(first, last)


def draw_rows(weights: Float[Array, "batch vocab"], uniforms: Float[Array, " batch"]
              ) -> Int[Array, " batch"]:
    """Row b's token drawn with probability proportional to `weights[b]` (>= 0, some > 0) by
    inverting the cumulative sum at `uniforms[b] * total` (uniforms in [0, 1)), in two levels:
    the sums of blocks of DRAW_BLOCK tokens, the block where the running sum passes the target,
    then the token inside it. `jax.random.categorical` makes a Gumbel number per token (32000
    threefry draws a row: 20 ms for 16 rows); this makes one. A weight-0 token is never drawn.
    A token's probability is resolved to the uniform's 2^-23 steps (`jax.random.uniform`'s
    float32 mantissa): a token below 1.2e-7 of the row's mass is drawn at that rate or not."""
    batch, vocab = weights.shape
    padded = jnp.pad(weights, ((0, 0), (0, -vocab % DRAW_BLOCK)))
    blocks = padded.reshape(batch, -1, DRAW_BLOCK)
    block_sums = jnp.sum(blocks, axis=-1)
    running = jnp.cumsum(block_sums, axis=-1)
    target = uniforms * running[:, -1]
    block = _first_past(running, block_sums, target)
    mass_before = jnp.where(
        block > 0, jnp.take_along_axis(running, jnp.maximum(block - 1, 0)[:, None],
                                       axis=-1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    position = _first_past(jnp.cumsum(inside, axis=-1), inside, target - mass_before)
    return block * DRAW_BLOCK + position


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
    """One token per row, each row with its own settings and its own key (`keys[b]`, one
    uniform number from it), so a row's draws do not depend on which other rows share the
    batch. Greedy rows take the argmax, and cut nothing for the others' ranking; when every
    row is greedy nothing else runs."""
    greedy = argmax_rows(logits)
    sampled = rows.temperature > 0

    def draw() -> Int[Array, " batch"]:
        cutting = RowSampling(temperature=rows.temperature,
                              top_k=jnp.where(sampled, rows.top_k, 0),
                              top_p=jnp.where(sampled, rows.top_p, 1.0))
        tempered = _tempered(logits, cutting)
        threshold = _thresholds(tempered, cutting)
        # The largest tempered logit is always kept, so every row's mass is at least 1.
        top = jnp.max(tempered, axis=-1, keepdims=True)
        weights = jnp.where(tempered >= threshold[:, None], jnp.exp(tempered - top), 0.0)
        uniforms = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys)
        return draw_rows(weights, uniforms)

    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    return jnp.where(sampled, drawn, greedy)
