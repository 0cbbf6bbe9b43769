"""Model-level quantization: pure tree maps over the `Linear`s of a model.

- `quantize_for_training(model, QuantConfig)` swaps the op of each targeted `Linear` for a
  fake-quant (QAT) op; weights stay float32 parameters.
- `split_quant_state(model)` separates non-parameter state (fp8 delayed-scaling amax
  histories and scales) from parameters. The gradient w.r.t. the state is the new state
  (see fake_quant.py), so a train step is:

      params, state = split_quant_state(model)
      (loss, aux), (g_params, new_state) = eqx.filter_value_and_grad(
          lambda ps, batch: loss_fn(eqx.combine(*ps), batch), has_aux=True)((params, state), batch)
      updates, opt_state = optim.update(g_params, opt_state, params)
      params, state = eqx.apply_updates(params, updates), new_state

- `quantize_weights(model, scheme)` converts for inference: targeted `Linear`s get a quantized
  weight tensor and the matching weight-only op. It reads `Linear.weight` as floats whatever
  the op, so QAT-trained models convert directly; it also works under `eqx.filter_eval_shape`
  (skeletons for loading checkpoints).

Layers are chosen by `fnmatch` patterns over their dotted paths (`blocks.attn.wq`,
`blocks.mlp.w_down`, `lm_head`); the default targets every `Linear` in the blocks, keeping the
embedding and the LM head in float (they are small next to the blocks and most sensitive).
`Linear`s inside `Transformer.blocks` have a leading layer axis; ops and quantized weights get
the same leading axis, so `lax.scan` slices them with the weights.
"""

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from hpllm.linear import FloatDot, Linear, MatmulOp
from hpllm.quant.fake_quant import (
    ACTIVATION_AXES,
    QAT_OPS,
    Fp8QATDot,
    Int4WeightQATDot,
    Int8QATDot,
)
from hpllm.quant.integer import W4A8Dot, W8A8Dot
from hpllm.quant.quantizers import DelayedScale
from hpllm.quant.weight_only import (
    Fp8Weight,
    Fp8WeightOnlyDot,
    Int4Weight,
    Int4WeightOnlyDot,
    Int8Weight,
    Int8WeightOnlyDot,
)

