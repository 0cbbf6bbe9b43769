"""The training loop: AdamW with warmup + cosine decay, one jitted step, eval, progress.

`make_train_step` builds ONE `eqx.filter_jit` function that does the whole step: the forward
and backward pass of every micro-batch (gradient accumulation with `lax.scan`), global-norm
clipping, the AdamW update and its application. The train state is donated, so parameters and
optimizer moments are updated in place on the device.

Quantization-aware training (hpllm.quant) splits the model into `params` (trained) and
`quant_state` (fp8 amax history and scales; all-None for int8 and float). The quant ops write
their updated state into the cotangent of `quant_state`, so the "gradient" of the state IS the
new state: the step replaces it instead of feeding it to the optimizer.
"""

import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Int

from hpllm.errors import UserError
from hpllm.model import Transformer

# AdamW moments: beta2 0.95 (not 0.999) keeps the second moment responsive to the loss spikes
# of short LLM runs; this is the GPT-3 / Llama setting.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.95, 1e-8
# The cosine decays to this fraction of the peak learning rate, not to zero.
FINAL_LR_RATIO = 0.1


class StepBatch(eqx.Module):
    """One optimizer step's tokens: `accum` micro-batches of `batch` windows of `seq` tokens."""

    inputs: Int[Array, "accum batch seq"]
    targets: Int[Array, "accum batch seq"]
    segment_ids: Int[Array, "accum batch seq"]
    loss_mask: Float[Array, "accum batch seq"]


class TrainState(eqx.Module):
    """Everything the step updates. `params` and `quant_state` partition the model."""

    params: Transformer
    quant_state: Transformer
    opt_state: Any
    step: Int[Array, ""]

    def model(self) -> Transformer:
        return eqx.combine(self.params, self.quant_state)


def lr_at(step: Int[Array, ""] | int, *, peak: float, warmup: int, total: int) -> Float[Array, ""]:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to
    `FINAL_LR_RATIO * peak` at step `total`."""
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / jnp.float32(max(warmup, 1))
    progress = jnp.clip((step - warmup) / jnp.float32(max(total - warmup, 1)), 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * progress))
    decayed = peak * (FINAL_LR_RATIO + (1.0 - FINAL_LR_RATIO) * cosine)
    return jnp.where(step < warmup, warm, decayed)


def decay_mask(params: Transformer) -> Any:
    """True for weight matrices (Linear weights, the embedding), False for norm scales.

    Decided by name, not by ndim: the stacked blocks give every leaf a leading layer axis, so a
    per-layer norm scale is 2-D too.
    """

    def is_matrix(path: tuple, leaf: Any) -> bool:
        name = path[-1].name if isinstance(path[-1], jax.tree_util.GetAttrKey) else None
        return name in ("weight", "embed")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(params: Transformer, *, lr: float, warmup: int, steps: int,
                   weight_decay: float, clip: float) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup-cosine schedule (decay on matrices)."""
    schedule = lambda count: lr_at(count, peak=lr, warmup=warmup, total=steps)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                    weight_decay=weight_decay, mask=decay_mask(params)),
    )


def token_losses(model: Transformer, inputs: Int[Array, "batch seq"],
                 targets: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"]
                 ) -> Float[Array, "batch seq"]:
    """Next-token cross-entropy per position (float32)."""
    logits = model(inputs, segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _replace_state(grad_state: Any, old_state: Any) -> Any:
    """The new quant state: the state's cotangent where there is one, the old leaf elsewhere
    (leaves that are not differentiable, such as integer counters, get no cotangent)."""
    return jax.tree.map(lambda g, old: old if g is None else g, grad_state, old_state,
                        is_leaf=lambda x: x is None)


def make_train_step(optimizer: optax.GradientTransformation, *, peak_lr: float, warmup: int,
                    total_steps: int, state_shardings: TrainState | None = None,
                    max_traces: int | None = None,
                    ) -> Callable[[StepBatch, TrainState], tuple[TrainState, dict]]:
    """The jitted `step(batch, state) -> (state, metrics)`; `state` is donated.

    `state_shardings` (from `hpllm.sharding.tree_shardings`) pins the output layout to the
    input layout, so FSDP shards stay where they are and the donation can reuse the buffers.
    `max_traces` (tests) raises if the step is traced more often, i.e. if it recompiles.
    """

    def loss_of_micro_batch(diff: tuple, micro: StepBatch, n_tokens: Float[Array, ""]):
        params, quant_state = diff
        model = eqx.combine(params, quant_state)
        losses = token_losses(model, micro.inputs, micro.targets, micro.segment_ids)
        # Divided by the whole step's token count, so summing micro-batch gradients gives
        # exactly the gradient of the mean loss over the step.
        return jnp.sum(losses * micro.loss_mask) / n_tokens

    grad_fn = eqx.filter_value_and_grad(loss_of_micro_batch)

    def step(batch: StepBatch, state: TrainState) -> tuple[TrainState, dict]:
        n_tokens = jnp.maximum(jnp.sum(batch.loss_mask), 1.0)

        def accumulate(carry, micro):
            grads, loss, quant_state = carry
            micro_loss, (g_params, g_state) = grad_fn((state.params, quant_state), micro,
                                                     n_tokens)
            grads = jax.tree.map(jnp.add, grads, g_params)
            return (grads, loss + micro_loss, _replace_state(g_state, quant_state)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, jnp.float32(0.0), state.quant_state)
        (grads, loss, quant_state), _ = lax.scan(accumulate, carry, batch)
        grad_norm = optax.tree.norm(grads)
        # optax mixes Python floats with int32 counters (`b1 ** count`), which strict dtype
        # promotion (our test setting) rejects; the promotion it relies on is the standard one.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = eqx.apply_updates(state.params, updates)
        new_state = TrainState(params, quant_state, opt_state, state.step + 1)
        if state_shardings is not None:
            new_state = eqx.filter_shard(new_state, state_shardings)
        lr = lr_at(state.step, peak=peak_lr, warmup=warmup, total=total_steps)
        # The loss only vouches for the parameters it was computed with; this checks the
        # updated ones, so a diverging update is never saved.
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                           for leaf in jax.tree.leaves(params)]))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                           "params_finite": params_finite}

    if max_traces is not None:
        step = eqx.debug.assert_max_traces(step, max_traces=max_traces)
    return eqx.filter_jit(step, donate="all-except-first")


