"""The serving engine: continuous batching over a fixed set of slots, and prompt-cache reuse.

One `Engine` owns the model and `max_batch` slots. Each slot is one row of a preallocated KV
cache (`DecodeState`: the row's position, budget, sampling settings and random key ride along).
`step()` is one round of the scheduler:

1. requests cancelled since the last round leave their slots (the row is marked done, so it
   never writes into the cache again);
2. queued requests take free slots and are prefilled together (`prefill_slots`: the rows'
   caches are gathered, `prefill_rows` writes the new tokens, the rows go back), as few calls
   as their padded lengths allow (`Engine.prefill_groups`; a call may carry a few padding
   rows where that saves calls), and join the batch: a burst of requests costs one prefill of
   many rows rather than one stall of the running requests per request (vLLM and llama.cpp's
   server batch waiting prompts the same way);
3. one decode chunk (`infer.generate.decode_chunk`) runs over the first slots, up to the last
   busy one, rounded up to a power of two (`row_buckets`): a lone request decodes as a batch of
   one, not of `max_batch` (each row costs a pass over the weights in the matmul kernels and
   its own attention over the cache). Requests go to the lowest free slots, so the busy rows
   stay packed at the front. Finished rows in that range emit nothing and write nothing, and
   their slots are free for the next round.

Nobody waits for the longest request: a request joins between two chunks and leaves as soon as
it is done. Shapes never change (the cache is allocated once; prompts are padded to a few
bucket lengths, prefills and decode chunks run over a few row counts), so `warm_up()` compiles
every program the engine will run, once.

A free slot keeps the tokens whose keys/values its row holds. A new request goes to the free
slot whose tokens share the longest prefix with its prompt, and only the rest of the prompt is
prefilled: a chat's next turn prefills its new tokens only (llama.cpp's server picks slots the
same way); without a shared prefix, the lowest free slot.

The engine is not thread-safe except for `submit` and `Request.cancel`: one thread (a server's
engine thread, or the chat loop itself) calls `step()`.
"""

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Int, Key

from hpllm.model import ModelCache, Transformer
from infer.generate import (
    GREEDY,
    MIN_BUCKET,
    NO_TOKEN,
    DecodeState,
    PromptTooLongError,
    bucket_length,
    decode_steps,
    prefill_rows,
)
from infer.kernels import use_native_kernels
from infer.sampling import RowSampling, SamplingConfig

FINISH_STOP = "stop"  # an end token (or a stop string the caller found)
FINISH_LENGTH = "length"  # the token budget or the context ran out
FINISH_CANCELLED = "cancelled"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED)


