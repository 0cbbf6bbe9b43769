"""Model configuration: one frozen dataclass shared by training, conversion and inference."""

import dataclasses
import json
from typing import Any

# The short names the command lines take for a compute dtype, and the dtypes they stand for.
DTYPE_ALIASES = {"f32": "float32", "bf16": "bfloat16"}
COMPUTE_DTYPES = tuple(DTYPE_ALIASES.values())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

    Parameters are always stored in float32; `compute_dtype` is the dtype that activations and
    matmul operands are cast to (bfloat16 halves the bytes moved, float32 is faster on CPUs
    without native bf16 arithmetic).
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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Exact number of parameters (every weight, norms included)."""
        d, hd = self.d_model, self.head_dim
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o, k, v
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
}


def preset(name: str) -> ModelConfig:
    """The named preset; a ValueError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
