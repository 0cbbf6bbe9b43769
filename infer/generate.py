"""KV-cached generation: one prefill pass, then many decode steps per jitted call.

- Prefill runs the whole (right-padded) prompt batch in one forward. Prompt lengths are padded
  up to a few bucket sizes (powers of two), so a new prompt length rarely compiles anything.
  Right padding is safe with the cache: a query attends only to slots up to its own position,
  and each row's padding slots are overwritten by its own decode steps before they are read.
- Decode runs `chunk_size` steps inside one `lax.while_loop` over a fixed-shape `DecodeState`
  (KV cache donated, so it is updated in place), then returns to Python, which streams the new
  tokens to the caller. Rows stop at an end token, at their token budget or at the end of the
  cache; a finished row keeps its shape in the batch but emits nothing, stops advancing and
  writes nothing into the cache. Stop strings are checked on the host between chunks
  (`Generation.stop_row`).

Each row's position (the next cache slot it writes) lives in `DecodeState.positions` and
nowhere else; the cache records no lengths. Each row also carries its own sampling settings
(`RowSampling`, arrays, so any mix of settings runs one compiled program) and its own random
key, so what a row draws does not depend on the rows beside it. `infer.engine` drives the same
`prefill` and `decode_chunk` for a server's slots.
"""

import dataclasses
from collections.abc import Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Int, Key

from hpllm.model import ModelCache, Transformer, cache_max_len
from infer.kernels import use_native_kernels
from infer.sampling import RowSampling, SamplingConfig, sample_rows

LAYOUTS = ("unrolled", "scanned")  # the model's blocks unstacked (the fast one) or stacked

GREEDY = SamplingConfig(greedy=True)
NO_TOKEN = -1  # marks "nothing emitted at this step" in a chunk's token block
MIN_BUCKET = 16
CACHE_ROUNDING = 128


class PromptTooLongError(ValueError):
    """A prompt does not fit in the model's context."""


class DecodeState(eqx.Module):
    """Everything the decode loop carries between steps; shapes never change.

    `last[b]` is the newest token of row b, not yet in the cache; it goes to slot
    `positions[b]` on the next step: the number of slots row b fills. `budget[b]` counts the
    tokens row b may still emit; `keys[b]` and `sampling` row b are its own.
    """

    cache: ModelCache
    last: Int[Array, " batch"]
    positions: Int[Array, " batch"]
    done: Bool[Array, " batch"]
    budget: Int[Array, " batch"]
    keys: Key[Array, " batch"]
    sampling: RowSampling


def bucket_length(length: int, limit: int) -> int:
    """The padded prefill length for a prompt of `length` tokens: the next power of two
    (at least MIN_BUCKET), capped at `limit`."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


RowKeys = Key[Array, " batch"]


def split_rows(keys: RowKeys) -> tuple[RowKeys, RowKeys]:
    """Each row's key split in two: (the keys to carry on, the keys to draw with now)."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def _finished(state_positions, budget, token, stop_ids: tuple[int, ...], max_len: int):
    is_stop = jnp.zeros_like(token, dtype=bool)
    for stop_id in stop_ids:
        is_stop = is_stop | (token == stop_id)
    return is_stop | (budget <= 0) | (state_positions >= max_len)


def prefill_rows(
    model: Transformer,
    tokens: Int[Array, "batch bucket"],
    starts: Int[Array, " batch"],
    lengths: Int[Array, " batch"],
    budget: Int[Array, " batch"],
    cache: ModelCache,
    keys: Key[Array, " batch"],
    sampling: RowSampling,
    stop_ids: tuple[int, ...],
) -> tuple[DecodeState, Int[Array, " batch"]]:
    """Run the padded new tokens through the model and sample each row's first new token.

    Row b's `lengths[b]` new tokens go to cache slots `starts[b]`, `starts[b] + 1`, ...: the
    slots before `starts[b]` already hold the keys/values of the tokens before them (a chat's
    earlier turns), or nothing when `starts[b]` is 0. Returns the decode state and the first
    tokens (`NO_TOKEN` where a row stopped at once). Not jitted: `prefill` and
    `infer.engine.prefill_slot` jit it.
    """
    batch, bucket = tokens.shape
    positions = starts[:, None] + jnp.arange(bucket, dtype=jnp.int32)[None, :]
    # Only each row's last new token goes through the LM head (a vocab-wide matmul).
    logits, cache = model.decode(tokens, positions, cache, logits_at=lengths - 1)
    last_logits = logits[:, 0]
    max_len = cache_max_len(cache)
    keys, step_keys = split_rows(keys)
    first = sample_rows(last_logits, step_keys, sampling)
    ends = starts + lengths
    budget = budget - 1
    done = _finished(ends, budget, first, stop_ids, max_len) | (budget < 0)
    is_stop = _finished(ends, jnp.ones_like(budget), first, stop_ids, max_len + 1)
    emitted = jnp.where(is_stop | (budget < 0), NO_TOKEN, first)
    state = DecodeState(cache=cache, last=first, positions=ends, done=done, budget=budget,
                        keys=keys, sampling=sampling)
    return state, emitted


prefill = eqx.filter_jit(donate="all-except-first")(prefill_rows)