class QueueFullError(RuntimeError):
    """Every slot is busy and the queue holds `max_queue` requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. `on_tokens(new_ids, finish_reason)` is called from the engine's thread
    with each batch of new tokens, and once more with the finish reason (one of the FINISH_*
    names) when the request ends; `cached` then says how many prompt tokens were found in the
    cache rather than prefilled."""

    prompt: list[int]
    max_tokens: int
    on_tokens: Callable[[list[int], str | None], None]
    sampling: SamplingConfig = GREEDY
    seed: int = 0
    cached: int = 0

    def __post_init__(self) -> None:
        self._cancelled = threading.Event()
        self.generated: list[int] = []

    def cancel(self) -> None:
        """Ask the engine to stop this request (safe from any thread): it leaves its slot, or
        the queue, at the next round."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclasses.dataclass
class Slot:
    """The host's view of one cache row: the request in it (None when free) and the tokens
    whose keys/values the row holds, in order."""

    request: Request | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)


# The DecodeState leaves other than the cache; each leads with the batch axis.
_ROW_FIELDS = ("last", "positions", "done", "budget", "keys", "sampling")


def _batch_axis(cache: ModelCache) -> int:
    return 0 if isinstance(cache, tuple) else 1  # stacked layers lead with the layer axis


@eqx.filter_jit(donate="all-except-first")
def prefill_slots(
    model: Transformer,
    state: DecodeState,
    slots: Int[Array, " rows"],
    tokens: Int[Array, "rows bucket"],
    starts: Int[Array, " rows"],
    lengths: Int[Array, " rows"],
    budget: Int[Array, " rows"],
    keys: Key[Array, " rows"],
    sampling: RowSampling,
    stop_ids: tuple[int, ...],
) -> tuple[DecodeState, Int[Array, " rows"]]:
    """Prefill one request into each of the (distinct) rows `slots` of the shared state; the
    other rows are untouched. A slot index past the last row is a padding row: it computes on
    a copy of the last row and is never written back.

    The rows' caches are gathered, `prefill_rows` writes each one's new tokens at its `starts`
    entry on (the slots before it keep what they hold), and the rows are scattered back.
    """
    rows_cache = _gather_rows(state.cache, slots)
    rows, first = prefill_rows(model, tokens, starts, lengths, budget, rows_cache, keys,
                               sampling, stop_ids)
    return _scatter_rows(state, rows, slots), first


@eqx.filter_jit(donate="all-except-first")
def decode_first_rows(
    model: Transformer,
    state: DecodeState,
    rows: int,
    n_steps: int,
    stop_ids: tuple[int, ...],
) -> tuple[DecodeState, Int[Array, "rows n_steps"]]:
    """`decode_chunk` over rows 0..rows-1 of the state only; the other rows are untouched."""
    part, emitted = decode_steps(model, _take_rows(state, 0, rows), n_steps, stop_ids)
    return _put_rows(state, part, 0), emitted


def _take_rows(state: DecodeState, start: Int[Array, ""] | int, size: int) -> DecodeState:
    """Rows start..start+size-1 of every per-row leaf (the cache's batch axis follows its
    layout; every other leaf leads with the batch)."""
    axis = _batch_axis(state.cache)
    return DecodeState(
        cache=jax.tree.map(lambda c: lax.dynamic_slice_in_dim(c, start, size, axis=axis),
                           state.cache),
        **{name: jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=0),
                              getattr(state, name)) for name in _ROW_FIELDS})


def _put_rows(state: DecodeState, part: DecodeState, start: Int[Array, ""] | int
              ) -> DecodeState:
    """`state` with `part`'s rows written back from row `start` on."""
    axis = _batch_axis(state.cache)
    return DecodeState(
        cache=jax.tree.map(lambda w, p: lax.dynamic_update_slice_in_dim(w, p, start, axis=axis),
                           state.cache, part.cache),
        **{name: jax.tree.map(lambda w, p: lax.dynamic_update_slice_in_dim(w, p, start, axis=0),
                              getattr(state, name), getattr(part, name))
           for name in _ROW_FIELDS})


def _gather_rows(cache: ModelCache, slots: Int[Array, " rows"]) -> ModelCache:
    """The cache rows `slots`, in that order (a slot past the last row reads the last row)."""
    axis = _batch_axis(cache)
    return jax.tree.map(lambda c: jnp.take(c, slots, axis=axis, mode="clip"), cache)


def _scatter_rows(state: DecodeState, part: DecodeState, slots: Int[Array, " rows"]
                  ) -> DecodeState:
    """`state` with `part`'s row i written to row `slots[i]` of every per-row leaf (dropped
    for a slot past the last row: a padding row)."""
    axis = _batch_axis(state.cache)

    def put(whole: Array, rows: Array, axis: int) -> Array:
        index = (slice(None),) * axis + (slots,)
        return whole.at[index].set(rows, unique_indices=True, mode="drop")

    return DecodeState(
        cache=jax.tree.map(lambda w, p: put(w, p, axis), state.cache, part.cache),
        **{name: jax.tree.map(lambda w, p: put(w, p, 0), getattr(state, name),
                              getattr(part, name)) for name in _ROW_FIELDS})


def row_buckets(max_batch: int) -> list[int]:
    """The row counts a decode chunk runs over: powers of two below `max_batch`, and it."""
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(min(buckets[-1] * 2, max_batch))
    return buckets


def prefill_buckets(context: int) -> list[int]:
    """Every padded prefill length the engine uses for a context of `context` slots."""
    buckets = [min(MIN_BUCKET, context)]
    while buckets[-1] < context:
        buckets.append(min(buckets[-1] * 2, context))
    return buckets


