"""Property-based robustness of `python -m infer` (hypothesis; deterministic and bounded):

- random damage to every file of a checkpoint (truncation, changed bytes, wrong JSON types,
  extra or missing keys, a missing file) never crashes or hangs the loader: the checkpoint
  either loads bit-identically (the damage missed everything that matters) or is refused
  with one line;
- random values for every numeric flag give a one-line error, or settings the run can use.

The loader is exercised three ways: with the manifest in place (every change to any file must
be caught), with the manifest re-recorded after the damage (as if a writer had written bad
content and checksummed it: the loader's own checks must catch it) and with no manifest at all
(a checkpoint from before manifests). Only the parse/validation layer and the loader run per
example: nothing compiles.
"""

import contextlib
import hashlib
import json
import shutil
import signal
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpllm.checkpoint import MANIFEST_FILE, write_checkpoint
from hpllm.config import preset
from hpllm.errors import UserError
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer
from infer.cli import MAX_BATCH, MAX_SEED, _sampling, fit_new_tokens, parse
from infer.convert import convert
from infer.loading import GROUP_SIZES, load, require_tokenizer
from infer.sampling import sample

TINY = preset("tiny")
PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
LOAD_TIMEOUT_S = 60  # a load takes ~0.1 s; a minute means it hangs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A training checkpoint (float weights, optimizer state) and its int8 conversion."""
    root = tmp_path_factory.mktemp("robust")
    tokenizer = Tokenizer.train(["the cat sat on the mat", "hello world"] * 5, vocab_size=300)
    training = write_checkpoint(
        root / "run" / "checkpoints" / "step_000010",
        {"model": TINY.to_dict(), "quant": {"mode": "none"}, "step": 10,
         "train": {"preset": "tiny", "lr": 0.001}},
        {"model": Transformer(TINY, key=jax.random.key(0)),
         "opt_state": {"mu": jnp.ones((3, 4)), "count": jnp.zeros((), jnp.int32)}},
        {"tokenizer.json": tokenizer.to_json(), "data_state.json": json.dumps({"position": 7})})
    converted = convert(training, "int8", root / "int8").out
    return {"training": training, "converted": converted}


@pytest.fixture(scope="module")
def originals(checkpoints) -> dict:
    return {name: load(path) for name, path in checkpoints.items()}


# --------------------------------------------------------------------------- damage

