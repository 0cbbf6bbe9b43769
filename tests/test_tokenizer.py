import json

import numpy as np
import pytest

from hpllm.errors import UserError
from hpllm.tokenizer import ASSISTANT, EOS, MIN_VOCAB_SIZE, USER, Tokenizer

CORPUS = [
    "It is with a heavy heart that I stand before you, my friends and colleagues.",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "We hold these truths to be self-evident, that all men are created equal.",
] * 20

TRICKY = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\rand a lone CR\n\n\n",
    "Accents: café, naïve, Ærøskøbing; CJK: 日本語; emoji: 🦜🚀; math: ∑ x² ≤ ∞",
    "\x00\x01 control bytes \x7f and a zero-width joiner: 👩\u200d💻",
    f"chat: {USER}hello{ASSISTANT}hi there{EOS}",
    "special-token look-alikes: <|user| > <|endoftext| <||>",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_random_unicode_round_trips(tokenizer):
    # Byte-level BPE has no unknown token: any code point (surrogates excluded, they are not
    # valid in UTF-8) must come back unchanged.
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = rng.integers(1, 0x2FFFF, size=int(rng.integers(1, 40)))
        text = "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_learns_merges_from_the_corpus(tokenizer):
    # Independent check that merges were learned: a frequent word of the corpus is far shorter
    # in tokens than in bytes (a byte-only vocabulary would give one token per byte).
    word = " speak"
    assert len(tokenizer.encode(word)) < len(word.encode()) / 2
    assert tokenizer.vocab_size == 300


def test_special_tokens_are_single_reserved_ids(tokenizer):
    assert (tokenizer.eos_id, tokenizer.user_id, tokenizer.assistant_id) == (0, 1, 2)
    ids = tokenizer.encode(f"{USER}hi{ASSISTANT}yo{EOS}", specials=True)
    assert ids[0] == tokenizer.user_id and ids[-1] == tokenizer.eos_id
    assert ids.count(tokenizer.assistant_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hiyo"
    # Ordinary text never produces a special id.
    assert not {0, 1, 2} & set(tokenizer.encode("endoftext user assistant <|"))


@pytest.mark.parametrize("text", [f"{EOS}{USER}", f"hi{ASSISTANT}", f"a {USER} b {EOS}{EOS}",
                                  f"<|{USER}|>", EOS[:-1] + ASSISTANT])
def test_text_can_never_forge_a_special_token(tokenizer, text):
    """Typed text naming a special token is encoded as its bytes, so a chat user cannot end
    a turn or start one; the bytes still decode to exactly what was typed."""
    for ids in (tokenizer.encode(text), tokenizer.encode_batch([text])[0]):
        assert not {tokenizer.eos_id, tokenizer.user_id, tokenizer.assistant_id} & set(ids)
        assert tokenizer.decode(ids) == text
    assert {0, 1, 2} & set(tokenizer.encode(text, specials=True))


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tokenizer
    for text in TRICKY:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert Tokenizer.from_json(tokenizer.to_json()) == tokenizer
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary left


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    truncated = tmp_path / "tokenizer.json"
    truncated.write_text('{"version": "1.0", "model": {')
    with pytest.raises(UserError, match="not a valid tokenizer.json") as info:
        Tokenizer.load(truncated)
    assert "\n" not in str(info.value)


def test_tokenizer_without_special_tokens_is_rejected(tokenizer, tmp_path):
    data = json.loads(tokenizer.to_json())
    data["added_tokens"] = []
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items()
                              if k not in (EOS, USER, ASSISTANT)}
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_json(json.dumps(data))


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train(CORPUS, vocab_size=MIN_VOCAB_SIZE - 1)