@eqx.filter_jit
def eval_step(model: Transformer, inputs: Int[Array, "batch seq"],
              targets: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"],
              loss_mask: Float[Array, "batch seq"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum of token losses, number of tokens) of one held-out batch."""
    losses = token_losses(model, inputs, targets, segment_ids)
    return jnp.sum(losses * loss_mask), jnp.sum(loss_mask)


def evaluate(model: Transformer, batches: Iterator, to_device: Callable) -> float:
    """Mean token loss over `batches` (host batches with inputs/targets/segment_ids/loss_mask)."""
    total, count = 0.0, 0.0
    for batch in batches:
        arrays = to_device(batch)
        loss_sum, n = eval_step(model, *arrays)
        total += float(loss_sum)
        count += float(n)
    return total / max(count, 1.0)


def stack_micro_batches(batches: list) -> dict[str, np.ndarray]:
    """Host batches (fields inputs/targets/segment_ids/loss_mask) -> arrays [accum, batch, seq]."""
    return {
        "inputs": np.stack([b.inputs for b in batches]).astype(np.int32),
        "targets": np.stack([b.targets for b in batches]).astype(np.int32),
        "segment_ids": np.stack([b.segment_ids for b in batches]).astype(np.int32),
        "loss_mask": np.stack([b.loss_mask for b in batches]).astype(np.float32),
    }


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A one-line progress bar on stderr: step, loss, tokens/s, ETA.

    On a terminal the line is redrawn in place (\\r); otherwise (a log file) a line is printed
    every `every` steps.
    """

    def __init__(self, total: int, stream: io.TextIOBase | None = None, every: int = 10):
        self.total, self.every = total, every
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()
        # The clock starts after the first step, which includes compilation.
        self.first: tuple[int, float] | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None = None
               ) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
            eta = "--"
        else:
            per_step = (now - self.first[1]) / max(step - self.first[0], 1)
            eta = format_duration(per_step * (self.total - step))
        width = 20
        filled = int(width * step / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {eta}")
        if eval_loss is not None:
            line += f" | eval {eval_loss:.4f} (ppl {perplexity(eval_loss):.1f})"
        if self.interactive:
            self.stream.write("\r" + line + "\033[K")
        elif step % self.every == 0 or step == self.total or eval_loss is not None:
            self.stream.write(line + "\n")
        self.stream.flush()


class NonFiniteLossError(UserError):
    """The loss, the gradient norm or the updated parameters became NaN or infinite.

    `first`: at the first step of this process, i.e. with the parameters it started from.
    """

    def __init__(self, step: int, loss: float, grad_norm: float, params_finite: bool,
                 first: bool):
        what = "loss" if params_finite else "parameters"
        super().__init__(f"non-finite {what} at step {step} (loss {loss}, grad norm "
                         f"{grad_norm}); training stopped without saving it")
        self.step, self.params_finite, self.first = step, params_finite, first


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def eval_record(loss: float) -> dict[str, float]:
    """The metrics fields of one evaluation."""
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def due(step: int, every: int, total: int) -> bool:
    """Every `every` steps and at the last step (never when `every` is 0)."""
    return every > 0 and (step % every == 0 or step == total)


def train_steps(state: TrainState,
                step_fn: Callable[[StepBatch, TrainState], tuple[TrainState, dict]],
                batches: Iterator, put_batch: Callable[[list], StepBatch], *, total_steps: int,
                grad_accum: int) -> Iterator[tuple[TrainState, dict[str, float]]]:
    """Run steps `state.step + 1 .. total_steps`, yielding `(state, record)` after each, with
    record = {step, loss, lr, grad_norm, tokens_per_s}. The caller evaluates, logs and saves
    between steps; that time is not counted in tokens_per_s.

    Raises NonFiniteLossError instead of yielding a state that went bad, so no caller can
    save one.
    """
    start = int(state.step)
    for step in range(start + 1, total_steps + 1):
        tick = time.perf_counter()
        host_batches = [next(batches) for _ in range(grad_accum)]
        tokens = sum(int(np.sum(b.loss_mask)) for b in host_batches)
        state, metrics = step_fn(put_batch(host_batches), state)
        # Reading the metrics waits for the step: a NaN is caught before it can be saved.
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        params_finite = bool(metrics["params_finite"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and params_finite):
            raise NonFiniteLossError(step, loss, grad_norm, params_finite, step == start + 1)
        yield state, {"step": step, "loss": loss, "lr": float(metrics["lr"]),
                      "grad_norm": grad_norm,
                      "tokens_per_s": tokens / (time.perf_counter() - tick)}