# At most this many padded tokens in a prefill of several rows (one row takes a whole context):
# past a few hundred tokens a prefill is compute-bound, so bigger calls gain nothing and only
# add programs to compile. llama.cpp's server batches prompts up to 2048 tokens (`n_batch`).
PREFILL_TOKENS = 1024


def prefill_shapes(context: int, max_batch: int) -> list[tuple[int, int]]:
    """Every (rows, padded length) a prefill runs at: each length bucket alone, and several
    rows of it where they hold at most `PREFILL_TOKENS` padded tokens."""
    return [(rows, bucket) for bucket in prefill_buckets(context)
            for rows in row_buckets(max_batch) if rows == 1 or rows * bucket <= PREFILL_TOKENS]


def _greedy_calls(rows: int, sizes: Sequence[int]) -> int:
    """How many calls `rows` rows take in calls of the largest of `sizes` that fits each time."""
    calls = 0
    while rows:
        rows -= max(size for size in sizes if size <= rows)
        calls += 1
    return calls


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Continuous batching over `max_batch` slots of `context` cache slots each.

    `submit` queues a request (at most `max_queue` wait for a slot; more raise
    `QueueFullError`); `step` runs one round of the scheduler; `run_until_idle` steps until
    nothing is left. `layout` and `native_kernels` are as for `infer.generate.Generator`.
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, kv_cache_dtype: str = "float32",
                 chunk_size: int = 4, stop_ids: Sequence[int] = (), layout: str = "unrolled",
                 native_kernels: bool = True):
        if max_batch < 1 or max_queue < 0 or chunk_size < 1:
            raise ValueError(f"need max_batch >= 1, max_queue >= 0, chunk_size >= 1; got "
                             f"{max_batch}, {max_queue}, {chunk_size}")
        self.model = model.unstacked() if layout == "unrolled" else model.stacked()
        if native_kernels:
            self.model = use_native_kernels(self.model)
        self.max_batch, self.max_queue, self.chunk_size = max_batch, max_queue, chunk_size
        self.context = model.cfg.max_seq_len if context is None else min(
            context, model.cfg.max_seq_len)
        self.kv_cache_dtype = kv_cache_dtype
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.buckets = prefill_buckets(self.context)
        self.row_buckets = row_buckets(max_batch)
        self.prefill_shapes = prefill_shapes(self.context, max_batch)
        self._lock = threading.Lock()
        self._pending: collections.deque[Request] = collections.deque()
        self.wakeup = threading.Event()  # set by submit / cancel, for a waiting engine thread
        self.finished: collections.Counter[str] = collections.Counter()  # requests by reason
        self.reset()

    def reset(self) -> None:
        """Empty every slot and forget every cached prefix (a fresh cache)."""
        self.state = DecodeState(
            cache=self.model.allocate_cache(self.max_batch, self.context, self.kv_cache_dtype),
            last=jnp.zeros((self.max_batch,), jnp.int32),
            positions=jnp.zeros((self.max_batch,), jnp.int32),
            done=jnp.ones((self.max_batch,), bool),
            budget=jnp.zeros((self.max_batch,), jnp.int32),
            keys=jax.random.split(jax.random.key(0), self.max_batch),
            sampling=RowSampling.of([GREEDY] * self.max_batch))
        self.slots = [Slot() for _ in range(self.max_batch)]

    # --- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request`. Raises `PromptTooLongError` for a prompt that does not fit the
        context, ValueError for an empty one, `QueueFullError` when the queue is full."""
        if not request.prompt:
            raise ValueError("empty prompt: give at least one token")
        if len(request.prompt) > self.context:
            raise PromptTooLongError(
                f"prompt of {len(request.prompt)} tokens does not fit the context of "
                f"{self.context} tokens; shorten it")
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {request.max_tokens}")
        with self._lock:
            busy = sum(s.request is not None for s in self.slots)
            free = self.max_batch - busy
            if len(self._pending) - free >= self.max_queue:
                raise QueueFullError(f"{self.max_batch} requests running and {self.max_queue} "
                                     "waiting already; try again later")
            self._pending.append(request)
        self.wakeup.set()

    @property
    def running(self) -> int:
        return sum(s.request is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or any(s.request is not None for s in self.slots)

    # --- called from the engine's thread only ----------------------------------------------

    def warm_up(self) -> None:
        """Compile every prefill shape and decode chunk now, so no request pays for it."""
        # Through the same host code as a request's, whose array building runs small ops
        # (conversions, the keys' concatenation) that compile per shape on first use too.
        for rows, bucket in self.prefill_shapes:
            self._prefill_call([(row, Request([0] * bucket, 0, lambda *_: None), [0] * bucket)
                                for row in range(rows)])
        self._mark_done([])
        for rows in self.row_buckets:
            self.state, emitted = decode_first_rows(self.model, self.state, rows,
                                                    self.chunk_size, self.stop_ids)
        jax.block_until_ready(emitted)
        self.reset()

    def step(self) -> None:
        """One round: drop cancelled requests, admit queued ones, run one decode chunk."""
        self._drop_cancelled()
        self._admit()
        if any(s.request is not None for s in self.slots):
            self._decode()

    def fail_all(self, reason: str) -> None:
        """End every queued and running request with `reason` and empty the engine (after a
        failed step, whose state cannot be trusted)."""
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        running = [s.request for s in self.slots if s.request is not None]
        self.reset()
        for request in pending + running:
            request.on_tokens([], reason)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    def _finish(self, index: int, reason: str, positions: int) -> None:
        slot = self.slots[index]
        request = slot.request
        assert request is not None
        # The row holds the keys/values of its first `positions` tokens (the newest token is
        # not yet written).
        slot.tokens = (request.prompt + request.generated)[:positions]
        slot.request = None
        self.finished[reason] += 1
        request.on_tokens([], reason)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._pending if r.cancelled]
            for request in gone:
                self._pending.remove(request)
        for request in gone:
            self.finished[FINISH_CANCELLED] += 1
            request.on_tokens([], FINISH_CANCELLED)
        rows = [i for i, s in enumerate(self.slots) if s.request is not None and
                s.request.cancelled]
        if rows:
            self._mark_done(rows)
            positions = jax.device_get(self.state.positions)
            for i in rows:
                self._finish(i, FINISH_CANCELLED, int(positions[i]))

    def _choose_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot to prefill `prompt` into, and how many of its tokens the slot's cache
        already holds: the longest shared prefix wins, then the lowest slot (busy rows packed
        at the front keep the decode chunks small)."""
        best, best_shared = -1, -1
        for i, slot in enumerate(self.slots):
            if slot.request is not None:
                continue
            # At least one token is prefilled: its logits give the first new token.
            shared = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
            if shared > best_shared:
                best, best_shared = i, shared
        return best, best_shared

    def _call_rows(self, bucket: int) -> list[int]:
        """The row counts a prefill call of padded length `bucket` runs at (`prefill_shapes`)."""
        return [rows for rows, b in self.prefill_shapes if b == bucket]

    def prefill_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """How to prefill requests of `lengths` new tokens: lists of their indices, each one
        prefill call. Requests padded to the same length share calls of the row counts
        `prefill_shapes` has for it: the largest that fits, unless the rest fit one call
        padded with at most as many rows as the calls it saves (`_prefill_call` pads a call
        to its row count)."""
        by_bucket: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            by_bucket.setdefault(bucket_length(length, self.context), []).append(i)
        groups = []
        for bucket, members in sorted(by_bucket.items()):
            sizes = self._call_rows(bucket)
            while members:
                # A padding row costs a row's compute; each call saved saves its host round
                # trip and dispatch, and the stall its prefill puts between the first and
                # second tokens of the requests prefilled in the calls before it.
                padded = min((s for s in sizes if s >= len(members)), default=None)
                saved = _greedy_calls(len(members), sizes) - 1
                if padded is not None and padded - len(members) <= saved:
                    groups.append(members)
                    break
                size = max(n for n in sizes if n <= len(members))
                groups.append(members[:size])
                members = members[size:]
        return groups

    def _admit(self) -> None:
        with self._lock:
            free = sum(s.request is None for s in self.slots)
            admitted = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
        placed = []  # (slot index, request, new tokens)
        for request in admitted:
            index, shared = self._choose_slot(request.prompt)
            self.slots[index].request, request.cached = request, shared
            placed.append((index, request, request.prompt[shared:]))
        for group in self.prefill_groups([len(new) for _, _, new in placed]):
            self._prefill([placed[i] for i in group])

    def _mark_done(self, rows: list[int]) -> None:
        """Mark `rows` finished. One mask over every slot: `done.at[rows]` would compile once
        per number of rows, inside a request."""
        mask = jnp.asarray([i in rows for i in range(self.max_batch)])
        self.state = eqx.tree_at(lambda s: s.done, self.state, self.state.done | mask)

    def _prefill_call(self, placed: list[tuple[int, Request, list[int]]]
                      ) -> Int[Array, " rows"]:
        """Prefill `placed` (slot, request, new tokens) into the state; each row's first new
        token (NO_TOKEN where it ended at once), padding rows' after them. The call has the
        fewest rows of `prefill_shapes` for its padded length that hold `placed`; the rows
        beyond it are padding (a one-token request at a slot past the last row)."""
        bucket = bucket_length(max(len(new) for _, _, new in placed), self.context)
        rows = min(r for r in self._call_rows(bucket) if r >= len(placed))
        padding = [(self.max_batch + i, Request([0], 0, lambda *_: None), [0])
                   for i in range(rows - len(placed))]
        placed = placed + padding
        indices = [index for index, _, _ in placed]
        self.state, first = prefill_slots(
            self.model, self.state, jnp.asarray(indices, jnp.int32),
            jnp.asarray([new + [0] * (bucket - len(new)) for _, _, new in placed], jnp.int32),
            jnp.asarray([r.cached for _, r, _ in placed], jnp.int32),
            jnp.asarray([len(new) for _, _, new in placed], jnp.int32),
            jnp.asarray([r.max_tokens for _, r, _ in placed], jnp.int32),
            # Each row's key as a lone request's in `Generator.start`, so a seed draws the same.
            jnp.concatenate([jax.random.split(jax.random.key(r.seed), 1) for _, r, _ in placed]),
            RowSampling.of([r.sampling for _, r, _ in placed]), self.stop_ids)
        return first

    def _prefill(self, placed: list[tuple[int, Request, list[int]]]) -> None:
        """One prefill call over `placed` (slot, request, new tokens), of a `prefill_shapes`
        row count and one padded length."""
        first = self._prefill_call(placed)
        first, done, positions = jax.device_get(
            (first, self.state.done, self.state.positions))
        for row, (index, request, _) in enumerate(placed):
            if first[row] != NO_TOKEN:
                request.generated.append(int(first[row]))
                request.on_tokens([int(first[row])], None)
            if done[index]:
                self._finish(index, self._reason(request, int(positions[index])),
                             int(positions[index]))

    def _reason(self, request: Request, position: int) -> str:
        if len(request.generated) >= request.max_tokens or position >= self.context:
            return FINISH_LENGTH
        return FINISH_STOP

    def _decode(self) -> None:
        last_busy = max(i for i, s in enumerate(self.slots) if s.request is not None)
        rows = next(b for b in self.row_buckets if b > last_busy)
        self.state, emitted = decode_first_rows(self.model, self.state, rows, self.chunk_size,
                                                self.stop_ids)
        emitted, done, positions = jax.device_get(
            (emitted, self.state.done, self.state.positions))
        for i, slot in enumerate(self.slots[:rows]):
            request = slot.request
            if request is None:
                continue
            new = [int(t) for t in emitted[i] if t != NO_TOKEN]
            if new:
                request.generated.extend(new)
                request.on_tokens(new, None)
            if done[i]:
                self._finish(i, self._reason(request, int(positions[i])), int(positions[i]))
