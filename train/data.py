"""Training data: documents -> byte-level BPE tokens -> packed, shuffled NumPy batches.

Public API (the training loop codes against this):

    splits = open_splits(source=None, *, data_config=None, split="train", text_column="text")
        source None = the bundled corpus (repo data/: train.jsonl + validation.jsonl); else a
        local .txt/.jsonl/.json/.parquet file, a folder of them, or a hub dataset name.
        splits.train, splits.validation: TextStream (re-iterable: each iter() starts over);
        splits.validation_note says where the held-out text comes from.
    load_texts(source=None, *, data_config=None, split="train", text_column="text") -> TextStream
    get_tokenizer(spec, texts, vocab_size) -> Tokenizer
        spec "train": byte-level BPE learned on the first TOKENIZER_TRAIN_CHARS of `texts`;
        otherwise a path to a tokenizer.json.
    TrainBatches(texts, tokenizer, seq_len, batch_size, seed=0, shuffle_buffer=256, state=None,
                 *, doc_buffer=1024, prefetch=4)
        infinite iterator of Batch; .state() -> JSON-serialisable dict (position after the last
        batch returned); TrainBatches(..., state=saved) continues with exactly the batches an
        uninterrupted run would have produced next. .close() (or `with`) stops the prefetch
        thread; .epoch is the pass over the documents the reader is in.
    eval_batches(texts, tokenizer, seq_len, batch_size, max_batches=None) -> list[Batch]
        the held-out text in order, packed the same way; same batches on every call.
    Batch: inputs, targets, segment_ids (int32 [batch, seq]), loss_mask (float32 [batch, seq]).
    pack_windows(token_stream, seq_len) -> (windows [n, seq_len + 1], leftover tokens)
    DataError: every user mistake (missing path, empty dataset, unknown column, malformed JSONL,
        hub dataset while offline, resume state that does not fit); one line saying what to do.

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

Validation. The bundled corpus and folders with a file named like *validation*/*valid*/*val*/*dev*
have a fixed held-out file; hub datasets use their "validation" split when they have one. Any
other source holds out every HOLDOUT_EVERY-th document (indices 0, 20, 40, ... among non-empty
documents) for validation and never trains on them.

Text files are read one paragraph (block separated by a blank line) per document.
"""

import base64
import binascii
import dataclasses
import json
import logging
import os
import queue
import re
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float32, Int32

from hpllm.errors import UserError
from hpllm.tokenizer import Tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HOLDOUT_EVERY = 20
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
TOKENIZER_TRAIN_CHARS = 8_000_000
STATE_VERSION = 1
# Characters of text tokenized per call to encode_batch: large enough to amortise the call,
# small enough that the not-yet-windowed tokens saved in the state stay small.
ENCODE_CHARS = 200_000

# We report malformed JSON ourselves (with file and line); silence the builder's own log line.
logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)


class DataError(Exception):
    """A problem with the user's data or data settings; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training or eval batch, NumPy on the host."""

    inputs: Int32[np.ndarray, "batch seq"]
    targets: Int32[np.ndarray, "batch seq"]
    segment_ids: Int32[np.ndarray, "batch seq"]
    loss_mask: Float32[np.ndarray, "batch seq"]


class TextStream:
    """A re-iterable sequence of non-empty document texts: every `iter()` starts over."""

    def __init__(self, open_texts: Callable[[], Iterator[str]], name: str):
        self._open = open_texts
        self.name = name

    def __iter__(self) -> Iterator[str]:
        return (text for text in self._open() if text)

    def __repr__(self) -> str:
        return f"TextStream({self.name})"


@dataclasses.dataclass(frozen=True)
class Splits:
    """Documents to train on and the fixed held-out documents to evaluate on (disjoint)."""

    train: TextStream
    validation: TextStream
    validation_note: str


# ----------------------------------------------------------------------------- sources


def _hub_offline() -> bool:
    import datasets
    import huggingface_hub.constants

    truthy = {"1", "ON", "YES", "TRUE"}
    return (datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE
            or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in truthy
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in truthy)


def _looks_like_hub_name(source: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) is not None
            and Path(source).suffix.lower() not in BUILDERS)


def _split_of(path: Path) -> str:
    words = re.split(r"[^a-z]+", path.stem.lower())
    if any(w in VALIDATION_NAMES for w in words):
        return "validation"
    return "test" if "test" in words else "train"


def _local_files(path: Path) -> dict[str, list[Path]]:
    """Files of a local source grouped by split ("train", "validation", "test")."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)}")
        return {"train": [path]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} holds no data files ({', '.join(BUILDERS)}); "
                        "point --data at a folder or file with text")
    kinds = {BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes file formats ({', '.join(sorted(kinds))}); "
                        "keep one format per folder")
    grouped: dict[str, list[Path]] = {}
    for p in files:
        grouped.setdefault(_split_of(p), []).append(p)
    return grouped


def _malformed_json_line(files: list[Path]) -> str | None:
    """`file:line` of the first line that is not valid JSON, if any (only .jsonl files)."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            continue
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as err:
                        return f"{path}:{number} ({err.msg})"
    return None


