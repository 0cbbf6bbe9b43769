"""The training step and loop, in process with stand-in batches (no data pipeline)."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.quant import QuantConfig, quantize_for_training, split_quant_state
from hpllm.sharding import make_mesh, shard_batch, shard_tree, tree_shardings
from train.loop import (
    FINAL_LR_RATIO,
    NonFiniteLossError,
    StepBatch,
    TrainState,
    decay_mask,
    lr_at,
    make_optimizer,
    make_train_step,
    stack_micro_batches,
    train_steps,
)

TINY = preset("tiny")
SEQ = 32


@dataclasses.dataclass(frozen=True)
class HostBatch:
    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray


def random_batches(batch: int, seed: int = 0):
    """Endless batches of a learnable stream: each row counts up, wrapping with a small period."""
    rng = np.random.default_rng(seed)
    while True:
        # Only the first 16 ids occur: even a few steps learn that (loss log 512 -> log 16).
        start = rng.integers(0, 8, size=(batch, 1))
        period = rng.integers(3, 9, size=(batch, 1))
        tokens = (start + np.arange(SEQ + 1)[None, :] % period).astype(np.int32)
        segments = np.zeros((batch, SEQ), np.int32)
        segments[:, SEQ // 2:] = 1  # two documents per row, so the segment mask is exercised
        yield HostBatch(tokens[:, :-1], tokens[:, 1:], segments, np.ones((batch, SEQ), np.float32))


def initial_state(quant: str = "none", *, steps: int = 10, lr: float = 3e-3):
    model = quantize_for_training(Transformer(TINY, key=jax.random.key(0)), QuantConfig(mode=quant))
    params, quant_state = split_quant_state(model)
    optimizer = make_optimizer(params, lr=lr, warmup=2, steps=steps, weight_decay=0.1, clip=1.0)
    state = TrainState(params, quant_state, optimizer.init(params), jnp.zeros((), jnp.int32))
    return state, optimizer


def run_steps(n: int, *, devices, micro_batches: list[list[HostBatch]], quant: str = "none"):
    """n steps on a mesh over `devices`; returns (losses, final state)."""
    mesh = make_mesh(devices)
    state, optimizer = initial_state(quant, steps=n)
    state = shard_tree(state, mesh)
    # One trace for the whole run: nothing recompiles after the first step.
    step = make_train_step(optimizer, peak_lr=3e-3, warmup=2, total_steps=n,
                           state_shardings=jax.tree.map(lambda x: x.sharding, state),
                           max_traces=1)
    losses = []
    for host in micro_batches[:n]:
        arrays = stack_micro_batches(host)
        batch = StepBatch(**{k: shard_batch(v, mesh, batch_axis=1) for k, v in arrays.items()})
        state, metrics = step(batch, state)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_lr_schedule_matches_formula():
    peak, warmup, total = 1e-3, 10, 110
    for step in (0, 5, 9, 10, 60, 109, 110, 200):
        if step < warmup:
            want = peak * (step + 1) / warmup
        else:
            progress = min((step - warmup) / (total - warmup), 1.0)
            want = peak * (FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(
                math.pi * progress)))
        got = float(lr_at(step, peak=peak, warmup=warmup, total=total))
        assert got == pytest.approx(want, rel=1e-6), step  # float32 vs float64 formula


def test_weight_decay_only_on_matrices(key):
    params = eqx.filter(Transformer(TINY, key=key), eqx.is_array)
    mask = decay_mask(params)
    assert mask.embed and mask.blocks.attn.wq.weight and mask.lm_head.weight
    assert mask.blocks.mlp.w_down.weight
    # Stacked norm scales are 2-D [layers, d_model] but are not matrices.
    assert mask.blocks.attn_norm.scale is False and mask.final_norm.scale is False


def test_loss_decreases_and_step_traces_once():
    batches = random_batches(8)
    micro = [[next(batches)] for _ in range(12)]
    losses, state = run_steps(12, devices=jax.devices()[:1], micro_batches=micro)
    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), rel=0.05)  # near-uniform at init
    assert np.mean(losses[-3:]) < losses[0] - 0.3
    assert int(state.step) == 12


def test_gradient_accumulation_equals_the_big_batch():
    """2 micro-batches of 4 rows == 1 batch of the same 8 rows."""
    batches = random_batches(8)
    big = [next(batches) for _ in range(3)]

    def halves(b):
        return [HostBatch(*(getattr(b, f.name)[rows] for f in dataclasses.fields(b)))
                for rows in (slice(0, 4), slice(4, 8))]

    loss_big, state_big = run_steps(3, devices=jax.devices()[:1], micro_batches=[[b] for b in big])
    loss_acc, state_acc = run_steps(3, devices=jax.devices()[:1],
                                    micro_batches=[halves(b) for b in big])
    # Same maths, different summation order (two partial sums): float32 rounding only,
    # ~1e-7 relative per op; Adam's normalisation keeps updates O(lr), so 1e-5 is ample.
    np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_acc.params), jax.tree.leaves(state_big.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_four_device_mesh_matches_one_device():
    assert len(jax.devices()) == 4, "conftest.py forces 4 host devices"
    batches = random_batches(8)
    micro = [[next(batches)] for _ in range(4)]
    loss_1, state_1 = run_steps(4, devices=jax.devices()[:1], micro_batches=micro)
    loss_4, state_4 = run_steps(4, devices=jax.devices(), micro_batches=micro)
    # The FSDP run computes the same sums split over 4 devices (partial sums + all-reduce):
    # only the float32 summation order differs. Over 4 AdamW steps such 1e-7-relative
    # differences stay below 1e-5 in the loss; parameters move by ~lr per step, and an update
    # m/sqrt(v) of a near-zero gradient can differ in its last bits, hence atol 1e-5 (0.3% of
    # the 4 * 3e-3 total movement).
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_4.params), jax.tree.leaves(state_1.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # The parameters really are sharded: the largest weights are split 4 ways.
    wq = state_4.params.blocks.attn.wq.weight
    assert [shard.data.shape for shard in wq.addressable_shards] == [(2, 16, 64)] * 4


def test_parameter_sharding_rule():
    mesh = make_mesh(jax.devices())
    shardings = tree_shardings(eqx.filter(Transformer(TINY, key=jax.random.key(0)),
                                          eqx.is_array), mesh)
    # [layers=2, 64, 176]: 176 is the largest axis divisible by 4.
    assert shardings.blocks.mlp.w_gate.weight.spec == P(None, None, "data")
    assert shardings.embed.spec == P("data", None)  # [512, 64]
    assert shardings.final_norm.scale.spec == P()  # 64 floats: replicated


def steps_of(state, step_fn, batches, *, total):
    """train_steps on one device."""
    mesh = make_mesh(jax.devices()[:1])

    def put(host):
        arrays = stack_micro_batches(host)
        return StepBatch(**{k: shard_batch(v, mesh, batch_axis=1) for k, v in arrays.items()})

    return train_steps(state, step_fn, batches, put, total_steps=total, grad_accum=1)


def save_every(steps, every: int, *, out: tuple[list[int], list[dict]]):
    """Drive `steps` like the CLI does: log each record into out[1], save every `every` steps
    (the saved steps go into out[0])."""
    saved, records = out
    for state, record in steps:
        records.append(record)
        if record["step"] % every == 0:
            saved.append(int(state.step))


@pytest.fixture(scope="module")
def shared_step():
    """One compiled step (10-step schedule) shared by the loop tests."""
    state, optimizer = initial_state(steps=10)
    return make_train_step(optimizer, peak_lr=3e-3, warmup=2, total_steps=10)


def test_non_finite_loss_stops_before_saving(shared_step):
    def step_going_bad(batch, state):
        state, metrics = shared_step(batch, state)
        if int(state.step) == 4:
            metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
        return state, metrics

    saved, records = [], []
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
        save_every(steps_of(initial_state(steps=10)[0], step_going_bad, random_batches(4),
                            total=10), 2, out=(saved, records))
    assert saved == [2]  # the good checkpoint at step 2; nothing yielded at or after 4
    assert [r["step"] for r in records] == [1, 2, 3]


def test_diverging_update_is_never_saved():
    """An infinite learning rate: the loss of step 1 is still finite (it used the initial
    parameters), but the parameters it leaves are not, so nothing may be saved."""
    state, optimizer = initial_state(steps=10, lr=float("inf"))
    step_fn = make_train_step(optimizer, peak_lr=float("inf"), warmup=2, total_steps=10)
    saved, records = [], []
    with pytest.raises(NonFiniteLossError, match="non-finite parameters at step 1"):
        save_every(steps_of(state, step_fn, random_batches(4), total=10), 1,
                   out=(saved, records))
    assert saved == [] and records == []


def test_stopping_between_steps_keeps_the_state_of_the_last_step(shared_step):
    """The caller decides when to stop (Ctrl-C in the CLI): the state it holds is the one of
    the last record it saw, and the records carry the documented fields."""
    records = []
    for state, record in steps_of(initial_state(steps=10)[0], shared_step, random_batches(4),
                                  total=10):
        records.append(record)
        if len(records) == 3:
            last = state
            break
    assert int(last.step) == 3 and [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert all(r["tokens_per_s"] > 0 for r in records)


def test_fp8_delayed_scaling_state_advances_once_per_micro_batch():
    """The step replaces the quant state by its cotangent: 2 steps x 2 micro-batches record
    4 amax values per operand, newest first, and leave the rest of the history empty."""
    batches = random_batches(4)
    micro = [[next(batches), next(batches)] for _ in range(2)]
    _, state = run_steps(2, devices=jax.devices()[:1], micro_batches=micro, quant="fp8")
    history = np.asarray(state.quant_state.blocks.attn.wq.op.x_scale.history)
    assert history.shape == (TINY.n_layers, 16)
    assert np.all(history[:, :4] > 0) and np.all(history[:, 4:] == 0)
    # The optimizer never saw the state: it holds parameters only.
    assert state.params.blocks.attn.wq.op.x_scale.history is None
