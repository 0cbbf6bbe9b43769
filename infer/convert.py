"""`python -m infer convert`: a training checkpoint or a Hugging Face model folder -> an
inference checkpoint with quantized weights (int8 / packed int4 / fp8 values plus their scales,
or bf16).

A Hugging Face folder is converted one layer at a time (`hpllm.hf.load_weights`), so the float
model is never held whole; its tokenizer files (tokenizer.json, tokenizer_config.json,
generation_config.json) are copied, and config.json records the source architecture
("hf_architecture") for `export`.

The output folder holds config.json ({"format_version", "model", "weights": {"scheme",
"group_size"}, "source"}), model.safetensors and tokenizer.json. Embeddings and the LM head stay
float unless `--quantize-head` (then the LM head is quantized too and config.json lists the
"targets").
"""

import dataclasses
from pathlib import Path

from hpllm.checkpoint import CheckpointError, save_model
from hpllm.hf import is_hf_folder
from hpllm.hf_tokenizer import PretrainedTokenizer
from hpllm.quant import DEFAULT_TARGETS, WITH_HEAD
from infer.loading import check_scheme, load, load_hf_folder, quantize


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
    targets = WITH_HEAD if quantize_head else DEFAULT_TARGETS
    if is_hf_folder(source):
        loaded = load_hf_folder(source, scheme, group_size, quantize_head)
        if quantize_head and loaded.model.lm_head is None:
            raise ValueError("--quantize-head: this model ties its LM head to the embeddings")
        model = loaded.model
        bytes_before = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
    else:
        loaded = load(source)
        if loaded.scheme is not None:
            raise CheckpointError(f"{loaded.path} is already converted ({loaded.scheme}); "
                                  "convert from the training checkpoint instead")
        if quantize_head and loaded.model.lm_head is None:
            raise ValueError("--quantize-head: this model ties its LM head to the embeddings")
        model = quantize(loaded.model, scheme, group_size, targets)
        bytes_before = (loaded.path / "model.safetensors").stat().st_size
    files = {}
    if isinstance(loaded.tokenizer, PretrainedTokenizer):
        files.update(loaded.tokenizer.files)
    elif loaded.tokenizer is not None:
        files["tokenizer.json"] = loaded.tokenizer.to_json()
    weights = {"scheme": scheme, "group_size": group_size}
    if quantize_head:
        weights["targets"] = list(targets)
    extra = {"weights": weights,
             "source": str(loaded.path)}
    if loaded.architecture is not None:
        extra["hf_architecture"] = loaded.architecture
    out = save_model(Path(out), model, extra, files)
    return ConvertResult(out, loaded.path, bytes_before,
                         (out / "model.safetensors").stat().st_size)