def _rows_to_texts(rows: Iterable[dict], text_column: str, name: str,
                   files: list[Path]) -> Iterator[str]:
    try:
        for row in rows:
            if text_column not in row:
                raise DataError(
                    f"{name} has no column {text_column!r}; available columns: "
                    f"{', '.join(row)}; choose one with --text-column")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise DataError(f"column {text_column!r} of {name} holds "
                                f"{type(text).__name__}, not text; choose another --text-column")
            yield text or ""
    except DataError:
        raise
    except Exception as err:
        bad_line = _malformed_json_line(files)
        if bad_line is not None:
            raise DataError(f"malformed JSON at {bad_line}; fix or remove that line") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read {name}: {reason}") from None


def _local_stream(files: list[Path], text_column: str, name: str) -> TextStream:
    builder = BUILDERS[files[0].suffix.lower()]
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    dataset = None

    def open_texts() -> Iterator[str]:
        nonlocal dataset
        import datasets

        if dataset is None:  # built once; an IterableDataset restarts on every iter()
            try:
                dataset = datasets.load_dataset(
                    builder, data_files={"train": [str(f) for f in files]}, split="train",
                    streaming=True, **options)
            except StopIteration:  # what `datasets` raises for an empty file
                raise DataError(f"{name} contains no text; check the path and --text-column"
                                ) from None
            except Exception as err:
                raise DataError(f"cannot open {name}: {str(err).splitlines()[0]}") from None
        return _rows_to_texts(dataset, text_column, name, files)

    return TextStream(open_texts, name)


def _hub_stream(name: str, data_config: str | None, split: str, text_column: str) -> TextStream:
    dataset = None

    def open_texts() -> Iterator[str]:
        nonlocal dataset
        import datasets

        if dataset is None:
            try:
                dataset = datasets.load_dataset(name, data_config, split=split, streaming=True)
            except Exception as err:
                raise DataError(f"cannot load hub dataset {name!r} split {split!r}: "
                                f"{str(err).splitlines()[0]}") from None
        return _rows_to_texts(dataset, text_column, f"{name} [{split}]", [])

    return TextStream(open_texts, f"{name} [{split}]")


def _hub_splits(name: str, data_config: str | None) -> list[str]:
    """Split names of a hub dataset, failing fast (one short request) when unreachable."""
    if _hub_offline():
        raise DataError(
            f"{name!r} is not a local path, and loading it from the Hugging Face hub needs the "
            "network but offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); pass a "
            "local file or folder, or unset offline mode")
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise DataError(f"hub dataset {name!r} not found (or private); check the name, or "
                        "pass a local path") from None
    except Exception as err:
        raise DataError(f"cannot reach hub dataset {name!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the name and "
                        "the network, or pass a local path") from None
    try:
        return list(datasets.get_dataset_split_names(name, data_config))
    except Exception as err:
        raise DataError(f"cannot list the splits of {name!r}: {str(err).splitlines()[0]}"
                        ) from None


def _held_out(stream: TextStream, keep_held_out: bool) -> TextStream:
    def open_texts() -> Iterator[str]:
        for index, text in enumerate(stream):
            if (index % HOLDOUT_EVERY == 0) == keep_held_out:
                yield text

    part = "held-out" if keep_held_out else "training"
    return TextStream(open_texts, f"{stream.name}, {part} documents")


def _resolve(source: str | Path | None, data_config: str | None, split: str,
             text_column: str) -> tuple[TextStream, TextStream | None, str]:
    """(the whole `split`, its fixed validation stream or None, where validation comes from)."""
    if source is None or str(source) == "":
        source = DEFAULT_DATA
    path = Path(source).expanduser()
    if path.exists():
        files = _local_files(path)
        if split not in files:
            raise DataError(f"{path} has no {split!r} files (files by split: "
                            f"{ {k: len(v) for k, v in files.items()} }); use --split train or "
                            "add a file without validation/test in its name")
        whole = _local_stream(files[split], text_column, str(path))
        if "validation" in files and split != "validation":
            names = ", ".join(p.name for p in files["validation"])
            return whole, _local_stream(files["validation"], text_column, str(path)), names
        return whole, None, str(path)
    if isinstance(source, Path) or not _looks_like_hub_name(str(source)):
        raise DataError(f"data path {source} does not exist; pass an existing file or folder "
                        "(txt, jsonl, json, parquet) or a hub dataset name")
    name = str(source)
    available = _hub_splits(name, data_config)
    if split not in available:
        raise DataError(f"hub dataset {name!r} has no split {split!r}; it has "
                        f"{', '.join(available)}; choose one with --split")
    whole = _hub_stream(name, data_config, split, text_column)
    held_split = next((s for s in VALIDATION_NAMES if s in available and s != split), None)
    if held_split is not None:
        validation = _hub_stream(name, data_config, held_split, text_column)
        return whole, validation, f"the {held_split!r} split of {name}"
    return whole, None, f"{name} [{split}]"


