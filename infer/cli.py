"""Command line of `python -m infer`: convert, generate, chat (the default), bench, export.

`CKPT` may also be a Hugging Face model folder (Llama, Mistral, Qwen2), converted in memory.

Mistakes in the input (missing or corrupt checkpoint, bad flag value, prompt too long) end with
one line `error: ...` on stderr and exit status 2, never a traceback.
"""

import argparse
import sys
import time
from collections.abc import Sequence

from hpllm.errors import UserError
from hpllm.hf_tokenizer import GenerationDefaults, PretrainedTokenizer
from hpllm.kvcache import CACHE_DTYPE_ALIASES
from infer.detokenizer import Detokenizer
from infer.generate import LAYOUTS, Generator
from infer.loading import SCHEMES, load, require_tokenizer
from infer.sampling import SamplingConfig

COMMANDS = ("convert", "generate", "chat", "bench", "export")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="default %(default)s")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="F", action=_Given,
                        help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, metavar="N", action=_Given,
                        help="0 = no cut (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="F", action=_Given,
                        help="in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, metavar="N")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="f32")


def build_parser() -> Parser:
    parser = Parser(prog="python -m infer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    convert = commands.add_parser(
        "convert", help="quantize a training checkpoint or a Hugging Face model folder")
    convert.add_argument("checkpoint", metavar="RUN_OR_CKPT_OR_HF_DIR")
    convert.add_argument("--to", required=True, choices=SCHEMES, metavar="SCHEME",
                         help=f"weight format: one of {', '.join(SCHEMES)} (w8a8: int8 "
                         "weights and per-token int8 activations)")
    convert.add_argument("--out", required=True, metavar="DIR")
    convert.add_argument("--group-size", type=int, default=128, metavar="{32,64,128}",
                         help="int4 group size (default 128)")
    convert.add_argument("--quantize-head", action="store_true",
                         help="quantize the LM head too (default: it stays float)")

    generate = commands.add_parser("generate", help="complete prompts (several = one batch)",
                                   description="Complete prompts (several = one batch). "
                                   + SAMPLING_NOTE)
    generate.add_argument("checkpoint", metavar="CKPT")
    generate.add_argument("--prompt", action="append", required=True, metavar="TEXT")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop a completion at this text (repeatable)")
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
    source.add_argument("--preset", metavar="NAME", help="random weights of a preset's shape")
    bench.add_argument("--to", default=None, metavar="SCHEME",
                       help=f"convert first: one of {', '.join(SCHEMES)}; a comma-separated "
                       "list compares them in one run, interleaved")
    bench.add_argument("--group-size", type=int, default=128, metavar="{32,64,128}")
    bench.add_argument("--quantize-head", action="store_true",
                       help="with --to: quantize the LM head too")
    bench.add_argument("--no-native-kernels", action="store_true",
                       help="use only XLA ops (no native int8/int4 kernels)")
    bench.add_argument("--batch-sizes", default="1,8", metavar="LIST")
    bench.add_argument("--prompt-len", type=_positive_int, default=128, metavar="N")
    bench.add_argument("--new-tokens", type=_positive_int, default=128, metavar="N")
    bench.add_argument("--repeats", type=_positive_int, default=3, metavar="N")
    bench.add_argument("--kv-cache-dtype", choices=tuple(CACHE_DTYPE_ALIASES), default="f32")
    bench.add_argument("--layout", choices=LAYOUTS, default="unrolled")
    bench.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                       help="activation dtype (--preset only; default: the preset's)")
    bench.add_argument("--json", action="store_true", help="one JSON document on stdout")

    export = commands.add_parser("export", help="write a model as a Hugging Face folder")
    export.add_argument("checkpoint", metavar="CKPT")
    export.add_argument("--format", required=True, choices=("hf",),
                        help="hf: config.json, model.safetensors and tokenizer files that "
                        "transformers loads")
    export.add_argument("--out", required=True, metavar="DIR", help="a folder not there yet")
    export.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                        help="weight dtype in the file (quantized weights are dequantized)")
    return parser


def _sampling(args: argparse.Namespace, defaults: GenerationDefaults | None = None
              ) -> SamplingConfig:
    """The flags, else the model's generation_config.json, else the built-in defaults."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if defaults is None:
        return SamplingConfig(greedy=args.greedy, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    given = getattr(args, "given", frozenset())
    return SamplingConfig(
        greedy=args.greedy or (defaults.greedy and not given),
        temperature=args.temperature if "temperature" in given else defaults.temperature,
        top_k=args.top_k if "top_k" in given else defaults.top_k,
        top_p=args.top_p if "top_p" in given else defaults.top_p)


def run_convert(args: argparse.Namespace) -> None:
    from infer.convert import convert

    started = time.perf_counter()
    result = convert(args.checkpoint, args.to, args.out, args.group_size, args.quantize_head)
    mib = 2**20
    print(f"converted {result.source} -> {result.out} ({args.to}): weights "
          f"{result.bytes_before / mib:.1f} MiB -> {result.bytes_after / mib:.1f} MiB "
          f"({result.bytes_before / result.bytes_after:.2f}x smaller) in "
          f"{time.perf_counter() - started:.1f} s")


def run_generate(args: argparse.Namespace) -> None:
    loaded = load(args.checkpoint)
    sampling = _sampling(args, loaded.generation)
    tokenizer = require_tokenizer(loaded)
    if any(not p for p in args.prompt):
        raise UsageError("empty --prompt: give some text")
    if isinstance(tokenizer, PretrainedTokenizer):
        prompts = [tokenizer.encode_prompt(p) for p in args.prompt]
        stop_ids = list(tokenizer.stop_ids)
    else:
        prompts = [tokenizer.encode(p) for p in args.prompt]
        stop_ids = [tokenizer.eos_id]
    if any(not p for p in prompts):
        raise UsageError("empty --prompt: give some text")
    generator = Generator(loaded.model, stop_ids=stop_ids,
                          kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype])
    started = time.perf_counter()
    generation = generator.start(prompts, max_new_tokens=args.max_new_tokens,
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

    loaded = load(args.checkpoint)
    sampling = _sampling(args, loaded.generation)
    chat = Chat(loaded.model, require_tokenizer(loaded), sampling=sampling,
                max_new_tokens=args.max_new_tokens, seed=args.seed,
                kv_cache_dtype=CACHE_DTYPE_ALIASES[args.kv_cache_dtype], system=args.system)
    chat.loop(sys.stdin.buffer, sys.stdout, sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    from infer.bench import run_from_args

    run_from_args(args)


def run_export(args: argparse.Namespace) -> None:
    from infer.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face folder, {args.dtype} weights)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `python -m infer CKPT` is short for `python -m infer chat CKPT`.
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "chat")
    runners = {"convert": run_convert, "generate": run_generate, "chat": run_chat,
               "bench": run_bench, "export": run_export}
    try:
        args = build_parser().parse_args(argv)
        runners[args.command](args)
    except (UsageError, UserError, ValueError, FileNotFoundError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
