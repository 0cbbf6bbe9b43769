"""`python -m infer chat CKPT`: a multi-turn chat loop with streamed replies.

Template of models trained here (token ids, so user text can never forge a turn boundary by
accident):

    <|user|> text <|assistant|> reply <|endoftext|> <|user|> text <|assistant|> ...

A reply ends at <|endoftext|>, at <|user|> (the model starting the next turn itself) or at the
token limit. Imported (Hugging Face) models use their own chat template instead, rendered by
`PretrainedTokenizer.chat_ids` (special tokens only from the template, never from the user's
text), with the optional `--system` message first, and stop at any of their stop ids.

The chat runs on `infer.engine` with one slot, whose cache keeps the conversation so far. Each
turn submits the whole rendered conversation; the engine reuses the cached tokens it shares as
a prefix and prefills only the rest, so the time to the first token does not grow with the
conversation. (A template that renders earlier turns differently once a new one follows, for
example by trimming a reply, costs a prefill from the first differing token.) When the context
is full, the oldest turns are dropped (down to half of the context) and the cache is rebuilt once
from what is left; the turns after that append to it again.

Input is one user turn per line, from a terminal or a pipe. Commands: /reset /help /stats /exit.
Ctrl-C stops the current reply (the loop goes on); end of input (Ctrl-D) exits cleanly.
"""

import dataclasses
import time
from collections.abc import Sequence
from io import BufferedIOBase as BinaryIO
from io import TextIOBase as TextIO

from hpllm.errors import UserError
from hpllm.hf_tokenizer import PretrainedTokenizer
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer
from infer.detokenizer import Detokenizer
from infer.engine import Engine, Request
from infer.sampling import SamplingConfig

HELP = """commands:
  /reset   forget the conversation
  /stats   speed of the last reply and of the whole session
  /help    this text
  /exit    leave (Ctrl-D does too); Ctrl-C stops a reply"""

MAX_LINE_BYTES = 1 << 16


def render_messages(tokenizer: Tokenizer | PretrainedTokenizer,
                    messages: Sequence[tuple[str, str]]) -> list[int]:
    """The template's token ids for (role, text) messages, ready for the assistant's reply: an
    imported model's own chat template, or the built-in one, where a system message is a user
    turn (that template has no system role)."""
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.chat_ids([{"role": role, "content": text} for role, text in messages])
    ids: list[int] = []
    for role, text in messages:
        if role == "assistant":
            ids += [tokenizer.assistant_id, *tokenizer.encode(text), tokenizer.eos_id]
        else:
            ids += [tokenizer.user_id, *tokenizer.encode(text)]
    return ids + [tokenizer.assistant_id]


@dataclasses.dataclass
class Turn:
    user: list[int]
    reply: list[int]
    text: str = ""  # the user's text, for chat templates that render text


