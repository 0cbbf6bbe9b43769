"""Training text: where documents come from, the held-out split, and the tokenizer.

`open_splits(source)` turns the bundled corpus (repo data/), a local .txt/.jsonl/.json/.parquet
file, a folder of them, or a Hugging Face hub dataset name into `Splits`: two re-iterable
`Documents` streams (training and held-out, disjoint), read with `datasets` in streaming mode.
Packing them into batches is train/batches.py's job.

Validation. The bundled corpus and folders with a file named like *validation*/*valid*/*val*/*dev*
have a fixed held-out file; hub datasets use their "validation" split when they have one. Any
other source holds out every HOLDOUT_EVERY-th document (indices 0, 20, 40, ... among non-empty
documents) for validation and never trains on them.

Text files are read one paragraph (block separated by a blank line) per document.
"""

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hpllm.errors import UserError
from hpllm.hf_tokenizer import AnyTokenizer, PretrainedTokenizer
from hpllm.tokenizer import Tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HOLDOUT_EVERY = 20
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
TOKENIZER_TRAIN_CHARS = 8_000_000

# We report malformed JSON and unreadable parquet files ourselves (naming the file); silence the
# builders' own log lines, which would print before our one-line error.
for _builder in ("json", "parquet"):
    logging.getLogger(f"datasets.packaged_modules.{_builder}.{_builder}").setLevel(
        logging.CRITICAL)

# A stream of document texts: a re-iterable (Documents, a list) or a function returning one.
Texts = Callable[[], Iterable[str]] | Iterable[str]


class DataError(UserError):
    """A problem with the user's data or data settings; the message says what to do."""


class Documents:
    """A re-iterable sequence of non-empty document texts: every `iter()` starts over."""

    def __init__(self, open_texts: Callable[[], Iterator[str]], name: str):
        self._open = open_texts
        self.name = name

    def __iter__(self) -> Iterator[str]:
        return (text for text in self._open() if text)

    def __repr__(self) -> str:
        return f"Documents({self.name})"


@dataclasses.dataclass(frozen=True)
class Splits:
    """Documents to train on and the fixed held-out documents to evaluate on (disjoint)."""

    train: Documents
    validation: Documents
    validation_note: str


def iterate(texts: Texts) -> Iterable[str]:
    """The documents of `texts`, from the start."""
    return texts() if callable(texts) else texts