def decode_steps(
    model: Transformer,
    state: DecodeState,
    n_steps: int,
    stop_ids: tuple[int, ...],
) -> tuple[DecodeState, Int[Array, "batch n_steps"]]:
    """Up to `n_steps` decode steps (fewer if every row finishes first).

    Returns the new state and the emitted tokens, `NO_TOKEN` where a row emitted nothing. Not
    jitted: `decode_chunk` and `infer.engine.decode_first_rows` jit it.
    """
    batch = state.last.shape[0]
    max_len = cache_max_len(state.cache)

    def not_finished(carry):
        step, state, _ = carry
        return (step < n_steps) & ~jnp.all(state.done)

    def one_step(carry):
        step, state, emitted = carry
        active = ~state.done
        logits, cache = model.decode(state.last[:, None], state.positions[:, None], state.cache,
                                     active=active)
        keys, step_keys = split_rows(state.keys)
        token = sample_rows(logits[:, -1], step_keys, state.sampling)
        positions = state.positions + active.astype(jnp.int32)
        budget = state.budget - active.astype(jnp.int32)
        is_stop = _finished(positions, jnp.ones_like(budget), token, stop_ids, max_len + 1)
        emit = active & ~is_stop
        emitted = emitted.at[:, step].set(jnp.where(emit, token, NO_TOKEN))
        done = state.done | _finished(positions, budget, token, stop_ids, max_len)
        new_state = DecodeState(cache=cache, last=jnp.where(active, token, state.last),
                                positions=positions, done=done, budget=budget, keys=keys,
                        sampling=state.sampling)
        return step + 1, new_state, emitted

    emitted = jnp.full((batch, n_steps), NO_TOKEN, jnp.int32)
    _, state, emitted = lax.while_loop(not_finished, one_step, (jnp.int32(0), state, emitted))
    return state, emitted


decode_chunk = eqx.filter_jit(donate="all-except-first")(decode_steps)


@dataclasses.dataclass
class Generation:
    """An iterator over chunks of new tokens: each item is one list of new ids per row.

    `stop_row(b)` ends row b early (the caller found a stop string); `tokens[b]` holds
    everything row b has emitted so far.
    """

    model: Transformer
    state: DecodeState
    first: list[int]
    stop_ids: tuple[int, ...]
    chunk_size: int

    def __post_init__(self) -> None:
        self.tokens: list[list[int]] = [[] for _ in self.first]
        self._started = False

    def stop_row(self, row: int) -> None:
        self.state = eqx.tree_at(lambda s: s.done, self.state, self.state.done.at[row].set(True))

    @property
    def finished(self) -> bool:
        return bool(jnp.all(self.state.done))

    def __iter__(self) -> Iterator[list[list[int]]]:
        return self

    def __next__(self) -> list[list[int]]:
        if not self._started:
            self._started = True
            new = [[t] if t != NO_TOKEN else [] for t in self.first]
        elif self.finished:
            raise StopIteration
        else:
            self.state, emitted = decode_chunk(self.model, self.state, self.chunk_size,
                                               self.stop_ids)
            new = [[t for t in row if t != NO_TOKEN] for row in jax.device_get(emitted).tolist()]
        for row, ids in zip(self.tokens, new, strict=True):
            row.extend(ids)
        return new


class Generator:
    """Holds a model and its generation settings; `start` begins a batch of prompts.

    `context` is the longest sequence (prompt + completion) a row may reach: the model's
    `max_seq_len` unless a shorter one is asked for. `layout="unrolled"` (the fast one)
    decodes with the model's blocks unstacked (`Transformer.unstacked`: per-layer buffers);
    "scanned" keeps them stacked, as trained. `native_kernels` swaps int8 / int4 weight-only
    matmuls for the native kernels of `infer.kernels` where they can be built.
    """

    def __init__(self, model: Transformer, *, stop_ids: Sequence[int] = (),
                 kv_cache_dtype: str = "float32", chunk_size: int = 16,
                 context: int | None = None, layout: str = "unrolled",
                 native_kernels: bool = True):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model.unstacked() if layout == "unrolled" else model.stacked()
        if native_kernels:
            self.model = use_native_kernels(self.model)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.kv_cache_dtype = kv_cache_dtype
        self.chunk_size = chunk_size
        self.context = model.cfg.max_seq_len if context is None else min(
            context, model.cfg.max_seq_len)

    def cache_length(self, bucket: int, max_new_tokens: int) -> int:
        """Cache slots for prompts padded to `bucket`: room for every new token, rounded up so
        that nearby settings share one compiled program, never beyond the context."""
        wanted = bucket + max_new_tokens
        rounded = -(-wanted // CACHE_ROUNDING) * CACHE_ROUNDING
        return min(rounded, self.context)

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
              sampling: SamplingConfig = GREEDY, seed: int = 0
              ) -> Generation:
        if not prompts:
            raise ValueError("no prompts given")
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("empty prompt: give at least one token")
        if longest > self.context:
            raise PromptTooLongError(
                f"prompt of {longest} tokens does not fit the model's context of "
                f"{self.context} tokens; shorten it")
        if max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        bucket = bucket_length(longest, self.context)
        cache_len = self.cache_length(bucket, max_new_tokens)
        padded = [list(p) + [0] * (bucket - len(p)) for p in prompts]
        batch = len(prompts)
        cache = self.model.allocate_cache(batch, cache_len, self.kv_cache_dtype)
        state, first = prefill(
            self.model, jnp.asarray(padded, jnp.int32), jnp.zeros((batch,), jnp.int32),
            jnp.asarray([len(p) for p in prompts], jnp.int32),
            jnp.full((batch,), max_new_tokens, jnp.int32), cache,
            jax.random.split(jax.random.key(seed), batch), RowSampling.of([sampling] * batch),
            self.stop_ids)
        return Generation(self.model, state, jax.device_get(first).tolist(), self.stop_ids,
                          self.chunk_size)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = GREEDY, seed: int = 0
                 ) -> list[list[int]]:
        """All new tokens of every row (no streaming)."""
        generation = self.start(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                seed=seed)
        for _ in generation:
            pass
        return generation.tokens
