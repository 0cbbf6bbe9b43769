"""What a bf16 (or int8) KV cache costs in accuracy against a float32 one, through the decode path.

    python bench/kv_cache_accuracy.py CKPT [--sequences 8] [--tokens 128] [--cache bf16,int8]
    python bench/kv_cache_accuracy.py --preset base

Two measurements, each with the float32 cache as the reference and the model as `infer`'s
commands run it (layers unrolled, native kernels where they build):

- teacher-forced: `--sequences` windows of `--tokens` + 1 tokens (a checkpoint: the first ones
  of the longest documents of data/validation.jsonl, held out from training, through its
  tokenizer; `--preset`: random token ids, as its weights are random too) go through the cache
  one token per decode step, as generation feeds them. Per cache dtype: the largest |logit
  difference| from the float32 cache's logits over every step, row and vocabulary entry, the
  share of steps whose top token is the float32 one's, and the mean loss (perplexity) of the
  next token;
- free-running: greedy generation of `--tokens` new tokens from each window's first 16 tokens
  with `infer.generate.Generator`, per cache dtype: how many sequences match the float32
  cache's tokens all the way, and the mean share of tokens before the first difference.
"""

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kvcache import CACHE_DTYPE_ALIASES
from infer.generate import Generator
from infer.kernels import use_native_kernels
from infer.loading import load, random_model

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 16


def validation_windows(tokenizer, n: int, length: int) -> np.ndarray:
    """The first `length` tokens of the `n` longest validation documents."""
    with (REPO / "data" / "validation.jsonl").open() as lines:
        texts = sorted((json.loads(line)["text"] for line in lines), key=len, reverse=True)
    windows = [ids[:length] for ids in (tokenizer.encode(t) for t in texts[:n])]
    if len(windows) < n or min(map(len, windows)) < length:
        raise SystemExit(f"fewer than {n} validation documents of {length} tokens")
    return np.asarray(windows, np.int32)


@eqx.filter_jit
def teacher_forced(model, tokens, caches):
    """Every cache's logits for tokens[:, t] at position t, one decode step at a time: per
    step, each cache's largest |logit difference| from caches[0]'s, whether its top token is
    caches[0]'s, and its loss on tokens[:, t + 1]."""
    batch, steps = tokens.shape[0], tokens.shape[1] - 1

    def step(caches, t):
        token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        target = jax.lax.dynamic_index_in_dim(tokens, t + 1, axis=1, keepdims=False)
        positions = jnp.full((batch, 1), t, jnp.int32)
        outputs = [model.decode(token, positions, cache) for cache in caches]
        logits = [out[0][:, 0].astype(jnp.float32) for out in outputs]
        reference = logits[0]
        per_cache = []
        for row_logits in logits:
            loss = -jnp.take_along_axis(jax.nn.log_softmax(row_logits), target[:, None],
                                        axis=1)[:, 0]
            per_cache.append((jnp.max(jnp.abs(row_logits - reference)),
                              jnp.argmax(row_logits, -1) == jnp.argmax(reference, -1), loss))
        return tuple(out[1] for out in outputs), per_cache

    _, per_step = jax.lax.scan(step, caches, jnp.arange(steps, dtype=jnp.int32))
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("checkpoint", nargs="?", metavar="CKPT")
    source.add_argument("--preset", help="random weights of a preset's shape")
    parser.add_argument("--cache", default="bf16", help="cache dtypes against f32 (default "
                        "%(default)s; comma-separated)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    dtypes = ["f32", *args.cache.split(",")]
    if args.preset:
        model = random_model(args.preset)
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (
            args.sequences, args.tokens + 1), 0, model.cfg.vocab_size, jnp.int32))
        name = f"{args.preset} (random weights, random tokens)"
    else:
        loaded = load(args.checkpoint)
        model = loaded.model
        tokens = validation_windows(loaded.tokenizer, args.sequences, args.tokens + 1)
        name = f"{args.checkpoint} (validation text)"
    if args.tokens + 1 > model.cfg.max_seq_len:
        raise SystemExit(f"--tokens must be below the context of {model.cfg.max_seq_len}")
    fast = use_native_kernels(model.unstacked())
    caches = tuple(fast.allocate_cache(args.sequences, args.tokens + 1, CACHE_DTYPE_ALIASES[d])
                   for d in dtypes)
    per_step = jax.device_get(teacher_forced(fast, jnp.asarray(tokens), caches))
    prompts = tokens[:, :PROMPT_TOKENS].tolist()
    generated = {d: Generator(model, kv_cache_dtype=CACHE_DTYPE_ALIASES[d]).generate(
        prompts, max_new_tokens=args.tokens) for d in dtypes}

    print(f"{name}: {args.sequences} sequences; teacher-forced over {args.tokens} decode "
          f"steps, free-running {args.tokens} greedy tokens after {PROMPT_TOKENS}; load "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| KV cache | max abs logit diff | top token = f32's | loss (perplexity) | loss - f32's "
          "| greedy sequences = f32's | tokens before the first difference |")
    print("|---|---|---|---|---|---|---|")
    reference_loss = float(np.mean(per_step[0][2]))
    for d, (diff, same_top, loss) in zip(dtypes, per_step, strict=True):
        reference = generated["f32"]
        agree = []
        for ours, theirs in zip(generated[d], reference, strict=True):
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                          if a != b), len(theirs))
            agree.append(first / len(theirs))
        whole = sum(a == 1.0 for a in agree)
        mean_loss = float(np.mean(loss))
        print(f"| {d} | {float(np.max(diff)):.2e} | {100 * float(np.mean(same_top)):.2f}% | "
              f"{mean_loss:.4f} ({math.exp(mean_loss):.2f}) | {mean_loss - reference_loss:+.1e} | "
              f"{whole} / {len(agree)} | "
              f"{100 * statistics.mean(agree):.1f}% |")


if __name__ == "__main__":
    main()