JSON_KINDS = {
    "null": st.none(),
    "bool": st.booleans(),
    "number": st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True),
    "string": st.text(max_size=8),
    "array": st.lists(st.integers(-3, 300), max_size=3),
    "object": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
}


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _paths(node, prefix=()):
    """Every path into a JSON document (keys and list indices), containers included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:4]):
            yield from _paths(value, (*prefix, index))


def _edit_json(data: st.DataObject, text: bytes) -> bytes:
    """A wrong JSON type somewhere, a key removed, or an extra key added."""
    document = json.loads(text)
    paths = sorted((p for p in _paths(document) if p), key=repr)
    path = data.draw(st.sampled_from(paths), label="path")
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    operations = ["wrong type"]
    if isinstance(parent, dict):
        operations.append("remove key")
    if isinstance(parent[path[-1]], dict):
        operations.append("add key")
    operation = data.draw(st.sampled_from(operations), label="operation")
    if operation == "wrong type":
        kinds = [k for k in JSON_KINDS if k != _kind(parent[path[-1]])]
        parent[path[-1]] = data.draw(st.sampled_from(kinds).flatmap(JSON_KINDS.get),
                                     label="value")
    elif operation == "remove key":
        del parent[path[-1]]
    else:
        parent[path[-1]][data.draw(st.text(min_size=1, max_size=6), label="key")] = \
            data.draw(st.one_of(*JSON_KINDS.values()), label="value")
    return json.dumps(document).encode()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)


def _damage(data: st.DataObject, folder: Path, name: str, resealed: bool) -> None:
    file = folder / name
    content = file.read_bytes()
    kinds = ["truncate", "delete"]
    if not resealed:  # any byte may change: the manifest must notice
        kinds.append("change bytes")
    elif name.endswith(".safetensors"):  # the header: offsets, dtypes, shapes, names
        kinds.append("change header bytes")
    if name.endswith(".json") and (name == "config.json" or not resealed):
        kinds.append("edit JSON")
    kind = data.draw(st.sampled_from(kinds), label="damage")
    if kind == "delete":
        file.unlink()
        return
    if kind == "truncate":
        content = content[:data.draw(st.integers(0, len(content) - 1), label="keep")]
    elif kind == "edit JSON":
        content = _edit_json(data, content)
    else:
        end = len(content) if kind == "change bytes" else _header_end(content)
        changed = bytearray(content)
        for at in data.draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=8,
                                     unique=True), label="offsets"):
            changed[at] ^= data.draw(st.integers(1, 255), label="xor")
        content = bytes(changed)
    file.write_bytes(content)


def _reseal(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name in list(manifest["files"]):
        if (folder / name).exists():
            data = (folder / name).read_bytes()
            manifest["files"][name] = {"bytes": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _unseal(folder: Path) -> None:
    (folder / MANIFEST_FILE).unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["manifest"]
    (folder / "config.json").write_text(json.dumps(config))


def _same(a, b) -> bool:
    """Bit-identical models (static config included), tokenizers and weight formats."""
    if (a.scheme, a.tokenizer) != (b.scheme, b.tokenizer):
        return False
    if jax.tree.structure(a.model) != jax.tree.structure(b.model):
        return False
    leaves = zip(jax.tree.leaves(eqx.filter(a.model, eqx.is_array)),
                 jax.tree.leaves(eqx.filter(b.model, eqx.is_array)), strict=True)
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8),
                                                     np.asarray(y).view(np.uint8))
               for x, y in leaves)


@contextlib.contextmanager
def _no_hang(seconds: int):
    def alarm(*_):
        raise TimeoutError(f"the loader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@PROPERTY
@given(data=st.data())
def test_damaged_checkpoints_load_identically_or_give_one_line(checkpoints, originals, data):
    which = data.draw(st.sampled_from(sorted(checkpoints)), label="checkpoint")
    manifest = data.draw(st.sampled_from(["in place", "re-recorded", "none"]), label="manifest")
    original = originals[which]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(checkpoints[which], Path(tmp) / "ckpt"))
        if manifest == "none":
            _unseal(folder)
        names = sorted(p.name for p in folder.iterdir())
        if manifest == "re-recorded":
            names.remove(MANIFEST_FILE)
        name = data.draw(st.sampled_from(names), label="file")
        _damage(data, folder, name, resealed=manifest != "in place")
        if manifest == "re-recorded":
            _reseal(folder)
        with _no_hang(LOAD_TIMEOUT_S):
            try:  # what generate and chat do first
                loaded = load(folder)
                require_tokenizer(loaded)
            except UserError as error:
                assert str(error) and "\n" not in str(error), repr(str(error))
                return
    if manifest == "in place":  # nothing that changes a byte may pass the manifest...
        assert name == MANIFEST_FILE, f"{name} changed and loaded"
    assert _same(loaded, original), "loaded something else without an error"


# --------------------------------------------------------------------------- flags

NUMBER_TEXT = (st.integers(-2**80, 2**80).map(str)
               | st.floats(allow_nan=True, allow_infinity=True).map(repr)
               | st.sampled_from(["", " ", "1e3", "0x10", "1_000", " 7 ", "٣", "1,2", "+5",
                                  "-0", "0.5", "nan", "-inf", "4294967295", "4294967296"])
               | st.text(max_size=6))
FLAGS = {
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
    "chat": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
    "convert": ["--group-size"],
    "bench": ["--group-size", "--batch-sizes", "--prompt-len", "--new-tokens", "--repeats"],
}
BASE = {
    "generate": ["generate", "CKPT", "--prompt", "hi"],
    "chat": ["chat", "CKPT"],
    "convert": ["convert", "CKPT", "--to", "int4", "--out", "OUT"],
    "bench": ["bench", "--preset", "tiny"],
}


def _usable(args, command: str) -> None:
    """What the run does with the settings it accepted works: ranges, the PRNG key, the
    int32 token budget and one sampling step on random logits."""
    if command in ("generate", "chat"):
        assert 0 <= args.seed <= MAX_SEED
        key = jax.random.key(args.seed)
        budget = fit_new_tokens(args.max_new_tokens, 1, TINY.max_seq_len)
        assert 1 <= budget <= TINY.max_seq_len
        jnp.full((2,), budget, jnp.int32)
        logits = jax.random.normal(jax.random.key(1), (2, 40), jnp.float32)
        tokens = np.asarray(sample(logits, key, _sampling(args)))
        assert ((tokens >= 0) & (tokens < 40)).all()
    if command in ("convert", "bench"):  # convert's None: the trained group size
        assert args.group_size in GROUP_SIZES or (command == "convert" and args.group_size
                                                  is None)
    if command == "bench":
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        assert all(1 <= b <= MAX_BATCH for b in sizes)
        assert min(args.prompt_len, args.new_tokens, args.repeats) >= 1


@PROPERTY
@given(command=st.sampled_from(sorted(FLAGS)), data=st.data())
def test_numeric_flags_give_one_line_errors_or_usable_settings(command, data):
    flag = data.draw(st.sampled_from(FLAGS[command]), label="flag")
    value = data.draw(NUMBER_TEXT if flag != "--batch-sizes" else
                      st.lists(NUMBER_TEXT, min_size=1, max_size=3).map(",".join),
                      label="value")
    try:
        args = parse([*BASE[command], f"{flag}={value}"])
    except UserError as error:
        assert str(error) and "\n" not in str(error), repr(str(error))
        return
    _usable(args, command)