@dataclasses.dataclass
class Stats:
    tokens: int = 0
    seconds: float = 0.0

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Chat:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | PretrainedTokenizer, *,
                 sampling: SamplingConfig, max_new_tokens: int = 256, seed: int = 0,
                 kv_cache_dtype: str = "float32", reuse_cache: bool = True,
                 system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        if isinstance(tokenizer, PretrainedTokenizer):
            tokenizer.render_chat([{"role": "user", "content": "hi"}])  # fail early: no template
            stop_ids = list(tokenizer.stop_ids)
        else:
            if system is not None:
                raise UserError("--system: models trained here have no system turn")
            stop_ids = [tokenizer.eos_id, tokenizer.user_id]
        self.sampling = sampling
        self.context = model.cfg.max_seq_len
        # A reply may take at most a quarter of the context (`--max-new-tokens` is capped
        # there), so that the conversation keeps three quarters; the prompt is cut to leave
        # room for the whole reply.
        self.max_new_tokens = max(1, min(max_new_tokens, self.context // 4))
        self.seed = seed
        self.engine = Engine(model, max_batch=1, max_queue=0, kv_cache_dtype=kv_cache_dtype,
                             stop_ids=stop_ids)
        # False prefills the whole conversation at every turn (the reference in the tests).
        self.reuse_cache = reuse_cache
        self.history: list[Turn] = []
        self.last_cached = 0
        self.last = Stats()
        self.total = Stats()

    def _turn_ids(self, turn: Turn, closed: bool) -> list[int]:
        ids = [self.tokenizer.user_id, *turn.user, self.tokenizer.assistant_id, *turn.reply]
        return ids + [self.tokenizer.eos_id] if closed else ids

    def _template_ids(self, turns: list[Turn], text: str) -> list[int]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in turns:
            reply = self.tokenizer.decode(turn.reply, skip_special_tokens=True)
            messages += [{"role": "user", "content": turn.text},
                         {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": text})
        return self.tokenizer.chat_ids(messages)

    def prompt_ids(self, user: list[int], text: str = "") -> tuple[list[int], int]:
        """The conversation + the new user turn, and how many old turns were dropped to leave
        room for a reply.

        When the conversation no longer fits, the oldest turns are dropped until it fills at
        most half of the room: the cache is rebuilt once, and the next turns append to it
        again. (Dropping just enough would rebuild it at every turn from then on; llama.cpp's
        context shift also discards half.)"""
        budget = self.context - self.max_new_tokens
        if isinstance(self.tokenizer, PretrainedTokenizer):
            dropped = 0
            limit = budget
            while (len(ids := self._template_ids(self.history[dropped:], text)) > limit
                   and dropped < len(self.history)):
                dropped += 1
                limit = budget // 2
            return ids, dropped
        new = self._turn_ids(Turn(user, []), closed=False)
        turns = [self._turn_ids(t, closed=True) for t in self.history]
        dropped = 0
        limit = budget
        while turns and sum(map(len, turns)) + len(new) > limit:
            turns.pop(0)
            dropped += 1
            limit = budget // 2
        return [i for t in turns for i in t] + new, dropped

    def reply(self, text: str, out: TextIO, err: TextIO) -> None:
        user = self.tokenizer.encode(text)
        if len(user) + 2 > self.context - self.max_new_tokens:
            print(f"[that message is {len(user)} tokens; with room for a reply this model "
                  f"takes at most {self.context - self.max_new_tokens - 2}. Shorten it.]",
                  file=err, flush=True)
            return
        prompt, dropped = self.prompt_ids(user, text)
        if len(prompt) > self.context - self.max_new_tokens:  # template + system + message
            print(f"[that message with its template is {len(prompt)} tokens; with room for a "
                  f"reply this model takes at most {self.context - self.max_new_tokens}. "
                  "Shorten it.]", file=err, flush=True)
            return
        if dropped:
            self.history = self.history[dropped:]
            print(f"[dropped the {dropped} oldest turn(s) to fit the context of "
                  f"{self.context} tokens; rebuilding the cache]", file=err, flush=True)
        if not self.reuse_cache:
            self.engine.reset()
        stream = Detokenizer(self.tokenizer.decode)

        def show(ids: list[int], finish: str | None) -> None:
            piece = stream.push(ids)
            if piece:
                out.write(piece)
                out.flush()

        started = time.perf_counter()
        request = Request(prompt, self.max_new_tokens, show, self.sampling, self.seed)
        self.seed += 1  # a new draw for every reply, still reproducible from --seed
        self.engine.submit(request)
        try:
            self.engine.run_until_idle()
            out.write(stream.finish())
        except KeyboardInterrupt:
            # The interrupted step may have left the engine's state half-updated: start from
            # an empty cache (the next turn prefills the whole conversation once).
            self.engine.reset()
            out.write(stream.finish())
            print("\n[stopped]", file=err, flush=True)
        out.write("\n")
        out.flush()
        reply = list(request.generated)
        self.last_cached = request.cached  # prompt tokens the cache already held
        self.last = Stats(len(reply), time.perf_counter() - started)
        self.total = Stats(self.total.tokens + self.last.tokens,
                           self.total.seconds + self.last.seconds)
        self.history.append(Turn(user, reply, text))

    def command(self, line: str, err: TextIO) -> bool:
        """Run a /command; False means leave the loop."""
        name = line.split()[0]
        if name == "/exit":
            return False
        if name == "/reset":
            self.history = []
            print("[conversation cleared]", file=err, flush=True)
        elif name == "/help":
            print(HELP, file=err, flush=True)
        elif name == "/stats":
            print(f"[last reply: {self.last.tokens} tokens in {self.last.seconds:.2f} s, "
                  f"{self.last.rate():.1f} tokens/s; session: {self.total.tokens} tokens, "
                  f"{self.total.rate():.1f} tokens/s; history: {len(self.history)} turns]",
                  file=err, flush=True)
        else:
            print(f"[unknown command {name}; /help lists them]", file=err, flush=True)
        return True

    def loop(self, lines: BinaryIO, out: TextIO, err: TextIO) -> None:
        interactive = lines.isatty()
        if interactive:
            print("chat: one message per line; /help for commands, Ctrl-D to leave",
                  file=err, flush=True)
        while True:
            if interactive:
                err.write("> ")
                err.flush()
            try:
                raw = lines.readline(MAX_LINE_BYTES + 1)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: nothing to stop
                err.write("\n")
                continue
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = lines.readline(MAX_LINE_BYTES)
                print(f"[line longer than {MAX_LINE_BYTES} bytes ignored]", file=err, flush=True)
                continue
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                print("[that line is not valid UTF-8; ignored]", file=err, flush=True)
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, err):
                    break
                continue
            self.reply(line, out, err)
