"""Chat templates of Hugging Face tokenizers: the `chat_template` Jinja2 string of
tokenizer_config.json, rendered the way transformers' `apply_chat_template` renders it.

The environment is Jinja2's immutable sandbox with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and the globals
`raise_exception` and `strftime_now`; templates see `messages`, `add_generation_prompt` and the
tokenizer's special tokens (`bos_token`, `eos_token`, ...). A template that raises (wrong role
order, say) gives a `ChatTemplateError` with its message.
"""

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hpllm.errors import UserError

Message = dict[str, str]


class ChatTemplateError(UserError):
    """The template refused the conversation or could not be compiled."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """A compiled chat template; `render(messages, add_generation_prompt)` gives the text."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template does not compile ({error})") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template failed ({error})") from None
