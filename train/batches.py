"""Training batches: documents -> byte-level BPE tokens -> packed, shuffled NumPy batches.

Packing. Each document's tokens are followed by EOS ("<|endoftext|>") and concatenated into one
stream, cut into windows of seq_len + 1 tokens that overlap by one token, so every token of the
stream is a target exactly once (`inputs = window[:-1]`, `targets = window[1:]`); nothing is
dropped or padded in training, a document's tail continues in the next window. Segment ids
count the EOS tokens seen so far in the row's inputs: an EOS *input* starts the next document's
segment, so attention never crosses a document boundary and EOS acts as the next document's
beginning-of-sequence token. Consequently the loss mask is 1 everywhere in training: predicting
EOS after a document's last token (learning to stop) and predicting a document's first token
from EOS alone (the unconditional start, the same situation as generating from scratch) are both
useful, and neither sees another document. Eval batches pad the last window and batch with
loss_mask 0.

Shuffling, two levels, both seeded: documents pass through a buffer of `doc_buffer` documents
(the whole bundled corpus fits, so each epoch is a fresh permutation), windows through a buffer
of `shuffle_buffer` windows. Epochs repeat the stream without end.

Resumable position. The state holds the epoch, how many documents of the epoch were read, the
*indices* of the documents waiting in the document buffer (not their text), the RNG state, the
tokens not yet cut into windows, and the windows waiting in the shuffle buffer (compressed).
Restoring re-reads (without tokenizing) the first `docs_read` documents of the epoch to refill the
document buffer, then continues exactly where the saved run stopped.
"""

import base64
import binascii
import dataclasses
import queue
import threading
import weakref
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from jaxtyping import Float32, Int32

from hpllm.hf_tokenizer import AnyTokenizer
from train.sources import DataError, Texts, close_stream, iterate

