"""`python -m infer` end to end on a trained-looking checkpoint built here (random tiny model +
a tokenizer trained on a few sentences): convert, load, generate, chat, and bad input."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.checkpoint import write_checkpoint
from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer
from infer.chat import Chat
from infer.cli import main
from infer.loading import load, quantize
from infer.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "hello world, how are you?",
             "the quick brown fox jumps over the lazy dog"] * 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as `python -m train --out DIR` leaves it, with two checkpoints."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = Tokenizer.train(SENTENCES, vocab_size=300)
    cfg = preset("tiny")
    (run / "tokenizer.json").write_text(tokenizer.to_json())
    for step, seed in ((10, 1), (20, 0)):
        model = Transformer(cfg, key=jax.random.key(seed))
        write_checkpoint(run / "checkpoints" / f"step_{step:06d}",
                         {"model": cfg.to_dict(), "quant": {"mode": "none"}, "step": step},
                         {"model": model}, {"tokenizer.json": tokenizer.to_json()})
    return run


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_folder_loads_its_newest_checkpoint(run_dir):
    loaded = load(run_dir)
    assert loaded.path.name == "step_000020" and loaded.scheme is None
    want = Transformer(preset("tiny"), key=jax.random.key(0))
    np.testing.assert_array_equal(loaded.model.embed, want.embed)
    assert load(run_dir / "checkpoints" / "step_000010").path.name == "step_000010"


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8", "bf16"])
def test_converted_checkpoint_round_trips(run_dir, tmp_path, capsys, scheme):
    code, out, _ = _run(["convert", run_dir, "--to", scheme, "--out", tmp_path / "c",
                         "--group-size", 32], capsys)
    assert code == 0 and "MiB ->" in out
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["weights"] == {"scheme": scheme, "group_size": 32}
    loaded = load(tmp_path / "c")
    assert loaded.scheme == scheme and loaded.tokenizer is not None
    want = quantize(load(run_dir).model, scheme, group_size=32)
    for got_leaf, want_leaf in zip(jax.tree.leaves(loaded.model), jax.tree.leaves(want),
                                   strict=True):
        assert got_leaf.dtype == want_leaf.dtype
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


# Per-channel absmax rounding moves each int8 weight by at most amax/254 (~0.4% of the column's
# largest weight) and each fp8 e4m3 weight by at most 2^-4 of its own magnitude, so fp8 errs ~4x
# more. Measured on tiny models of seeds 0-3 (logits std ~0.1 with the 0.1-scaled head): max
# |difference| 0.0027-0.0031 (int8) and 0.0095-0.013 (fp8); the bounds are ~3x those.
@pytest.mark.parametrize(("scheme", "atol"), [("int8", 0.01), ("fp8", 0.04)])
def test_quantized_logits_stay_close_to_float(run_dir, scheme, atol):
    model = load(run_dir).model
    tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, 300, jnp.int32)
    reference = model(tokens)
    got = quantize(model, scheme)(tokens)
    np.testing.assert_allclose(got, reference, atol=atol, rtol=0)


def test_generate_batch_equals_single_runs_as_text(run_dir, capsys):
    prompts = ["the cat", "hello world, how are", "a"]
    common = ["--greedy", "--max-new-tokens", 12]
    code, batched, _ = _run(["generate", run_dir, *sum((["--prompt", p] for p in prompts), []),
                             *common], capsys)
    assert code == 0
    singles = []
    for p in prompts:
        code, out, _ = _run(["generate", run_dir, "--prompt", p, *common], capsys)
        assert code == 0
        singles.append(out.rstrip("\n"))
    assert batched == "\n\n".join(singles) + "\n"
    assert all(s.startswith(p) for s, p in zip(singles, prompts, strict=True))


def test_generate_reads_converted_checkpoints_and_int8_kv_cache(run_dir, tmp_path, capsys):
    assert _run(["convert", run_dir, "--to", "int8", "--out", tmp_path / "q"], capsys)[0] == 0
    code, out, _ = _run(["generate", tmp_path / "q", "--prompt", "the dog", "--seed", 3,
                         "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9,
                         "--kv-cache-dtype", "int8", "--max-new-tokens", 8], capsys)
    assert code == 0 and out.startswith("the dog")


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "{tmp}/missing", "--prompt", "x"], "no such file"),
    (["generate", "{corrupt}", "--prompt", "x"], "unreadable or truncated"),
    (["convert", "{run}", "--to", "int3", "--out", "{tmp}/o"], "invalid choice"),
    (["generate", "{run}", "--prompt", "the cat " * 100], "does not fit"),
    (["generate", "{run}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "{run}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["generate", "{run}", "--prompt", "x", "--kv-cache-dtype", "int4"], "invalid choice"),
    (["bench", "--preset", "huge"], "unknown preset"),
])
def test_bad_input_is_a_one_line_error(run_dir, tmp_path, capsys, argv, message):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps({"format_version": 1,
                                                     "model": preset("tiny").to_dict()}))
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    argv = [a.format(tmp=tmp_path, run=run_dir, corrupt=corrupt) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_chat_in_a_subprocess_answers_each_line_and_exits_at_eof(run_dir):
    lines = b"hello world\n/stats\n/nonsense\n\xff\xfe bad bytes\nthe cat sat\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "infer", str(run_dir), "--max-new-tokens", "6", "--greedy"],
        input=lines, capture_output=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 2  # one reply per message line
    err = result.stderr.decode()
    assert "unknown command /nonsense" in err and "not valid UTF-8" in err
    assert "tokens/s" in err and "Traceback" not in err


def test_chat_reset_clears_history_and_old_turns_are_dropped_to_fit(run_dir, capsys):
    loaded = load(run_dir)
    chat = Chat(loaded.model, loaded.tokenizer, sampling=SamplingConfig(greedy=True),
                max_new_tokens=8)
    chat.reply("hello world", sys.stdout, sys.stderr)
    chat.reply("the cat sat", sys.stdout, sys.stderr)
    assert len(chat.history) == 2
    chat.command("/reset", sys.stderr)
    assert chat.history == []
    # Fill the context: each turn is ~60 tokens, the context 128 with room for an 8-token reply
    # (the reply budget is capped at a quarter of the context).
    for _ in range(3):
        chat.reply("the quick brown fox jumps over the lazy dog " * 5, sys.stdout, sys.stderr)
    prompt, dropped = chat.prompt_ids(loaded.tokenizer.encode("hi"))
    assert len(prompt) + chat.max_new_tokens <= chat.context
    assert "dropped the" in capsys.readouterr().err
    # The drop left room: the next short turn appends to the rebuilt cache instead of
    # dropping (and re-prefilling) again.
    chat.reply("hi", sys.stdout, sys.stderr)
    assert "dropped the" not in capsys.readouterr().err and chat.last_cached > 0
    chat.reply("the cat " * 200, sys.stdout, sys.stderr)  # alone longer than the context
    assert "Shorten it" in capsys.readouterr().err


def test_bench_json_has_the_plainly_named_keys(run_dir, capsys):
    from infer.kernels import available

    code, out, _ = _run(["bench", run_dir, "--to", "int8,bf16", "--batch-sizes", "1,2",
                         "--prompt-len", 8, "--new-tokens", 9, "--repeats", 1, "--json"], capsys)
    assert code == 0
    reports = json.loads(out)["reports"]
    assert [report["weights"] for report in reports] == ["int8", "bf16"]
    for report in reports:
        assert report["measured_bandwidth_GB_per_s"] > 0
        assert report["kv_cache_dtype"] == "bfloat16"  # the command's default
        # Both formats run on a native kernel where one can be built, and say which path.
        assert report["native_kernel"] == available()
        assert (report["native_kernel_path"] is not None) == available()
        assert [row["batch_size"] for row in report["results"]] == [1, 2]
        for row in report["results"]:
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step",
                        "bytes_per_step", "achieved_GB_per_s", "percent_of_measured_bandwidth"):
                assert row[key] > 0


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(run_dir, capsys):
    loaded = load(run_dir)
    chat = Chat(loaded.model, loaded.tokenizer, sampling=SamplingConfig(greedy=True),
                max_new_tokens=16)
    step = chat.engine.step
    kept = []

    def interrupted_after_one_round():
        """The user interrupts (Ctrl-C) once the reply's first tokens have streamed."""
        step()
        request = chat.engine.slots[0].request
        kept.append(list(request.generated) if request is not None else [])
        raise KeyboardInterrupt

    chat.engine.step = interrupted_after_one_round
    chat.loop(io.BytesIO(b"hello world\nthe cat sat\n/stats\n"), sys.stdout, sys.stderr)
    out, err = capsys.readouterr()
    assert err.count("[stopped]") == 2 and "history: 2 turns" in err
    assert len(out.splitlines()) == 2  # each reply ended with its newline
    # The history keeps what was streamed before the interrupt, nothing more.
    assert [turn.reply for turn in chat.history] == kept


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_sampling_help_shows_the_defaults_that_apply(command, capsys):
    from infer.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([command, "CKPT", *(["--prompt", "x"] if command == "generate"
                                                 else [])])
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--temperature F 0 = greedy (default {args.temperature})" in help_text
    assert f"--top-k N 0 = no cut (default {args.top_k})" in help_text
    assert f"with a note; default {args.max_new_tokens})" in help_text
    if command == "chat":
        assert (args.max_new_tokens, args.temperature, args.top_k) == (256, 0.8, 50)
    # The commands' KV cache is bf16 unless told (the library's classes keep float32).
    assert args.kv_cache_dtype == "bf16"
    assert "--kv-cache-dtype {f32,bf16,int8} KV cache storage (default bf16)" in help_text
    for other in (["bench", "--preset", "tiny"], ["serve", "CKPT"]):
        assert parser.parse_args(other).kv_cache_dtype == "bf16"


def test_convert_notes_a_trained_setting_no_inference_op_computes():
    from hpllm.quant import QuantConfig
    from infer.convert import choose_format

    assert choose_format(QuantConfig.named("w4a8", group_size=0), None, None) == (
        "w4a8", 0, None)
    scheme, group, note = choose_format(QuantConfig(mode="int4w", group_size=32,
                                                    weight_bits=3), None, None)
    assert (scheme, group) == ("int4", 32) and "3-bit weights" in note
    # A float model quantized after training is the usual case, not worth a note.
    assert choose_format(QuantConfig(), "int4", 64) == ("int4", 64, None)
    scheme, _, note = choose_format(QuantConfig(mode="int8", activations="tensor"), None, None)
    assert scheme == "w8a8" and "per token, not per tensor" in note
