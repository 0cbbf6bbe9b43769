"""Command line of `python -m infer`: convert, generate, chat (the default), bench, serve,
export.

`CKPT` may also be a Hugging Face model folder (Llama, Mistral, Qwen2), converted in memory.

Mistakes in the input (missing or corrupt checkpoint, bad flag value, prompt too long, an
`--out` that would overwrite something, a full or read-only disk) end with one line
`error: ...` on stderr and exit status 2. Only `hpllm.errors.UserError` (raised where input is
checked, OS errors on the user's paths included) is reported that way: anything else is a bug
and keeps its traceback.
"""

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

from hpllm.config import COMPUTE_DTYPES, DTYPE_ALIASES, PRESETS
from hpllm.errors import UserError
from hpllm.hf_tokenizer import GenerationDefaults, PretrainedTokenizer
from hpllm.kvcache import CACHE_DTYPE_ALIASES
from hpllm.quant import SCHEMES
from infer.detokenizer import Detokenizer
from infer.generate import LAYOUTS, Generator
from infer.loading import GROUP_SIZES, Loaded, load, require_tokenizer
from infer.sampling import SamplingConfig

COMMANDS = ("convert", "generate", "chat", "bench", "serve", "export")
MAX_SEED = 2**32 - 1
MAX_BATCH = 4096  # bench batch sizes: beyond this a KV cache alone outgrows any CPU's memory
# The commands' KV cache: bf16 halves the bytes every decode step reads from the cache, which
# the attention of a batch is bound by (llama.cpp's default cache is f16, vLLM's the model's
# dtype). The library's classes keep float32, the exact reference; accuracy against it in
# docs/performance.md ("bf16 KV cache by default").
KV_CACHE_DTYPE = "bf16"
KV_CACHE_HELP = ("KV cache storage (default %(default)s): bf16 reads half the bytes of f32 at "
                 "each decode step, f32 is exact, int8 has one scale per token and head")


class UsageError(UserError):
    """A bad flag: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper end if high is None)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be >= {low}{upper}, got {value}")
        return value

    return integer


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_finite_float.__name__ = "number"


def _preset_name(text: str) -> str:
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of "
                                         f"{', '.join(PRESETS)}")
    return text


def _group_size(text: str) -> int:
    value = _int_in(0)(text)
    if value not in GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, GROUP_SIZES))}, "
                                         f"got {value}")
    return value


def _batch_sizes(text: str) -> str:
    """Checks a comma-separated list of batch sizes; the text goes on to `infer.bench`."""
    try:
        for part in text.split(","):
            _int_in(1, MAX_BATCH)(part)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"a comma-separated list of batch sizes, each "
                                         f"{error}") from None
    return text


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_positive_int = _int_in(1)


class _Given(argparse.Action):
    """Stores the value and notes in `namespace.given` that the flag was on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


SAMPLING_NOTE = ("A Hugging Face model's generation_config.json replaces the sampling defaults "
                 "(--temperature, --top-k, --top-p, greedy or not) of flags not given.")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    # "%(default)s" is filled in when help is printed, so chat's set_defaults shows there. The
    # sampling flags record that they were given (`_Given`): for an imported model, its
    # generation_config.json replaces the defaults of the flags that were not.
    parser.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N",
                        help="at most N new tokens (>= 1; more than the context leaves is "
                        "reduced to what fits, with a note; default %(default)s)")
    parser.add_argument("--temperature", type=_finite_float, default=1.0, metavar="F",
                        action=_Given,
                        help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-k", type=_int_in(0), default=0, metavar="N", action=_Given,
                        help="0 = no cut (default %(default)s)")
    parser.add_argument("--top-p", type=_finite_float, default=1.0, metavar="F", action=_Given,
                        help="in (0, 1]")
    parser.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, metavar="N",
                        help=f"random seed, 0 to {MAX_SEED}")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES),
                        default=KV_CACHE_DTYPE, help=KV_CACHE_HELP)