STATE_VERSION = 1
# Characters of text tokenized per call to encode_batch: large enough to amortise the call,
# small enough that the not-yet-windowed tokens saved in the state stay small.
ENCODE_CHARS = 200_000


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training or eval batch, NumPy on the host."""

    inputs: Int32[np.ndarray, "batch seq"]
    targets: Int32[np.ndarray, "batch seq"]
    segment_ids: Int32[np.ndarray, "batch seq"]
    loss_mask: Float32[np.ndarray, "batch seq"]


def _batch_from_windows(windows: Int32[np.ndarray, "batch window"], eos_id: int,
                        loss_mask: Float32[np.ndarray, "batch seq"] | None = None) -> Batch:
    """Shift by one; an EOS input starts a new segment (see the module docstring)."""
    inputs = np.ascontiguousarray(windows[:, :-1])
    targets = np.ascontiguousarray(windows[:, 1:])
    segment_ids = np.cumsum(inputs == eos_id, axis=1, dtype=np.int32)
    if loss_mask is None:
        loss_mask = np.ones(inputs.shape, np.float32)
    return Batch(inputs, targets, segment_ids, loss_mask)


def pack_windows(token_stream: Int32[np.ndarray, " n"], seq_len: int
                 ) -> tuple[Int32[np.ndarray, "windows window"], Int32[np.ndarray, " rest"]]:
    """Cut `token_stream` into windows of seq_len + 1 tokens starting every seq_len tokens
    (neighbours share one token: the last target of one is the first input of the next).
    Returns the windows and the tokens left over (fewer than seq_len + 1) to continue with."""
    n_windows = max(0, (len(token_stream) - 1) // seq_len)
    starts = np.arange(n_windows)[:, None] * seq_len
    windows = token_stream[starts + np.arange(seq_len + 1)[None, :]]
    return windows.astype(np.int32), token_stream[n_windows * seq_len:]


def _encode_ints(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array, "<i4").tobytes())).decode()


def _decode_ints(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), "<i4").astype(np.int32)


class _Pipeline:
    """The synchronous state machine behind TrainBatches: documents -> doc shuffle buffer ->
    tokens -> windows -> window shuffle buffer -> batches. All fields are its position."""

    def __init__(self, texts: Texts, tokenizer: AnyTokenizer,
                 settings: dict[str, int], state: dict[str, Any] | None):
        self.texts, self.tokenizer, self.settings = texts, tokenizer, settings
        self.seq_len, self.batch_size = settings["seq_len"], settings["batch_size"]
        self.doc_capacity, self.window_capacity = settings["doc_buffer"], settings["shuffle_buffer"]
        if state is None:
            self.epoch, self.docs_read, self.batches = 0, 0, 0
            self.rng = np.random.Generator(np.random.PCG64(settings["seed"]))
            self.doc_buffer: list[tuple[int, str]] = []
            self.tokens = np.zeros((0,), np.int32)
            self.windows: list[np.ndarray] = []
            self.stream = self._open_epoch()
        else:
            try:
                self._restore(state)
            except (KeyError, TypeError, ValueError, AttributeError, zlib.error, binascii.Error
                    ) as err:
                reason = f"{type(err).__name__}: {err}".splitlines()[0]
                raise DataError(f"the saved data position is incomplete or corrupt ({reason}); "
                                "resume from another checkpoint") from None
        self.exhausted = False

    def _open_epoch(self) -> Iterator[str]:
        return (text for text in iterate(self.texts) if text)

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r} is not "
                            f"{STATE_VERSION}; start a new run instead of resuming")
        changed = {k: (state["settings"].get(k), v) for k, v in self.settings.items()
                   if state["settings"].get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise DataError(f"the data settings changed since the checkpoint ({detail}); resume "
                            "with the original settings or start a new run")
        self.epoch, self.docs_read = state["epoch"], state["docs_read"]
        self.batches = state["batches"]
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.tokens = _decode_ints(state["tokens"])
        flat = _decode_ints(state["windows"])
        self.windows = list(flat.reshape(-1, self.seq_len + 1)) if flat.size else []
        # Re-read (without tokenizing) this epoch's documents up to where the run was.
        slots = {index: slot for slot, index in enumerate(state["doc_buffer"])}
        if (len(slots) != len(state["doc_buffer"]) or len(slots) > self.doc_capacity
                or not all(0 <= index < self.docs_read for index in slots)
                or len(self.windows) > self.window_capacity):
            raise ValueError("buffer contents do not fit the position")
        texts: list[str | None] = [None] * len(slots)
        self.stream = self._open_epoch()
        for index in range(self.docs_read):
            text = next(self.stream, None)
            if text is None:
                raise DataError("the dataset is shorter than when the checkpoint was saved; "
                                "resume with the same data or start a new run")
            if index in slots:
                texts[slots[index]] = text
        self.doc_buffer = [(index, text) for index, text in zip(state["doc_buffer"], texts,
                                                                  strict=True)]

    def snapshot(self) -> dict[str, Any]:
        """The position, cheap to take: arrays are never mutated in place, only replaced."""
        return {"epoch": self.epoch, "docs_read": self.docs_read, "batches": self.batches,
                "doc_buffer": [index for index, _ in self.doc_buffer],
                "rng": self.rng.bit_generator.state, "tokens": self.tokens,
                "windows": list(self.windows)}

    def _next_doc(self) -> str:
        while True:
            if not self.exhausted and len(self.doc_buffer) < self.doc_capacity:
                text = next(self.stream, None)
                if text is None:
                    self.exhausted = True
                else:
                    self.doc_buffer.append((self.docs_read, text))
                    self.docs_read += 1
                continue
            if self.doc_buffer:
                j = int(self.rng.integers(len(self.doc_buffer)))
                self.doc_buffer[j], self.doc_buffer[-1] = self.doc_buffer[-1], self.doc_buffer[j]
                return self.doc_buffer.pop()[1]
            if self.docs_read == 0:
                raise DataError("the training data contains no text; check --data and "
                                "--text-column")
            self.epoch, self.docs_read, self.exhausted = self.epoch + 1, 0, False
            close_stream(self.stream)
            self.stream = self._open_epoch()

    def _read_tokens(self) -> None:
        docs, chars = [], 0
        while chars < ENCODE_CHARS:
            docs.append(self._next_doc())
            chars += len(docs[-1])
            if self.exhausted and not self.doc_buffer:
                break  # end of the epoch: do not reach into the next one just to fill a chunk
        eos = np.array([self.tokenizer.eos_id], np.int32)
        pieces = [self.tokens]
        for ids in self.tokenizer.encode_batch(docs):
            pieces += [np.asarray(ids, np.int32), eos]
        self.tokens = np.concatenate(pieces)

    def _next_window(self) -> np.ndarray:
        while len(self.tokens) < self.seq_len + 1:
            self._read_tokens()
        window = self.tokens[: self.seq_len + 1]
        self.tokens = self.tokens[self.seq_len:]
        return window

    def next_batch(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            while len(self.windows) < self.window_capacity:
                self.windows.append(self._next_window())
            j = int(self.rng.integers(len(self.windows)))
            self.windows[j], self.windows[-1] = self.windows[-1], self.windows[j]
            rows.append(self.windows.pop())
        self.batches += 1
        return _batch_from_windows(np.stack(rows), self.tokenizer.eos_id)


def _produce(pipeline: _Pipeline, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: put (batch, position after it) pairs, or the exception that stopped it."""
    try:
        while not stop.is_set():
            item = (pipeline.next_batch(), pipeline.snapshot())
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as err:  # handed to the consumer, raised in its thread
        out.put(err)


