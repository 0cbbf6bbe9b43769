"""hpllm: a Llama-style decoder in JAX + Equinox, shared by `train` and `infer`."""

from hpllm.config import PRESETS, ModelConfig, preset
from hpllm.kvcache import KVCache
from hpllm.linear import FloatDot, Linear, MatmulOp
from hpllm.model import Transformer

__all__ = ["PRESETS", "FloatDot", "KVCache", "Linear", "MatmulOp", "ModelConfig", "Transformer",
           "preset"]