def build_parser() -> Parser:
    parser = Parser(prog="python -m infer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    convert = commands.add_parser(
        "convert", help="quantize a training checkpoint or a Hugging Face model folder")
    convert.add_argument("checkpoint", metavar="RUN_OR_CKPT_OR_HF_DIR")
    convert.add_argument("--to", default=None, choices=SCHEMES, metavar="SCHEME",
                         help=f"weight format: one of {', '.join(SCHEMES)} (w8a8 / w4a8: "
                         "int8 / int4 weights and per-token int8 activations). Default: the "
                         "format the checkpoint was trained for (--quant none and Hugging Face "
                         "folders: f32, int8: w8a8, fp8 and fp8-current: fp8, int4w: int4, "
                         "w4a8: w4a8, with the trained group size); another format than that "
                         "prints a note")
    convert.add_argument("--out", required=True, metavar="DIR",
                         help="a new folder (or an empty one); never the input or a folder "
                         "holding anything else")
    convert.add_argument("--force", action="store_true",
                         help="replace DIR if it holds an earlier conversion (only that)")
    convert.add_argument("--group-size", type=_group_size, default=None,
                         metavar="{32,64,128,0}", help="int4 / w4a8 group size along the "
                         "input dimension, 0: per output channel (default: the trained one, "
                         "else 128)")
    convert.add_argument("--quantize-head", action="store_true",
                         help="quantize the LM head too (default: it stays float)")

    generate = commands.add_parser("generate", help="complete prompts (several = one batch)",
                                   description="Complete prompts (several = one batch). "
                                   + SAMPLING_NOTE)
    generate.add_argument("checkpoint", metavar="CKPT")
    generate.add_argument("--prompt", action="append", required=True, metavar="TEXT")
    generate.add_argument("--stop", action="append", type=_non_empty, default=[],
                          metavar="TEXT", help="stop a completion at this text (repeatable)")
    _sampling_args(generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (the default)",
                               description="Interactive multi-turn chat. A reply takes at most "
                               "a quarter of the model's context (--max-new-tokens is capped "
                               "there). " + SAMPLING_NOTE)
    chat.add_argument("checkpoint", metavar="CKPT")
    chat.add_argument("--system", default=None, metavar="TEXT",
                      help="system prompt (models with a chat template of their own)")
    _sampling_args(chat)
    chat.set_defaults(max_new_tokens=256, temperature=0.8, top_k=50)

    bench = commands.add_parser("bench", help="prefill/decode speed against memory bandwidth")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("checkpoint", nargs="?", metavar="CKPT")
    source.add_argument("--preset", type=_preset_name, metavar="NAME",
                        help=f"random weights of a preset's shape ({', '.join(PRESETS)})")
    bench.add_argument("--to", default=None, metavar="SCHEME",
                       help=f"convert first: one of {', '.join(SCHEMES)}; a comma-separated "
                       "list compares them in one run, interleaved")
    bench.add_argument("--group-size", type=_group_size, default=128, metavar="{32,64,128,0}",
                       help="int4 / w4a8 group size, 0: per output channel (default 128)")
    bench.add_argument("--quantize-head", action="store_true",
                       help="with --to: quantize the LM head too")
    bench.add_argument("--no-native-kernels", action="store_true",
                       help="use only XLA ops (no native int8/int4/bf16/w8a8 or attention kernels)")
    bench.add_argument("--batch-sizes", type=_batch_sizes, default="1,8", metavar="LIST",
                       help=f"comma-separated, each 1 to {MAX_BATCH} (default 1,8)")
    bench.add_argument("--prompt-len", type=_positive_int, default=128, metavar="N")
    bench.add_argument("--new-tokens", type=_positive_int, default=128, metavar="N")
    bench.add_argument("--repeats", type=_positive_int, default=3, metavar="N")
    bench.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES),
                       default=KV_CACHE_DTYPE, help=KV_CACHE_HELP)
    bench.add_argument("--layout", choices=LAYOUTS, default="unrolled")
    bench.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                       help="activation dtype (--preset only; default: the preset's)")
    bench.add_argument("--json", action="store_true", help="one JSON document on stdout")

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve CKPT over an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health). Every shape is compiled before the server "
        "listens; SIGTERM or Ctrl-C finishes the requests in flight, then exits.")
    serve.add_argument("checkpoint", metavar="CKPT")
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    serve.add_argument("--port", type=int, default=8000, help="default %(default)s")
    serve.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                       help="requests decoded together (default %(default)s)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting for a slot before 429 (default %(default)s)")
    serve.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES),
                       default=KV_CACHE_DTYPE, help=KV_CACHE_HELP)
    serve.add_argument("--max-seq-len", type=_positive_int, default=None, metavar="N",
                       help="cache slots per request (default: the model's context)")
    serve.add_argument("--chunk-size", type=_positive_int, default=4, metavar="N",
                       help="decode steps between scheduling rounds (default %(default)s)")
    serve.add_argument("--model-name", default=None, metavar="NAME",
                       help="the model id clients ask for (default: CKPT's folder name)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                       help="seconds to finish requests in flight on shutdown "
                       "(default %(default)s)")
    export = commands.add_parser("export", help="write a model as a Hugging Face folder")
    export.add_argument("checkpoint", metavar="CKPT")
    export.add_argument("--format", required=True, choices=("hf",),
                        help="hf: config.json, model.safetensors and tokenizer files that "
                        "transformers loads")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="a new path or an empty folder (never the input, a training run "
                        "or a folder holding other files)")
    export.add_argument("--dtype", choices=tuple(DTYPE_ALIASES), default="bf16",
                        help="weight dtype in the file (quantized weights are dequantized)")
    return parser


