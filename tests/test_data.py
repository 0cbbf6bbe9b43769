import collections
import gc
import json

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jaxtyping import TypeCheckError

from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer
from train import batches as data
from train.batches import Batch, TrainBatches, eval_batches, pack_windows
from train.sources import DEFAULT_DATA, DataError, get_tokenizer, open_splits

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 31}" for j in range(5 + 3 * i))
        for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(DOCS, vocab_size=300)


def reference_stream(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    """Each document's tokens followed by EOS, encoded one at a time."""
    out = []
    for doc in docs:
        out += tokenizer.encode(doc) + [tokenizer.eos_id]
    return out


def rows(batches: list[Batch]) -> list[tuple[int, ...]]:
    return [tuple(row) for b in batches for row in np.concatenate(
        [b.inputs, b.targets[:, -1:]], axis=1)]


# ----------------------------------------------------------------------------- packing


def test_pack_windows_every_token_is_a_target_once():
    stream = np.arange(1000, dtype=np.int32)
    windows, rest = pack_windows(stream, seq_len=64)
    targets = windows[:, 1:].reshape(-1)
    np.testing.assert_array_equal(targets, stream[1:1 + targets.size])
    # The leftover starts with the last target, so the next window continues seamlessly.
    np.testing.assert_array_equal(rest, stream[targets.size:])
    assert len(rest) < 64 + 1


def test_unshuffled_batches_are_the_document_stream_in_order(tokenizer):
    seq_len, batch_size = 16, 3
    want = reference_stream(tokenizer, DOCS) * 3  # epochs repeat the documents in order
    it = TrainBatches(DOCS, tokenizer, seq_len, batch_size, seed=0, shuffle_buffer=1,
                      doc_buffer=1, prefetch=0)
    batches = [next(it) for _ in range(8)]
    inputs = np.concatenate([b.inputs.reshape(-1) for b in batches])
    targets = np.concatenate([b.targets.reshape(-1) for b in batches])
    # No token dropped or duplicated: the inputs are the stream, the targets are it shifted.
    np.testing.assert_array_equal(inputs, want[:inputs.size])
    np.testing.assert_array_equal(targets, want[1:targets.size + 1])
    for b in batches:
        assert b.inputs.dtype == b.targets.dtype == b.segment_ids.dtype == np.int32
        assert b.loss_mask.dtype == np.float32 and b.loss_mask.shape == (batch_size, seq_len)
        assert (b.loss_mask == 1).all()


def test_shuffled_batches_are_a_permutation_of_the_windows(tokenizer):
    seq_len, batch_size, buffer = 8, 4, 16
    stream = np.array(reference_stream(tokenizer, DOCS), np.int32)
    windows, _ = pack_windows(stream, seq_len)
    it = TrainBatches(DOCS, tokenizer, seq_len, batch_size, seed=3, shuffle_buffer=buffer,
                      doc_buffer=1, prefetch=0)
    n = (len(windows) - buffer) // batch_size  # stay inside the first epoch
    got = rows([next(it) for _ in range(n)])
    reference = collections.Counter(map(tuple, windows[:n * batch_size + buffer - 1]))
    assert not collections.Counter(got) - reference  # each emitted window exists, no duplicates
    assert got != [tuple(w) for w in windows[:len(got)]]  # and the order was shuffled


def test_document_shuffle_is_a_seeded_permutation_per_epoch(tokenizer):
    # Documents long enough that each epoch's stream is distinguishable: collect whole epochs
    # with a big seq_len and compare the order of document starts.
    it = TrainBatches(DOCS, tokenizer, 4, 1, seed=1, shuffle_buffer=1, doc_buffer=100,
                      prefetch=0)
    n_tokens = len(reference_stream(tokenizer, DOCS))
    tokens = np.concatenate([next(it).inputs[0] for _ in range(3 * n_tokens // 4)])
    docs = tokenizer.decode(tokens.tolist()).split("<|endoftext|>")
    epoch1, epoch2 = docs[:len(DOCS)], docs[len(DOCS):2 * len(DOCS)]
    assert sorted(epoch1) == sorted(DOCS) and sorted(epoch2) == sorted(DOCS)
    assert epoch1 != DOCS and epoch1 != epoch2


# ----------------------------------------------------------------------------- segments


def test_segment_ids_start_at_each_eos(tokenizer):
    eos = tokenizer.eos_id
    windows = np.array([[5, 6, eos, 7, 8, eos, eos, 9, 10]], np.int32)
    batch = data._batch_from_windows(windows, eos)
    # Reference by hand: an EOS input opens the next document's segment.
    np.testing.assert_array_equal(batch.segment_ids, [[0, 0, 1, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(batch.targets, [[6, eos, 7, 8, eos, eos, 9, 10]])


def test_segment_ids_block_attention_across_documents(key):
    cfg = preset("tiny")
    model = Transformer(cfg, key=key)
    rng = np.random.default_rng(0)
    eos = 0
    doc_a, doc_b, doc_c = (rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in (7, 9, 5))
    packed = np.concatenate([doc_a, [eos], doc_b, [eos], doc_c, [0]]).astype(np.int32)
    batch = data._batch_from_windows(packed[None, :], eos)
    logits = model(jnp.asarray(batch.inputs), segment_ids=jnp.asarray(batch.segment_ids))

    # Reference: document b (with the EOS that opens it) run on its own, from position 0.
    # RoPE attention depends only on relative positions, so the logits must agree.
    start = len(doc_a)
    alone = np.concatenate([[eos], doc_b]).astype(np.int32)[None, :]
    want = model(jnp.asarray(alone))
    got = logits[:, start:start + alone.shape[1]]
    # float32 forward with logits of size ~0.4; the offset only changes the rounding of the RoPE
    # angles (measured difference ~1e-7). 1e-5 leaves margin for other XLA builds, while any
    # attention to document a moves the logits by ~0.1 (checked below).
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # Without segment ids document b would see document a: the test can tell the difference.
    leaky = model(jnp.asarray(batch.inputs))[:, start:start + alone.shape[1]]
    assert np.abs(leaky - want).max() > 1e-2
    jax.block_until_ready(logits)


# ----------------------------------------------------------------------------- sources


def write_jsonl(path, docs, column="text"):
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def all_documents(path) -> list[str]:
    """Every document of a source of fewer than 21 documents, in stored order: the hold-out
    takes document 0 only."""
    splits = open_splits(path)
    return list(splits.validation) + list(splits.train)


def test_reads_txt_jsonl_json_parquet(tmp_path):
    docs = ["first document,\nwith a comma", "second one: ünïcode", "third\tone"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    pq.write_table(pa.table({"text": docs, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert all_documents(tmp_path / name) == docs, name
    # Text files: one paragraph (block between blank lines) per document.
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")
    assert all_documents(tmp_path / "d.txt") == [d.rstrip("\n") for d in docs[:2]] + [
        "third\tone\n"]


def test_documents_are_reiterable(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    stream = open_splits(tmp_path / "d.jsonl").train
    assert list(stream) == list(stream) == DOCS[1:]


def test_folder_with_validation_file(tmp_path):
    write_jsonl(tmp_path / "train-00.jsonl", DOCS[:4])
    write_jsonl(tmp_path / "train-01.jsonl", DOCS[4:8])
    write_jsonl(tmp_path / "validation.jsonl", DOCS[8:10])
    write_jsonl(tmp_path / "test.jsonl", DOCS[10:])
    (tmp_path / "README.md").write_text("not data")
    splits = open_splits(tmp_path)
    assert list(splits.train) == DOCS[:8]
    assert list(splits.validation) == DOCS[8:10]  # test files are neither trained nor evaluated
    assert "validation.jsonl" in splits.validation_note


def test_source_without_validation_holds_out_every_20th_document(tmp_path):
    docs = [f"doc {i}" for i in range(45)]
    folder = tmp_path / "texts"
    folder.mkdir()
    pq.write_table(pa.table({"body": docs[:30]}), folder / "a.parquet")
    pq.write_table(pa.table({"body": docs[30:]}), folder / "b.parquet")
    splits = open_splits(folder, text_column="body")
    assert list(splits.validation) == ["doc 0", "doc 20", "doc 40"]
    assert list(splits.train) == [d for i, d in enumerate(docs) if i % 20]


def test_default_source_is_the_bundled_corpus():
    splits = open_splits()
    with (DEFAULT_DATA / "train.jsonl").open() as f:
        first = json.loads(f.readline())["text"]
    stream = iter(splits.train)
    assert next(stream) == first
    stream.close()
    assert "validation.jsonl" in splits.validation_note


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bundled_corpus_size_and_disjoint_validation():
    train_rows = read_jsonl(DEFAULT_DATA / "train.jsonl")
    val_rows = read_jsonl(DEFAULT_DATA / "validation.jsonl")
    size = sum(len(r["text"].encode()) for r in train_rows + val_rows)
    assert 2_800_000 < size < 3_600_000  # "about 3 MB" of text
    assert all(r["text"].strip() for r in train_rows + val_rows)
    assert not {r["source"] for r in train_rows} & {r["source"] for r in val_rows}
    assert not {r["text"] for r in train_rows} & {r["text"] for r in val_rows}
    val_sources = {r["source"] for r in val_rows}
    for year in ("1951-Truman", "1969-Johnson", "1987-Reagan", "2005-GWBush"):
        assert f"state_union/{year}.txt" in val_sources  # as documented in data/README.md
    assert max(r["source"] for r in val_rows if "shakespeare" in r["source"]).endswith("-40000")
    # Held-out Shakespeare lines never appear in training documents (independent line check).
    val_lines = {line for r in val_rows if "shakespeare" in r["source"]
                 for line in r["text"].split("\n") if len(line) > 40}
    train_lines = {line for r in train_rows for line in r["text"].split("\n")}
    assert len(val_lines) > 100 and not val_lines & train_lines
    assert "\ufffd" not in "".join(r["text"] for r in train_rows + val_rows)  # decoding clean


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_gives_the_uninterrupted_batches(tokenizer, prefetch):
    settings = dict(seq_len=8, batch_size=3, seed=7, shuffle_buffer=5, doc_buffer=4)

    def make(state=None):
        return TrainBatches(DOCS, tokenizer, settings["seq_len"], settings["batch_size"],
                            settings["seed"], settings["shuffle_buffer"], state,
                            doc_buffer=settings["doc_buffer"], prefetch=prefetch)

    straight = make()
    want = [next(straight) for _ in range(40)]  # several epochs of the 12 documents
    straight.close()
    for cut in (0, 1, 13, 27):
        first = make()
        got = [next(first) for _ in range(cut)]
        saved = json.loads(json.dumps(first.state()))  # through JSON, as in a checkpoint
        first.close()
        resumed = make(saved)
        got += [next(resumed) for _ in range(40 - cut)]
        resumed.close()
        for a, b in zip(got, want, strict=True):
            for field in ("inputs", "targets", "segment_ids", "loss_mask"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_prefetch_thread_stops_when_the_iterator_is_dropped(tokenizer):
    it = TrainBatches(DOCS, tokenizer, 8, 2, prefetch=2)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_resume_with_different_settings_is_refused(tokenizer):
    it = TrainBatches(DOCS, tokenizer, 8, 2, prefetch=0)
    next(it)
    with pytest.raises(DataError, match="seq_len 8 -> 16"):
        TrainBatches(DOCS, tokenizer, 16, 2, state=it.state(), prefetch=0)


def test_corrupt_state_is_a_data_error(tokenizer):
    it = TrainBatches(DOCS, tokenizer, 8, 2, prefetch=0)
    next(it)
    state = it.state()
    for broken in ({k: v for k, v in state.items() if k != "rng"},
                   {**state, "windows": "not base64 zlib"},
                   {**state, "doc_buffer": [state["docs_read"]]}):  # never read
        with pytest.raises(DataError, match="corrupt"):
            TrainBatches(DOCS, tokenizer, 8, 2, state=broken, prefetch=0)


def test_batch_fields_are_type_checked():
    good = np.zeros((2, 4), np.int32)
    Batch(good, good, good, np.ones((2, 4), np.float32))
    with pytest.raises(TypeCheckError):
        Batch(good.astype(np.float32), good, good, np.ones((2, 4), np.float32))
    with pytest.raises(TypeCheckError):
        Batch(good, good[:, :3], good, np.ones((2, 4), np.float32))


# ----------------------------------------------------------------------------- eval


def test_eval_batches_cover_the_text_once_and_repeat(tokenizer):
    seq_len, batch_size = 16, 4
    got = eval_batches(DOCS, tokenizer, seq_len, batch_size)
    assert got[0].inputs.shape == (batch_size, seq_len)
    targets = np.concatenate([b.targets.reshape(-1) for b in got])
    mask = np.concatenate([b.loss_mask.reshape(-1) for b in got]).astype(bool)
    want = reference_stream(tokenizer, DOCS)
    np.testing.assert_array_equal(targets[mask], want[1:])  # every token scored exactly once
    again = eval_batches(DOCS, tokenizer, seq_len, batch_size)
    assert rows(got) == rows(again)
    first_two = eval_batches(DOCS, tokenizer, seq_len, batch_size, max_batches=2)
    assert rows(first_two) == rows(got[:2])


# ----------------------------------------------------------------------------- errors


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        open_splits(tmp_path / "nope.jsonl")
    one_line(info)


def test_empty_dataset(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", ["", "", ""])
    with pytest.raises(DataError, match="no text") as info:
        open_splits(tmp_path / "empty.jsonl")
    one_line(info)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        open_splits(tmp_path / "blank.txt")


def test_empty_training_data_in_the_iterator(tokenizer):
    it = TrainBatches(["", ""], tokenizer, 8, 2, prefetch=2)  # raised from the prefetch thread
    with pytest.raises(DataError, match="no text"):
        next(it)


def test_unknown_text_column_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS, column="content")
    with pytest.raises(DataError, match="no column 'text'.*content, id") as info:
        open_splits(tmp_path / "d.jsonl")
    one_line(info)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3") as info:
        all_documents(path)
    one_line(info)


def test_hub_name_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline") as info:
        open_splits("someone/some-dataset")
    one_line(info)


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_tokenizer(tmp_path / "tokenizer.json", DOCS, 300)
    with pytest.raises(DataError, match="no text"):
        get_tokenizer("train", [], 300)


def test_get_tokenizer_trains_or_loads(tokenizer, tmp_path):
    trained = get_tokenizer("train", DOCS, 300)
    assert trained == tokenizer  # deterministic training on the same text
    tokenizer.save(tmp_path / "tok.json")
    assert get_tokenizer(str(tmp_path / "tok.json"), DOCS, 999) == tokenizer


# ----------------------------------------------------------------------------- clear messages


def test_non_utf8_text_names_file_and_offset_and_reads_with_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("hello there\n\n\xa1 world\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: byte 0xa1 at offset 13 .*--encoding"
                       ) as info:
        open_splits(path)
    one_line(info)
    splits = open_splits(path, encoding="latin-1")
    assert list(splits.validation) + list(splits.train) == ["hello there", "\xa1 world\n"]


def test_jsonl_of_bare_strings_says_what_a_line_must_be(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text('"first"\n"second"\n')
    with pytest.raises(DataError, match=r"bare\.jsonl:1 is a JSON string, not an object"
                       ) as info:
        all_documents(path)
    one_line(info)


def test_a_number_in_the_text_column_names_the_row(tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c"}\n{"text": 5}\n{"text": "d"}\n')
    with pytest.raises(DataError, match=r"row 3 of .*holds int") as info:
        all_documents(path)
    one_line(info)


def test_corrupt_parquet_is_one_error_and_no_log_line(tmp_path, capfd):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + b"garbage" * 3 + b"PAR1")
    with pytest.raises(DataError, match=r"bad\.parquet") as info:
        open_splits(path)
    one_line(info)
    assert capfd.readouterr().err == ""


def test_tokenizer_folder(tokenizer, tmp_path):
    with pytest.raises(DataError, match="is a folder without a tokenizer.json"):
        get_tokenizer(tmp_path, DOCS, 300)
    tokenizer.save(tmp_path / "tokenizer.json")
    assert get_tokenizer(tmp_path, DOCS, 300) == tokenizer  # the file inside it


def test_mistyped_local_path_is_not_called_a_hub_dataset(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data/trian does not exist .*not a hub dataset"
                       ) as info:
        open_splits("data/trian")
    one_line(info)
