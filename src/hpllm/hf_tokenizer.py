"""The tokenizer of an imported Hugging Face model: its tokenizer.json (through the `tokenizers`
library, as for models trained here) plus what tokenizer_config.json and generation_config.json
say: BOS/EOS tokens, whether a prompt starts with BOS, the ids that end a reply, the chat
template and the default sampling settings.

User text is never parsed as special tokens: `encode` turns a literal "<|im_start|>" into the
ids of its characters. Only the template's own text (`chat_ids`) yields special-token ids.

Training (`python -m train --init-from HF_DIR`) uses it as it uses this project's own
`Tokenizer`: `encode_batch` for documents, `eos_id` between them, and `files` to save it beside
every checkpoint; `read_tokenizer` loads either kind from a folder.
"""

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from hpllm.chat_template import ChatTemplate, Message
from hpllm.errors import UserError
from hpllm.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings from generation_config.json, with transformers' defaults for what it
    leaves out (do_sample false = greedy; top_k 50 when sampling)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_optional_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{file}: unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object")
    return data


def _template_source(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one serves plain chat
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str):
        return source
    file = folder / "chat_template.jinja"  # where transformers 5 writes it
    return file.read_text(encoding="utf-8") if file.is_file() else None


class PretrainedTokenizer:
    """A Hugging Face tokenizer folder's tokenizer. Build with `from_folder`."""

    def __init__(self, hf_tokenizer: HFTokenizer, *, bos_token: str | None,
                 eos_token: str | None, add_bos: bool, stop_ids: Iterable[int],
                 chat_template: str | None, generation: GenerationDefaults,
                 files: dict[str, str]):
        self._tok = hf_tokenizer
        # A twin that reads special-token names as plain text (as hpllm.tokenizer does).
        self._text_tok = HFTokenizer.from_str(hf_tokenizer.to_str())
        self._text_tok.encode_special_tokens = True
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._id_or_none(bos_token)
        self.eos_id = self._id_or_none(eos_token)
        if self.eos_id is None and not list(stop_ids):
            raise UserError("the tokenizer has no eos_token and generation_config.json no "
                            "eos_token_id; nothing would end a reply")
        self.add_bos = add_bos and self.bos_id is not None
        ids = list(stop_ids) or [self.eos_id]
        self.stop_ids = tuple(dict.fromkeys(ids))
        if self.eos_id is None:
            self.eos_id = self.stop_ids[0]
        specials = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.chat_template = (None if chat_template is None
                              else ChatTemplate(chat_template, specials))
        self.generation = generation
        self.files = files  # the source files, to copy into converted and exported folders
        added = sorted((t.content for t in hf_tokenizer.get_added_tokens_decoder().values()),
                       key=len, reverse=True)  # longest first, as the tokenizer matches them
        self._special_pattern = re.compile("|".join(map(re.escape, added))) if added else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "PretrainedTokenizer":
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{file} is not a valid tokenizer.json ({reason})") from None
        tokenizer_config = _read_optional_json(folder / "tokenizer_config.json")
        generation_config = _read_optional_json(folder / "generation_config.json")
        model_config = _read_optional_json(folder / "config.json")
        bos = _token_text(tokenizer_config.get("bos_token"))
        eos = _token_text(tokenizer_config.get("eos_token"))
        if "add_bos_token" in tokenizer_config:
            add_bos = bool(tokenizer_config["add_bos_token"])
        else:  # fast tokenizers (Llama 3) add BOS in their post-processor instead
            bos_id = hf_tokenizer.token_to_id(bos) if bos else None
            first = hf_tokenizer.encode("a", add_special_tokens=True).ids[:1]
            add_bos = bos_id is not None and first == [bos_id]
        stop_ids = (_ids(generation_config.get("eos_token_id"))
                    or _ids(model_config.get("eos_token_id")))
        do_sample = bool(generation_config.get("do_sample", False))
        generation = GenerationDefaults(
            greedy=not do_sample,
            temperature=float(generation_config.get("temperature", 1.0)),
            top_k=int(generation_config.get("top_k", 50)),
            top_p=float(generation_config.get("top_p", 1.0)))
        files = {name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                 if (folder / name).is_file()}
        return cls(hf_tokenizer, bos_token=bos, eos_token=eos, add_bos=add_bos,
                   stop_ids=stop_ids, chat_template=_template_source(folder, tokenizer_config),
                   generation=generation, files=files)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-token strings in it are not special."""
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: BOS first when the tokenizer adds one, then the plain text."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Training documents: each encoded as `encode_prompt` does (BOS first when the
        tokenizer adds one, as the model saw its documents in pretraining), specials as text."""
        bos = [self.bos_id] if self.add_bos else []
        return [bos + e.ids for e in self._text_tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self._tok.to_str()

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat_template; use generate instead of chat")
        return self.chat_template.render(messages, add_generation_prompt)

    def chat_ids(self, messages: list[Message], add_generation_prompt: bool = True
                 ) -> list[int]:
        """The rendered conversation as ids. Special-token strings count as special tokens
        only in the template's own text; inside the messages they are plain text."""
        text = self.render_chat(messages, add_generation_prompt)
        content_spans = []
        cursor = 0
        for message in messages:
            for candidate in (message["content"], message["content"].strip()):
                at = text.find(candidate, cursor) if candidate else -1
                if at >= 0:
                    content_spans.append((at, at + len(candidate)))
                    cursor = at + len(candidate)
                    break
        ids: list[int] = []
        plain_start = 0
        for match in self._special_pattern.finditer(text) if self._special_pattern else ():
            if any(start < match.end() and match.start() < end for start, end in content_spans):
                continue  # a special-token string the user wrote: stays plain text
            if match.start() > plain_start:
                ids += self.encode(text[plain_start:match.start()])
            ids.append(self._tok.token_to_id(match.group()))
            plain_start = match.end()
        if plain_start < len(text):
            ids += self.encode(text[plain_start:])
        return ids

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"stop_ids={self.stop_ids})")


AnyTokenizer = Tokenizer | PretrainedTokenizer


def read_tokenizer(folder: str | Path) -> AnyTokenizer:
    """The tokenizer saved in `folder`: a Hugging Face one when tokenizer_config.json is there
    (an imported model, or a run or conversion made from one), else this project's
    tokenizer.json. Problems are one-line `UserError`s naming the file."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return PretrainedTokenizer.from_folder(folder)
    return Tokenizer.load(folder / "tokenizer.json")