def _sampling(args: argparse.Namespace, defaults: GenerationDefaults | None = None
              ) -> SamplingConfig:
    """The flags, else the model's generation_config.json, else the built-in defaults."""
    if defaults is None:
        return SamplingConfig(greedy=args.greedy, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    given = getattr(args, "given", frozenset())
    return SamplingConfig(
        greedy=args.greedy or (defaults.greedy and not given),
        temperature=args.temperature if "temperature" in given else defaults.temperature,
        top_k=args.top_k if "top_k" in given else defaults.top_k,
        top_p=args.top_p if "top_p" in given else defaults.top_p)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _unverified_note(path: object) -> None:
    _note(f"{path} has no manifest.json (written before checksums were recorded); its "
          "files were not verified")


def _load(path: str) -> Loaded:
    loaded = load(path)
    if not loaded.verified:
        _unverified_note(loaded.path)
    return loaded


def stop_ids_of(tokenizer, *, chat: bool) -> list[int]:
    """Where a reply ends: an imported model's own stop ids; for a model trained here the end
    of text, and in a conversation also the start of a user turn it began by itself."""
    if isinstance(tokenizer, PretrainedTokenizer):
        return list(tokenizer.stop_ids)
    return [tokenizer.eos_id, tokenizer.user_id] if chat else [tokenizer.eos_id]


def fit_new_tokens(requested: int, longest_prompt: int, context: int) -> int:
    """`requested` new tokens, reduced (with a note) to what the context leaves after the
    longest prompt: its last slot holds the prompt's last token or a new one, and the final
    new token needs no slot, so `context - longest_prompt + 1` tokens fit."""
    if longest_prompt > context:
        raise UsageError(f"prompt of {longest_prompt} tokens does not fit the model's context "
                         f"of {context} tokens; shorten it")
    room = context - longest_prompt + 1
    if requested > room:
        _note(f"--max-new-tokens {requested} is more than the context of {context} tokens "
              f"leaves after a {longest_prompt}-token prompt; generating at most {room}")
        return room
    return requested


def run_convert(args: argparse.Namespace) -> None:
    from infer.convert import convert

    started = time.perf_counter()
    result = convert(args.checkpoint, args.to, args.out, args.group_size, args.quantize_head,
                     force=args.force)
    if not result.verified:
        _unverified_note(result.source)
    if result.note:
        _note(result.note)
    mib = 2**20
    print(f"converted {result.source} -> {result.out} ({result.format}): weights "
          f"{result.bytes_before / mib:.1f} MiB -> {result.bytes_after / mib:.1f} MiB "
          f"({result.bytes_before / result.bytes_after:.2f}x smaller) in "
          f"{time.perf_counter() - started:.1f} s")


def run_generate(args: argparse.Namespace) -> None:
    loaded = _load(args.checkpoint)
    sampling = _sampling(args, loaded.generation)
    tokenizer = require_tokenizer(loaded)
    if any(not p for p in args.prompt):
        raise UsageError("empty --prompt: give some text")
    # Typed text: special tokens' names stay text.
    if isinstance(tokenizer, PretrainedTokenizer):
        prompts = [tokenizer.encode_prompt(p) for p in args.prompt]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompt]
    if any(not p for p in prompts):
        raise UsageError("empty --prompt: give some text")
    max_new_tokens = fit_new_tokens(args.max_new_tokens, max(map(len, prompts)),
                                    loaded.model.cfg.max_seq_len)
    generator = Generator(loaded.model, stop_ids=stop_ids_of(tokenizer, chat=False),
                          kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype])
    started = time.perf_counter()
    generation = generator.start(prompts, max_new_tokens=max_new_tokens,
                                 sampling=sampling, seed=args.seed)
    streams = [Detokenizer(tokenizer.decode, args.stop) for _ in prompts]
    single = len(prompts) == 1
    if single:  # stream as it comes; a batch is printed once complete, in order
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    for new in generation:
        for row, (stream, ids) in enumerate(zip(streams, new, strict=True)):
            piece = stream.push(ids)
            if stream.stopped:
                generation.stop_row(row)
            if single and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
    for stream in streams:
        piece = stream.finish()
        if single and piece:
            sys.stdout.write(piece)
    if single:
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n\n".join(p + s.text for p, s in zip(args.prompt, streams,
                                                              strict=True)) + "\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - started
    n_new = sum(len(t) for t in generation.tokens)
    print(f"[{n_new} new tokens in {elapsed:.2f} s, {n_new / elapsed:.1f} tokens/s incl. "
          "compilation]", file=sys.stderr)


