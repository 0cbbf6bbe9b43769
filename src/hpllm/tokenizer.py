"""Byte-level BPE tokenizer: a thin wrapper around Hugging Face `tokenizers`.

Byte-level means the base alphabet is the 256 byte values, so every string encodes (no unknown
token) and `decode(encode(text)) == text` exactly, whitespace and non-ASCII included. Three
special tokens come first in the vocabulary:

    "<|endoftext|>"  (id 0)  end of a document; also the separator between packed documents
    "<|user|>"       (id 1)  chat template: a user turn follows
    "<|assistant|>"  (id 2)  chat template: an assistant turn follows

Text is text: `encode` turns a special token's name written in the text ("<|user|>" typed by
a user, or found in a document) into its ordinary bytes, never into the special id, so no
input can forge a turn boundary of the chat template or a document boundary. Special ids come
only from code that places them (`eos_id`, `user_id`, `assistant_id`), or from
`encode(text, specials=True)` for a trusted template written as text.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hpllm.errors import UserError

EOS = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (EOS, USER, ASSISTANT)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """Byte-level BPE with the special tokens above. Build with `train` or `load`."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self._tok = hf_tokenizer
        # A twin that reads special-token names as plain text (the flag is per tokenizer).
        self._text_tok = HFTokenizer.from_str(hf_tokenizer.to_str())
        self._text_tok.encode_special_tokens = True

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from `texts` until the vocabulary (bytes + merges + specials) has
        `vocab_size` entries, or fewer if the text runs out of pairs to merge."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        # No normalizer and no prefix space: the byte mapping is then exactly invertible.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 bytes, even those absent from the training text, so nothing is unknown.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a `tokenizer.json`; a missing or unreadable file raises a one-line `UserError`
        naming it."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is not a valid tokenizer.json ({reason})") from None
        try:
            return cls(hf_tokenizer)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically (temporary file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)

    def to_json(self) -> str:
        return self._tok.to_str()

    @property
    def files(self) -> dict[str, str]:
        """What to save beside a checkpoint: name -> text (as `PretrainedTokenizer.files`)."""
        return {"tokenizer.json": self.to_json()}

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def encode(self, text: str, *, specials: bool = False) -> list[int]:
        """Ids of `text`. A special token's name in the text is encoded as plain text unless
        `specials` (only for trusted text, such as a template written by the program)."""
        tokenizer = self._tok if specials else self._text_tok
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (parallel inside `tokenizers`), specials as text."""
        return [e.ids for e in self._text_tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens are written out unless `skip_special_tokens`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return token_id

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

    @property
    def user_id(self) -> int:
        return self.token_to_id(USER)

    @property
    def assistant_id(self) -> int:
        return self.token_to_id(ASSISTANT)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (model vocab_size must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return json.loads(self.to_json()) == json.loads(other.to_json())

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"
