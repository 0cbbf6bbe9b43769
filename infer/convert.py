"""`python -m infer convert`: a training checkpoint -> an inference checkpoint with quantized
weights (int8 / packed int4 / fp8 values plus their scales, or bf16).

The output folder holds config.json ({"format_version", "model", "weights": {"scheme",
"group_size"}, "source"}), model.safetensors and tokenizer.json. Embeddings and the LM head stay
float unless `--quantize-head` (then the LM head is quantized too and config.json lists the
"targets").
"""

import dataclasses
from pathlib import Path

from hpllm.checkpoint import CheckpointError, save_model
from hpllm.quant import DEFAULT_TARGETS, WITH_HEAD
from infer.loading import check_scheme, load, quantize


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    out: Path
    source: Path
    bytes_before: int
    bytes_after: int


def convert(source: str | Path, scheme: str, out: str | Path, group_size: int = 128,
            quantize_head: bool = False) -> ConvertResult:
    """Quantize the model at `source` to `scheme` and write it to `out` (atomically)."""
    check_scheme(scheme)
    if group_size not in (32, 64, 128):
        raise ValueError(f"--group-size must be 32, 64 or 128, got {group_size}")
    loaded = load(source)
    if loaded.scheme is not None:
        raise CheckpointError(f"{loaded.path} is already converted ({loaded.scheme}); convert "
                              "from the training checkpoint instead")
    if quantize_head and loaded.model.lm_head is None:
        raise ValueError("--quantize-head: this model ties its LM head to the embeddings")
    targets = WITH_HEAD if quantize_head else DEFAULT_TARGETS
    model = quantize(loaded.model, scheme, group_size, targets)
    files = {}
    if loaded.tokenizer is not None:
        files["tokenizer.json"] = loaded.tokenizer.to_json()
    weights = {"scheme": scheme, "group_size": group_size}
    if quantize_head:
        weights["targets"] = list(targets)
    extra = {"weights": weights,
             "source": str(loaded.path)}
    out = save_model(Path(out), model, extra, files)
    return ConvertResult(out, loaded.path, (loaded.path / "model.safetensors").stat().st_size,
                         (out / "model.safetensors").stat().st_size)