def run_chat(args: argparse.Namespace) -> None:
    from infer.chat import Chat

    loaded = _load(args.checkpoint)
    sampling = _sampling(args, loaded.generation)
    chat = Chat(loaded.model, require_tokenizer(loaded), sampling=sampling,
                max_new_tokens=args.max_new_tokens, seed=args.seed,
                kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype], system=args.system)
    if chat.max_new_tokens < args.max_new_tokens:
        _note(f"replies are at most {chat.max_new_tokens} tokens (a quarter of the context of "
              f"{chat.context}), not --max-new-tokens {args.max_new_tokens}")
    chat.engine.warm_up()  # every prefill length compiles now, not during a turn
    chat.loop(sys.stdin.buffer, sys.stdout, sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    from infer.bench import run_from_args

    run_from_args(args)


def run_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from infer.engine import Engine
    from infer.server import serve

    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    loaded = _load(args.checkpoint)
    tokenizer = require_tokenizer(loaded)
    engine = Engine(loaded.model, max_batch=args.max_batch, max_queue=args.max_queue,
                    context=args.max_seq_len, chunk_size=args.chunk_size,
                    kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype],
                    stop_ids=stop_ids_of(tokenizer, chat=True))
    started = time.perf_counter()
    print(f"compiling {len(engine.prefill_shapes)} prefills (rows x padded length) and "
          f"{len(engine.row_buckets)} decode chunks...", file=sys.stderr, flush=True)
    engine.warm_up()
    print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    name = args.model_name or Path(args.checkpoint).resolve().name
    serve(engine, tokenizer, name, host=args.host, port=args.port,
          shutdown_timeout=args.shutdown_timeout)


def run_export(args: argparse.Namespace) -> None:
    from infer.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face folder, {args.dtype} weights)")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line, with every check that needs no checkpoint done (flag ranges,
    sampling settings, bench options); a `UsageError` for anything out of range."""
    argv = list(argv)
    # `python -m infer CKPT` is short for `python -m infer chat CKPT`.
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "chat")
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "chat"):
        _sampling(args)
    if args.command == "bench":
        if args.compute_dtype is not None and args.preset is None:
            raise UsageError("--compute-dtype works with --preset only")
        for scheme in (args.to or "f32").split(","):
            if scheme not in SCHEMES:
                raise UsageError(f"--to: unknown scheme {scheme!r}; choose from "
                                 f"{', '.join(SCHEMES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    runners = {"convert": run_convert, "generate": run_generate, "chat": run_chat,
               "bench": run_bench, "serve": run_serve, "export": run_export}
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        runners[args.command](args)
    except UserError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
