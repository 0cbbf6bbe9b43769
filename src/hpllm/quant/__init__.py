"""Quantization: quantizers, QAT (fake-quant) ops, real int8/fp8 matmuls, weight-only
inference ops, and the model-level API. See docs/numerics.md for the numerics and figures.

Files by job: `quantizers` (int8/fp8/int4 scaling, packing, delayed-scaling state),
`fake_quant` (QAT ops with straight-through gradients), `integer` (int8 x int8 -> int32 and
fp8 x fp8 matmuls, and the W8A8 op), `weight_only` (quantized weight tensors and inference
ops), `api` (the vocabulary, QuantConfig and the tree maps over a model). The package exports
the model-level API, the ops and the weight formats; the numerics underneath (`int8_dot`,
`fake_quant_ste`, the quantizers) are imported from their modules.
"""

from hpllm.quant.api import (
    DEFAULT_TARGETS,
    GROUP_SIZES,
    MODES,
    SCHEMES,
    TRAINING_MODE_HELP,
    TRAINING_MODES,
    WITH_HEAD,
    QuantConfig,
    inference_mismatch,
    inference_scheme,
    linear_paths,
    quantize_for_training,
    quantize_weights,
    split_quant_state,
    strip_training_quant,
    training_op,
)
from hpllm.quant.fake_quant import Fp8QATDot, Int4WeightQATDot, Int8QATDot
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

__all__ = [
    "DEFAULT_TARGETS", "GROUP_SIZES", "MODES", "SCHEMES", "TRAINING_MODES",
    "TRAINING_MODE_HELP", "WITH_HEAD", "DelayedScale", "Fp8QATDot",
    "Fp8Weight", "Fp8WeightOnlyDot", "Int4Weight", "Int4WeightOnlyDot", "Int4WeightQATDot",
    "Int8QATDot", "Int8Weight", "Int8WeightOnlyDot", "QuantConfig", "W4A8Dot", "W8A8Dot",
    "inference_mismatch", "inference_scheme", "linear_paths",
    "quantize_for_training", "quantize_weights", "split_quant_state", "strip_training_quant",
    "training_op",
]