def close_stream(iterator: Iterator) -> None:
    """Finish a stream we stop reading early, so its file is closed now (datasets' readers
    close their files only when their generators are closed)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()

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


def _first_bad_file_line(files: list[Path], encoding: str) -> str | None:
    """What is wrong at the first line or byte that cannot be read, naming the file: a byte
    that is not UTF-8, a JSONL line that is not valid JSON or not a JSON object."""
    for path in files:
        try:
            path.read_bytes().decode(encoding)
        except UnicodeDecodeError as err:
            return (f"{path}: byte 0x{err.object[err.start]:02x} at offset {err.start} is not "
                    f"{encoding} text; pass the file's encoding with --encoding (for example "
                    "--encoding latin-1)")
        except OSError as err:
            return f"cannot read {path}: {err.strerror}"
        if path.suffix.lower() != ".jsonl":
            continue
        with path.open(encoding=encoding) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as err:
                        return (f"malformed JSON at {path}:{number} ({err.msg}); fix or "
                                "remove that line")
                    if not isinstance(value, dict):
                        kind = {str: "string", list: "array", bool: "true/false"}.get(
                            type(value), "number" if value is not None else "null")
                        return (f"{path}:{number} is a JSON {kind}, not an object; each line "
                                'must be an object with a text field, like {"text": "..."}')
    return None


def _rows_to_texts(rows: Iterable[dict], text_column: str, name: str,
                   files: list[Path], encoding: str = "utf-8") -> Iterator[str]:
    try:
        for number, row in enumerate(rows, start=1):
            if text_column not in row:
                raise DataError(
                    f"{name} has no column {text_column!r}; available columns: "
                    f"{', '.join(row)}; choose one with --text-column")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise DataError(f"row {number} of {name}: column {text_column!r} holds "
                                f"{type(text).__name__}, not text; fix that row or choose "
                                "another --text-column")
            yield text or ""
    except DataError:
        raise
    except Exception as err:
        problem = _first_bad_file_line(files, encoding)
        if problem is not None:
            raise DataError(problem) from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read {name}: {reason}") from None


def _local_stream(files: list[Path], text_column: str, name: str, encoding: str) -> Documents:
    builder = BUILDERS[files[0].suffix.lower()]
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder != "parquet":
        options["encoding"] = encoding
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
        return _rows_to_texts(dataset, text_column, name, files, encoding)

    return Documents(open_texts, name)


def _hub_stream(name: str, data_config: str | None, split: str, text_column: str) -> Documents:
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

    return Documents(open_texts, f"{name} [{split}]")


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


def _held_out(stream: Documents, keep_held_out: bool) -> Documents:
    def open_texts() -> Iterator[str]:
        for index, text in enumerate(stream):
            if (index % HOLDOUT_EVERY == 0) == keep_held_out:
                yield text

    part = "held-out" if keep_held_out else "training"
    return Documents(open_texts, f"{stream.name}, {part} documents")


def _resolve(source: str | Path | None, data_config: str | None, split: str,
             text_column: str, encoding: str) -> tuple[Documents, Documents | None, str]:
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
        whole = _local_stream(files[split], text_column, str(path), encoding)
        if "validation" in files and split != "validation":
            names = ", ".join(p.name for p in files["validation"])
            return whole, _local_stream(files["validation"], text_column, str(path),
                                        encoding), names
        return whole, None, str(path)
    local_root = Path(path.parts[0]) if path.parts else path
    if len(path.parts) > 1 and local_root.is_dir():
        raise DataError(f"data path {source} does not exist ({local_root} is a local folder, "
                        "so this is not a hub dataset name); check the path")
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


def _check_has_text(texts: Documents) -> None:
    stream = iter(texts)
    first = next(stream, None)
    stream.close()  # release the open file now rather than at garbage collection
    if first is None:
        raise DataError(f"{texts.name} contains no text; check the path and --text-column")


def open_splits(source: str | Path | None = None, *, data_config: str | None = None,
                split: str = "train", text_column: str = "text", encoding: str = "utf-8"
                ) -> Splits:
    """Training and validation text of `source` (None: the bundled corpus); local text and
    JSON files are decoded with `encoding`. Reads the first document now, so a missing path,
    unknown column or empty dataset fails before training."""
    try:
        "".encode(encoding)
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r}; for example utf-8 or latin-1"
                        ) from None
    whole, validation, origin = _resolve(source, data_config, split, text_column, encoding)
    _check_has_text(whole)
    if validation is not None:
        return Splits(whole, validation, f"held-out files: {origin}")
    train, validation = _held_out(whole, False), _held_out(whole, True)
    _check_has_text(train)  # a one-document source has nothing left to train on
    return Splits(train, validation,
                  f"every {HOLDOUT_EVERY}th document of {origin} (from the first) is held out")



# ----------------------------------------------------------------------------- tokenizer


def get_tokenizer(spec: str | Path, texts: Texts,
                  vocab_size: int) -> AnyTokenizer:
    """`spec` "train": learn a byte-level BPE of `vocab_size` ids on the first
    TOKENIZER_TRAIN_CHARS characters of `texts`; otherwise load the tokenizer.json at `spec`,
    or the tokenizer of folder `spec` (a Hugging Face one when it has tokenizer_config.json)."""
    if str(spec) != "train":
        if Path(spec).is_dir():
            if not (Path(spec) / "tokenizer.json").is_file():
                raise DataError(f"--tokenizer {spec} is a folder without a tokenizer.json; pass "
                                "the path of a tokenizer.json file, or --tokenizer train")
            if (Path(spec) / "tokenizer_config.json").is_file():  # a Hugging Face tokenizer
                try:
                    return PretrainedTokenizer.from_folder(spec)
                except UserError as err:
                    raise DataError(f"--tokenizer {spec}: {err}") from None
            spec = Path(spec) / "tokenizer.json"
        try:
            return Tokenizer.load(spec)
        except (OSError, ValueError, UserError) as err:
            raise DataError(f"{err}; pass a tokenizer.json path or --tokenizer train") from None

    def first_part() -> Iterator[str]:
        budget = TOKENIZER_TRAIN_CHARS
        stream = iter(iterate(texts))
        try:
            for text in stream:
                if budget <= 0:
                    return
                budget -= len(text)
                yield text
        finally:
            close_stream(stream)

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
