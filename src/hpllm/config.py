"""Model configuration: one frozen dataclass shared by training, conversion and inference."""

import dataclasses
import json
from typing import Any

# The short names the command lines take for a compute dtype, and the dtypes they stand for.
DTYPE_ALIASES = {"f32": "float32", "bf16": "bfloat16"}
COMPUTE_DTYPES = tuple(DTYPE_ALIASES.values())
ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Stretching of the RoPE frequencies for contexts beyond the pretraining length, as
    Hugging Face configs describe it (`rope_scaling` / `rope_parameters`).

    kind "linear": every frequency divided by `factor` (positions interpolated).
    kind "llama3" (Llama 3.1/3.2): wavelengths longer than `original_max_position /
    low_freq_factor` are divided by `factor`, those shorter than `original_max_position /
    high_freq_factor` are kept, and the band between is interpolated smoothly.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling kind must be one of {ROPE_SCALINGS}, got "
                             f"{self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling factor must be positive, got {self.factor!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0, "
                             f"got {self.high_freq_factor!r} and {self.low_freq_factor!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

    Parameters are always stored in float32; `compute_dtype` is the dtype that activations and
    matmul operands are cast to (bfloat16 halves the bytes moved, float32 is faster on CPUs
    without native bf16 arithmetic).

    The fields after `compute_dtype` describe imported (Hugging Face) architectures; their
    defaults are what models trained here use, so config.json files written before they existed
    load unchanged. `explicit_head_dim` (None: d_model / n_heads) allows heads whose width
    differs from d_model / n_heads; `qkv_bias` / `out_bias` add biases to the query/key/value
    and output projections (Qwen2: qkv only; Llama's attention_bias: both); `rope_scaling`
    stretches the RoPE frequencies; `scale_tied_head` divides the tied LM head by
    sqrt(d_model), which models trained here use so that unit-RMS embeddings give unit logits
    and imported models do not.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    compute_dtype: str = "float32"
    explicit_head_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    rope_scaling: RopeScaling | None = None
    scale_tied_head: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.explicit_head_dim is not None and (
                not isinstance(self.explicit_head_dim, int) or self.explicit_head_dim <= 0):
            raise ValueError(f"explicit_head_dim must be a positive integer or null, got "
                             f"{self.explicit_head_dim!r}")
        if self.explicit_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim ({self.head_dim}) must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")

        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")

    @property
    def head_dim(self) -> int:
        if self.explicit_head_dim is not None:
            return self.explicit_head_dim
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Exact number of parameters (every weight, norms included)."""
        d, hd = self.d_model, self.head_dim
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o, k, v
        if self.qkv_bias:
            attention += (self.n_heads + 2 * self.n_kv_heads) * hd
        if self.out_bias:
            attention += d
        mlp = 3 * d * self.d_ff  # gate, up, down
        block = attention + mlp + 2 * d  # two RMSNorm scales
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embed + self.n_layers * block + d + head

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, ModelConfig] = {
    # For tests: compiles in seconds, about 0.16M parameters.
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=176, max_seq_len=128),
    # The default training run: about 10.5M parameters, a few minutes on 2 CPU cores.
    "small": ModelConfig(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4,
                         d_ff=768, max_seq_len=256),
    # For speed comparisons with other engines: 134M parameters, untied LM head.
    "base": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=1024),
    # The shape of TinyLlama 1.1B (a 1B-class model people run), for decode-speed figures.
    "1b": ModelConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                      d_ff=5632, max_seq_len=2048),
}


def preset(name: str) -> ModelConfig:
    """The named preset; a ValueError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
