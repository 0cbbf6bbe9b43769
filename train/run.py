"""Setting up a training run from its settings: `build_run(settings) -> Run`.

Everything a run needs before its first step (checked settings, device mesh, data, tokenizer,
initial or resumed train state, held-out batches, the jitted step) is built here, in one place,
and nothing is written to disk. `python -m train` and bench/qat_study.py both start their runs
with `build_run`, then drive the steps themselves (`train.loop.train_steps`).
"""

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hpllm.checkpoint import FORMAT_VERSION, CheckpointError
from hpllm.config import ModelConfig
from hpllm.errors import UserError
from hpllm.hf_tokenizer import AnyTokenizer, read_tokenizer
from hpllm.model import Transformer
from hpllm.quant import QuantConfig, quantize_for_training, split_quant_state
from hpllm.sharding import check_batch_divisible, make_mesh, shard_batch, shard_tree
from train.batches import Batch, TrainBatches, eval_batches
from train.checkpointing import load_training_checkpoint, open_init_source
from train.loop import (
    StepBatch,
    TrainState,
    evaluate,
    make_optimizer,
    make_train_step,
    stack_micro_batches,
)
from train.settings import Settings, UsageError, validate
from train.sources import Splits, get_tokenizer, open_splits

EVAL_FIELDS = ("inputs", "targets", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run ready for its next step; nothing of it is on disk yet."""

    settings: Settings
    model_config: ModelConfig
    quant: QuantConfig
    mesh: Mesh
    splits: Splits
    tokenizer: AnyTokenizer
    state: TrainState
    data_state: dict[str, Any] | None  # the batch position of a resumed checkpoint
    held_out: list[Batch]  # the same batches at every evaluation: packed once
    step_fn: Any
    hf_architecture: str | None = None  # of a model imported from Hugging Face (for export)

    def config(self) -> dict[str, Any]:
        """OUT/config.json: every resolved setting."""
        config = {"format_version": FORMAT_VERSION, "model": self.model_config.to_dict(),
                  "quant": self.quant.to_dict(), "train": self.settings.to_dict(),
                  "devices": len(self.mesh.devices.flat)}
        if self.hf_architecture is not None:
            config["hf_architecture"] = self.hf_architecture
        return config

    def batches(self) -> TrainBatches:
        s = self.settings
        return TrainBatches(self.splits.train, self.tokenizer, s.seq_len, s.batch_size,
                            seed=s.seed, state=self.data_state)

    def put_batch(self, host_batches: list[Batch]) -> StepBatch:
        arrays = stack_micro_batches(host_batches)
        return StepBatch(**{k: shard_batch(v, self.mesh, batch_axis=1)
                            for k, v in arrays.items()})

    def evaluate(self, model: Transformer) -> float:
        """Mean token loss of `model` on the held-out batches."""
        def put(batch: Batch) -> list[jax.Array]:
            arrays = stack_micro_batches([batch])
            return [shard_batch(arrays[k][0], self.mesh) for k in EVAL_FIELDS]

        return evaluate(model, iter(self.held_out), put)


def quant_config(settings: Settings) -> QuantConfig:
    """The QuantConfig of `--quant` and `--quant-group-size`."""
    return QuantConfig.named(settings.quant, group_size=settings.quant_group_size)


def initial_state(cfg: ModelConfig, qcfg: QuantConfig, settings: Settings,
                  model: Transformer | None = None) -> TrainState:
    """Step 0 of a run: `model` (float; default: random from the seed) under `qcfg`, and a
    fresh optimizer."""
    if model is None:
        model = Transformer(cfg, key=jax.random.key(settings.seed))
    model = quantize_for_training(model, qcfg)
    params, quant_state = split_quant_state(model)
    optimizer = optimizer_for(params, settings)
    return TrainState(params, quant_state, optimizer.init(params), jnp.zeros((), jnp.int32))


def optimizer_for(params: Transformer, settings: Settings):
    return make_optimizer(params, lr=settings.lr, warmup=settings.warmup, steps=settings.steps,
                          weight_decay=settings.weight_decay, clip=settings.clip)


def read_checkpoint_tokenizer(checkpoint: Path) -> AnyTokenizer:
    try:
        return read_tokenizer(checkpoint)
    except (OSError, ValueError, UserError) as error:
        raise CheckpointError(f"{checkpoint}: {error}") from None


def build_run(settings: Settings, *, resume_from: Path | None = None,
              quant: QuantConfig | None = None, tokenizer: AnyTokenizer | None = None,
              devices: list | None = None) -> Run:
    """Check `settings` and build the run: from checkpoint `resume_from` if given, else from
    the weights of `settings.init_from` (fresh optimizer, step 0), else from scratch. `quant`
    refines the settings' quant mode (amax history, targets...); `tokenizer` replaces the one
    the settings would train or load; `devices` (default: all) make the mesh."""
    cfg = validate(settings)
    qcfg = quant_config(settings) if quant is None else quant
    if qcfg.name != settings.quant:
        raise UsageError(f"quant config mode {qcfg.name!r} differs from --quant "
                         f"{settings.quant!r}")
    if qcfg.mode in ("int4w", "w4a8") and qcfg.group_size != settings.quant_group_size:
        raise UsageError(f"quant config group size {qcfg.group_size} differs from "
                         f"--quant-group-size {settings.quant_group_size}")
    mesh = make_mesh(devices)
    try:
        check_batch_divisible(settings.batch_size, mesh)
    except ValueError as error:
        raise UsageError(str(error)) from None

    splits = open_splits(settings.data, data_config=settings.data_config, split=settings.split,
                         text_column=settings.text_column, encoding=settings.encoding)
    if resume_from is not None:
        tokenizer = read_checkpoint_tokenizer(resume_from)
    elif tokenizer is None:
        tokenizer = get_tokenizer(settings.tokenizer, splits.train, cfg.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {cfg.vocab_size}; pass --vocab-size {tokenizer.vocab_size}")

    data_state, hf_architecture = None, None
    if resume_from is None and settings.init_from is not None:
        source = open_init_source(settings.init_from)
        if cfg.replace(compute_dtype=source.model.compute_dtype) != source.model:
            raise UsageError(f"--init-from {source.path}: its model {source.model} differs from "
                             f"this run's {cfg}; leave out --preset and --vocab-size")
        state = initial_state(cfg, qcfg, settings, source.load(cfg))
        hf_architecture = source.hf_architecture
    elif resume_from is None:
        state = initial_state(cfg, qcfg, settings)
    else:
        skeleton = eqx.filter_eval_shape(initial_state, cfg, qcfg, settings)
        state, data_state, saved = load_training_checkpoint(resume_from, skeleton)
        hf_architecture = saved.get("hf_architecture")
    state = shard_tree(state, mesh)
    held_out = eval_batches(splits.validation, tokenizer, settings.seq_len, settings.batch_size,
                            max_batches=settings.eval_batches)
    step_fn = make_train_step(optimizer_for(state.params, settings), peak_lr=settings.lr,
                              warmup=settings.warmup, total_steps=settings.steps,
                              state_shardings=jax.tree.map(lambda x: x.sharding, state))
    return Run(settings, cfg, qcfg, mesh, splits, tokenizer, state, data_state, held_out,
               step_fn, hf_architecture)