def _check_has_text(texts: TextStream) -> None:
    stream = iter(texts)
    first = next(stream, None)
    stream.close()  # release the open file now rather than at garbage collection
    if first is None:
        raise DataError(f"{texts.name} contains no text; check the path and --text-column")


def open_splits(source: str | Path | None = None, *, data_config: str | None = None,
                split: str = "train", text_column: str = "text") -> Splits:
    """Training and validation text of `source` (None: the bundled corpus). Reads the first
    document now, so a missing path, unknown column or empty dataset fails before training."""
    whole, validation, origin = _resolve(source, data_config, split, text_column)
    _check_has_text(whole)
    if validation is not None:
        return Splits(whole, validation, f"held-out files: {origin}")
    train, validation = _held_out(whole, False), _held_out(whole, True)
    _check_has_text(train)  # a one-document source has nothing left to train on
    return Splits(train, validation,
                  f"every {HOLDOUT_EVERY}th document of {origin} (from the first) is held out")


def load_texts(source: str | Path | None = None, *, data_config: str | None = None,
               split: str = "train", text_column: str = "text") -> TextStream:
    """All documents of one split of `source` (no hold-out applied), in stored order."""
    whole, _, _ = _resolve(source, data_config, split, text_column)
    _check_has_text(whole)
    return whole


# ----------------------------------------------------------------------------- tokenizer


def _as_iterable(texts: Callable[[], Iterable[str]] | Iterable[str]) -> Iterable[str]:
    return texts() if callable(texts) else texts


def _close(iterator: Iterator) -> None:
    """Finish a stream we stop reading early, so its file is closed now (datasets' readers
    close their files only when their generators are closed)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def get_tokenizer(spec: str | Path, texts: Callable[[], Iterable[str]] | Iterable[str],
                  vocab_size: int) -> Tokenizer:
    """`spec` "train": learn a byte-level BPE of `vocab_size` ids on the first
    TOKENIZER_TRAIN_CHARS characters of `texts`; otherwise load the tokenizer.json at `spec`."""
    if str(spec) != "train":
        try:
            return Tokenizer.load(spec)
        except (OSError, ValueError, UserError) as err:
            raise DataError(f"{err}; pass a tokenizer.json path or --tokenizer train") from None

    def first_part() -> Iterator[str]:
        budget = TOKENIZER_TRAIN_CHARS
        stream = iter(_as_iterable(texts))
        try:
            for text in stream:
                if budget <= 0:
                    return
                budget -= len(text)
                yield text
        finally:
            _close(stream)

    sample = first_part()
    first = next(sample, None)
    if first is None:
        raise DataError("no text to train the tokenizer on; check --data and --text-column")
    try:
        return Tokenizer.train(_prepend(first, sample), vocab_size)
    except ValueError as err:
        raise DataError(f"{err}; raise --vocab-size") from None


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


# ----------------------------------------------------------------------------- packing


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

    def __init__(self, texts: Callable[[], Iterable[str]] | Iterable[str], tokenizer: Tokenizer,
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
        return (text for text in _as_iterable(self.texts) if text)

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
            _close(self.stream)
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

    def __init__(self, texts: Callable[[], Iterable[str]] | Iterable[str], tokenizer: Tokenizer,
                 seq_len: int, batch_size: int, seed: int = 0, shuffle_buffer: int = 256,
                 state: dict[str, Any] | None = None, *, doc_buffer: int = 1024,
                 prefetch: int = 4):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("shuffle_buffer", shuffle_buffer), ("doc_buffer", doc_buffer)):
            if value <= 0:
                raise DataError(f"{name} must be positive, got {value}")
        if not callable(texts) and iter(texts) is texts:
            raise TypeError("texts must be re-iterable (a TextStream, a list, or a function "
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

    @property
    def epoch(self) -> int:
        """Passes over the documents completed at the current position (the reader runs ahead
        of the batches' content by the shuffle buffers)."""
        return self._position["epoch"]

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
        _close(self._pipeline.stream)

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_batches(texts: Callable[[], Iterable[str]] | Iterable[str], tokenizer: Tokenizer,
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
    stream = iter(_as_iterable(texts))
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
        _close(stream)
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