# The project's quantization vocabulary, defined once: both command lines take their choices
# from here. Training modes are the fake-quant (QAT) ops of `training_op`; inference schemes
# are the weight formats of `quantize_weights`; `inference_scheme` maps the one to the other.
MODES = ("none", "int8", "fp8", "int4w", "w4a8")
SCALINGS = ("delayed", "current")
SCHEMES = ("f32", "bf16", "int8", "int4", "fp8", "w8a8", "w4a8")
# What `python -m train --quant` offers: each name is one QuantConfig (`QuantConfig.named`).
TRAINING_MODES = {
    "none": {"mode": "none"},
    "int8": {"mode": "int8"},
    "fp8": {"mode": "fp8", "scaling": "delayed"},
    "fp8-current": {"mode": "fp8", "scaling": "current"},
    "int4w": {"mode": "int4w"},
    "w4a8": {"mode": "w4a8"},
}
TRAINING_MODE_HELP = {
    "none": "float matmuls",
    "int8": "int8 activations per token and weights per channel (converts to w8a8)",
    "fp8": "e4m3 activations and weights per tensor, delayed scaling (converts to fp8 "
           "weight-only)",
    "fp8-current": "like fp8 with current (per-step) scaling",
    "int4w": "int4 weights in groups of --quant-group-size, float activations (converts to "
             "int4)",
    "w4a8": "int4 weights in groups as int4w, int8 activations per token (converts to w4a8)",
}
# int4 group sizes along d_in offered on both command lines; 0 = one group per output channel.
GROUP_SIZES = (32, 64, 128, 0)
# The layer weights; "lm_head" is added on request (the embeddings always stay float).
DEFAULT_TARGETS = ("blocks.*",)
WITH_HEAD = (*DEFAULT_TARGETS, "lm_head")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized during training (saved with every checkpoint).

    mode: "none" | "int8" (int8 activations per token + weights per channel) | "fp8" (e4m3
        activations and weights) | "int4w" (int4 group-wise weights, float activations) |
        "w4a8" (int4 group-wise weights, int8 activations per token).
    scaling: fp8 only - "delayed" (scale from an amax history, Transformer Engine's recipe)
        or "current" (each tensor's own amax).
    amax_history_len: steps of amax history kept for delayed scaling.
    quantize_backward: also quantize the incoming gradient of the backward matmuls (int8
        per row/column in int8 mode, e5m2 in fp8 mode).
    mask_clipped_grads: zero the straight-through gradient where the forward clipped; fp8
        delayed scaling only (absmax scaling never clips, so elsewhere it is an error).
    group_size: int4 group size along d_in (0: one group per output channel).
    targets: fnmatch patterns over the dotted paths of the `Linear`s to quantize.
    activations: int8 mode only: activation scales "token" (one per row)
        or "tensor" (one for the whole activation tensor of each call; a study setting,
        no inference op computes it).
    weight_bits: modes "int4w" and "w4a8" only: 4, or 3 / 2 for the narrower grids [-3, 3] /
        [-1, 1] (a study setting: inference stores int4, see `inference_mismatch`).
    """

    mode: str = "none"
    scaling: str = "delayed"
    amax_history_len: int = 16
    quantize_backward: bool = False
    mask_clipped_grads: bool = False
    group_size: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS
    activations: str = "token"
    weight_bits: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        for name, least in (("amax_history_len", 1), ("group_size", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.group_size % 2:
            raise ValueError(f"group_size must be even (two int4 per byte) or 0 (per "
                             f"channel), got {self.group_size}")
        for name in ("quantize_backward", "mask_clipped_grads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantize_backward and self.mode not in ("int8", "fp8"):
            raise ValueError("quantize_backward applies to modes 'int8' and 'fp8' only, "
                             f"not {self.mode!r}")
        if self.mask_clipped_grads and not (self.mode == "fp8" and self.scaling == "delayed"):
            raise ValueError("mask_clipped_grads applies to fp8 delayed scaling only: absmax "
                             f"scaling never clips, so with mode {self.mode!r} and scaling "
                             f"{self.scaling!r} it would do nothing")
        if self.activations not in ACTIVATION_AXES:
            raise ValueError(f"activations must be one of {tuple(ACTIVATION_AXES)}, got "
                             f"{self.activations!r}")
        if self.activations != "token" and self.mode != "int8":
            raise ValueError(f"activations applies to mode 'int8' only, not {self.mode!r}")
        if self.weight_bits not in (2, 3, 4) or isinstance(self.weight_bits, bool):
            raise ValueError(f"weight_bits must be 2, 3 or 4, got {self.weight_bits!r}")
        if self.weight_bits != 4 and self.mode not in ("int4w", "w4a8"):
            raise ValueError("weight_bits applies to modes 'int4w' and 'w4a8' only, not "
                             f"{self.mode!r}")
        if isinstance(self.targets, str) or not all(
                isinstance(t, str) and t for t in self.targets) or not self.targets:
            raise ValueError(f"targets must be a non-empty list of patterns such as "
                             f"{list(DEFAULT_TARGETS)}, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @classmethod
    def named(cls, name: str, **fields: Any) -> "QuantConfig":
        """The config of `python -m train --quant NAME` (a key of TRAINING_MODES), with
        `fields` set too (group_size, targets...)."""
        if name not in TRAINING_MODES:
            raise ValueError(f"unknown training mode {name!r}; choose one of "
                             f"{', '.join(TRAINING_MODES)}")
        return cls(**TRAINING_MODES[name], **fields)

    @property
    def name(self) -> str:
        """The TRAINING_MODES name of this config ("fp8-current" for fp8 current scaling)."""
        return "fp8-current" if self.mode == "fp8" and self.scaling == "current" else self.mode

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {', '.join(unknown)}")
        data = dict(data)
        # Check JSON types here so a bad file gives a ValueError naming the field (a type
        # checker on __init__ would raise something less helpful).
        for field in dataclasses.fields(cls):
            if field.name not in data:
                continue
            value = data[field.name]
            if field.name == "targets":
                if not isinstance(value, list | tuple):
                    raise ValueError(f"targets must be a list of patterns, got {value!r}")
                data["targets"] = tuple(value)
            elif not isinstance(value, field.type) or (
                    field.type is int and isinstance(value, bool)):
                raise ValueError(f"{field.name} must be of type {field.type.__name__}, got "
                                 f"{value!r}")
        if data.get("mask_clipped_grads") and not (
                data.get("mode") == "fp8" and data.get("scaling", "delayed") == "delayed"):
            # Files from before this was an error: the flag did nothing there (absmax scaling
            # never clips), so dropping it loads the model that was trained.
            data["mask_clipped_grads"] = False
        return cls(**data)


def _is_linear(x: Any) -> bool:
    return isinstance(x, Linear)


def _path_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def linear_paths(model: eqx.Module) -> list[str]:
    """Dotted paths of every `Linear` in `model` (what `targets` patterns match against)."""
    found = []
    jax.tree_util.tree_map_with_path(
        lambda path, x: found.append(_path_name(path)) if _is_linear(x) else None,
        model, is_leaf=_is_linear)
    return found


def _map_targeted(model: eqx.Module, targets: tuple[str, ...],
                  fn: Callable[[Linear], Linear]) -> eqx.Module:
    """Apply `fn` to every `Linear` whose path matches a pattern in `targets`."""
    paths = linear_paths(model)
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(p, t) for p in paths)]
    if unmatched:
        raise ValueError(f"quantization targets {unmatched} match no Linear layer; "
                         f"the model has {paths}")

    def visit(path: tuple, x: Any) -> Any:
        name = _path_name(path)
        if _is_linear(x) and any(fnmatch.fnmatchcase(name, t) for t in targets):
            return fn(x)
        return x

    return jax.tree_util.tree_map_with_path(visit, model, is_leaf=_is_linear)


def _stacked(op: MatmulOp, lead: tuple[int, ...]) -> MatmulOp:
    """Give the op's array leaves the weight's leading (layer) axes `lead`, so `lax.scan`
    over a stacked `Linear` hands each layer its own state."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, lead + a.shape), op)


def _with(linear: Linear, weight: Any, op: MatmulOp) -> Linear:
    return eqx.tree_at(lambda lin: (lin.weight, lin.op), linear, (weight, op))


def _float_weight(linear: Linear) -> jax.Array:
    if not eqx.is_array(linear.weight):
        raise ValueError("this Linear's weight is already quantized for inference; convert "
                         "from the float (or QAT-trained) model instead")
    return linear.weight


def training_op(qcfg: QuantConfig) -> MatmulOp:
    """The QAT op for one (unstacked) `Linear` under `qcfg`."""
    if qcfg.mode == "int8":
        return Int8QATDot(quantize_backward=qcfg.quantize_backward,
                          mask_clipped_grads=qcfg.mask_clipped_grads,
                          activations=qcfg.activations)
    if qcfg.mode == "fp8":
        return Fp8QATDot(scaling=qcfg.scaling, amax_history_len=qcfg.amax_history_len,
                         quantize_backward=qcfg.quantize_backward,
                         mask_clipped_grads=qcfg.mask_clipped_grads)
    if qcfg.mode in ("int4w", "w4a8"):
        return Int4WeightQATDot(group_size=qcfg.group_size,
                                quantize_activations=qcfg.mode == "w4a8",
                                bits=qcfg.weight_bits)
    return FloatDot()


def inference_scheme(qcfg: QuantConfig) -> tuple[str, int]:
    """(scheme, group_size) of `quantize_weights` that runs what `qcfg` trained: the same
    weight quantization and, for int8 and w4a8, the same per-token int8 activations.

    fp8 has no inference op with quantized activations yet: it converts to fp8 weight-only
    (per-channel e4m3), which differs from the per-tensor fake quantization it trained with.
    """
    scheme = {"none": "f32", "int8": "w8a8", "fp8": "fp8", "int4w": "int4",
              "w4a8": "w4a8"}[qcfg.mode]
    return scheme, qcfg.group_size


def inference_mismatch(qcfg: QuantConfig) -> str | None:
    """What the format of `inference_scheme(qcfg)` does not reproduce of the QAT forward
    (None: it computes what was trained, up to rounding of the sums)."""
    if qcfg.weight_bits != 4:
        return (f"{qcfg.weight_bits}-bit weights are stored on the int4 grid, re-rounded from "
                "the trained float weights")
    if qcfg.activations != "token":
        return "the int8 inference ops scale activations per token, not per tensor"
    return None


def quantize_for_training(model: eqx.Module, qcfg: QuantConfig) -> eqx.Module:
    """Swap the op of every targeted `Linear` for the QAT op of `qcfg.mode` (weights are
    untouched); mode "none" returns the model unchanged."""
    if qcfg.mode == "none":
        return model
    op = training_op(qcfg)
    return _map_targeted(model, qcfg.targets,
                         lambda lin: _with(lin, lin.weight, _stacked(op, lin.weight.shape[:-2])))


def _is_state(x: Any) -> bool:
    return isinstance(x, DelayedScale)


def split_quant_state(model: eqx.Module) -> tuple[eqx.Module, eqx.Module]:
    """`(params, state)`: state holds the delayed-scaling leaves (all None when there are
    none), params everything else; `eqx.combine(params, state)` rebuilds the model."""
    spec = jax.tree.map(_is_state, model, is_leaf=_is_state)
    state, params = eqx.partition(model, spec)
    return params, state


def strip_training_quant(model: eqx.Module) -> eqx.Module:
    """Every QAT op back to `FloatDot` (drops delayed-scaling state)."""

    def strip(x: Any) -> Any:
        if _is_linear(x) and isinstance(x.op, QAT_OPS):
            return _with(x, x.weight, FloatDot())
        return x

    return jax.tree.map(strip, model, is_leaf=_is_linear)


def _convert(linear: Linear, scheme: str, group_size: int) -> Linear:
    w = _float_weight(linear)
    if scheme == "int8":
        return _with(linear, Int8Weight(w), Int8WeightOnlyDot())
    if scheme == "w8a8":
        return _with(linear, Int8Weight(w), W8A8Dot())
    if scheme == "int4":
        return _with(linear, Int4Weight(w, group_size), Int4WeightOnlyDot())
    if scheme == "w4a8":
        return _with(linear, Int4Weight(w, group_size), W4A8Dot())
    if scheme == "fp8":
        return _with(linear, Fp8Weight(w), Fp8WeightOnlyDot())
    if scheme == "bf16":
        return _with(linear, w.astype(jnp.bfloat16), FloatDot())
    return _with(linear, w.astype(jnp.float32), FloatDot())


def quantize_weights(model: eqx.Module, scheme: str, *, group_size: int = 128,
                     targets: tuple[str, ...] = DEFAULT_TARGETS) -> eqx.Module:
    """Inference conversion: targeted `Linear`s get `scheme` weights and the weight-only op.

    scheme: "int8" (per-channel) | "int4" (group-wise, `group_size` along d_in, packed; 0:
    per channel) | "fp8" (e4m3, per-channel) | "bf16" | "f32" | "w8a8" (int8 weights,
    activations quantized per token, int32 matmul) | "w4a8" (int4 weights as "int4",
    activations quantized per token, int32 matmul per group). QAT ops anywhere in the model
    become `FloatDot`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if group_size < 0 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 0 (0: per channel), got "
                         f"{group_size}")
    model = strip_training_quant(model)
    return _map_targeted(model, tuple(targets), lambda lin: _convert(lin, scheme, group_size))