class TrainBatches:
    """Endless iterator of shuffled, packed training batches with an exact resumable position.

    A background thread prepares up to `prefetch` batches ahead (0: none, everything runs in the
    caller's thread). `state()` describes the position after the last batch *returned*, not the
    prefetched ones, so saving it with a checkpoint and passing it back as `state=` replays
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, texts: Texts, tokenizer: AnyTokenizer,
                 seq_len: int, batch_size: int, seed: int = 0, shuffle_buffer: int = 256,
                 state: dict[str, Any] | None = None, *, doc_buffer: int = 1024,
                 prefetch: int = 4):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("shuffle_buffer", shuffle_buffer), ("doc_buffer", doc_buffer)):
            if value <= 0:
                raise DataError(f"{name} must be positive, got {value}")
        if not callable(texts) and iter(texts) is texts:
            raise TypeError("texts must be re-iterable (Documents, a list, or a function "
                            "returning an iterable), not a one-shot iterator")
        settings = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                    "shuffle_buffer": shuffle_buffer, "doc_buffer": doc_buffer,
                    "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
        self._pipeline = _Pipeline(texts, tokenizer, settings, state)
        self._settings = settings
        self._position = self._pipeline.snapshot()
        self._prefetch = prefetch
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        if self._prefetch <= 0:
            batch = self._pipeline.next_batch()
            self._position = self._pipeline.snapshot()
            return batch
        if self._thread is None:
            # The thread holds the pipeline, not `self`: an iterator dropped without close()
            # is still garbage-collected, and the finalizer then stops the thread.
            self._thread = threading.Thread(
                target=_produce, args=(self._pipeline, self._queue, self._stop),
                name="TrainBatches", daemon=True)
            self._thread.start()
            weakref.finalize(self, self._stop.set)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._position = item
        return batch

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch returned by `next`."""
        position = self._position
        windows = (np.stack(position["windows"]) if position["windows"]
                   else np.zeros((0,), np.int32))
        return {"version": STATE_VERSION, "settings": dict(self._settings),
                "epoch": position["epoch"], "docs_read": position["docs_read"],
                "batches": position["batches"], "doc_buffer": list(position["doc_buffer"]),
                "rng": position["rng"], "tokens": _encode_ints(position["tokens"]),
                "windows": _encode_ints(windows)}

    def close(self) -> None:
        """Stop the prefetch thread (the iterator cannot be used afterwards)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)  # unblock a producer waiting on a full queue
                except queue.Empty:
                    pass
            self._thread = None
        close_stream(self._pipeline.stream)

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_batches(texts: Texts, tokenizer: AnyTokenizer,
                 seq_len: int, batch_size: int, max_batches: int | None = None) -> list[Batch]:
    """The held-out text in stored order, packed like training (no shuffling), as at most
    `max_batches` batches. The last window and batch are padded with EOS and loss_mask 0, so
    average the loss as sum(loss * mask) / sum(mask) over all batches."""
    eos = tokenizer.eos_id
    limit = None if max_batches is None else max_batches * batch_size
    windows: list[np.ndarray] = []
    tokens = np.zeros((0,), np.int32)
    docs: list[str] = []

    def flush() -> None:
        nonlocal tokens
        pieces = [tokens]
        for ids in tokenizer.encode_batch(docs):
            pieces += [np.asarray(ids, np.int32), np.array([eos], np.int32)]
        tokens = np.concatenate(pieces)
        new, tokens = pack_windows(tokens, seq_len)
        windows.extend(new)
        docs.clear()

    chars = 0
    stream = iter(iterate(texts))
    try:
        for text in stream:
            docs.append(text)
            chars += len(text)
            if chars >= ENCODE_CHARS:
                flush()
                chars = 0
                if limit is not None and len(windows) >= limit:
                    break
        else:
            flush()
    finally:
        close_stream(stream)
    masks = [np.ones((seq_len,), np.float32) for _ in windows]
    if (limit is None or len(windows) < limit) and len(tokens) > 1:
        real = len(tokens) - 1  # targets that are real tokens
        windows.append(np.concatenate([tokens, np.full(seq_len + 1 - len(tokens), eos, np.int32)]))
        masks.append((np.arange(seq_len) < real).astype(np.float32))
    if not windows:
        raise DataError("the validation text is empty; check --data and --text-column")
    if limit is not None:
        windows, masks = windows[:limit], masks[:limit]
    while len(windows) % batch_size:
        windows.append(np.full(seq_len + 1, eos, np.int32))
        masks.append(np.zeros((seq_len,), np.float32))
    batches = []
    for start in range(0, len(windows), batch_size):
        rows = np.stack(windows[start:start + batch_size])
        mask = np.stack(masks[start:start + batch_size])
        batches.append(_batch_from_windows(rows, eos, mask))
    return batches
