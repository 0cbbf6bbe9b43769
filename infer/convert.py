"""`python -m infer convert`: a training checkpoint or a Hugging Face model folder -> an
inference checkpoint with quantized weights (int8 / packed int4 / fp8 values plus their scales,
or bf16).

A Hugging Face folder is converted one layer at a time (`hpllm.hf.load_weights`), so the float
model is never held whole; its tokenizer files (tokenizer.json, tokenizer_config.json,
generation_config.json) are copied, and config.json records the source architecture
("hf_architecture") for `export`.

With no scheme, the checkpoint's QAT config decides (`hpllm.quant.inference_scheme`): the
converted model runs what was trained - the same weight quantization and group size, and
per-token int8 activations after int8 or w4a8 QAT. Another scheme is allowed, with a note.

The output folder holds config.json ({"format_version", "model", "weights": {"scheme",
"group_size"}, "source"}), model.safetensors, tokenizer.json and manifest.json. Embeddings and
the LM head stay float unless `--quantize-head` (then the LM head is quantized too and
config.json lists the "targets").

`--out` follows `hpllm.outputs.check_output`: never the input, inside it or around it, never a
training run, never an existing non-empty folder, except that `force` replaces an earlier
conversion (a folder holding only what convert writes). While converting, the output path is
locked (`hpllm.locking.output_lock`), so a second convert to the same `--out` is refused with
the first one's PID; the result appears by one rename, complete or not at all.
"""

import dataclasses
from pathlib import Path

from hpllm.checkpoint import CheckpointError, save_model
from hpllm.errors import PathError, UserError
from hpllm.hf import is_hf_folder
from hpllm.hf_tokenizer import PretrainedTokenizer
from hpllm.locking import output_lock
from hpllm.outputs import check_output
from hpllm.quant import (
    DEFAULT_TARGETS,
    WITH_HEAD,
    QuantConfig,
    inference_mismatch,
    inference_scheme,
)
from infer.loading import (
    GROUP_SIZES,
    check_scheme,
    input_paths,
    is_converted_checkpoint,
    load,
    load_hf_folder,
    quantize,
)


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    out: Path
    source: Path
    bytes_before: int
    bytes_after: int
    verified: bool  # whether the source had a manifest to check
    format: str  # the scheme written, with its group size where it has one
    note: str | None = None  # why the format differs from what the checkpoint trained


def _describe(scheme: str, group_size: int) -> str:
    if scheme not in ("int4", "w4a8"):
        return scheme
    return f"{scheme}, group size {group_size or 'per channel'}"


def trained_quant(config: dict) -> QuantConfig:
    """The QAT config a training checkpoint's config.json records (float when none)."""
    quant = config.get("quant")
    return QuantConfig() if quant is None else QuantConfig.from_dict(quant)


def choose_format(trained: QuantConfig, scheme: str | None, group_size: int | None
                  ) -> tuple[str, int, str | None]:
    """(scheme, group_size, note): the requested format, filled in from what was trained;
    the note says how a requested format differs from the trained one."""
    trained_scheme, trained_group = inference_scheme(trained)
    uses_groups = ("int4", "w4a8")
    chosen = scheme if scheme is not None else trained_scheme
    if group_size is None:
        group_size = trained_group if trained_scheme in uses_groups else 128
    if (chosen, group_size if chosen in uses_groups else 0) == (
            trained_scheme, trained_group if trained_scheme in uses_groups else 0):
        mismatch = inference_mismatch(trained)
        if mismatch is None:
            return chosen, group_size, None
        return chosen, group_size, (f"converting to {_describe(chosen, group_size)}, the "
                                    f"nearest format to what was trained, but {mismatch}")
    if trained.mode == "none":
        return chosen, group_size, None  # post-training quantization of a float model
    note = (f"converting to {_describe(chosen, group_size)}, but the checkpoint was trained "
            f"with --quant {trained.name}"
            + (f" --quant-group-size {trained.group_size}" if trained_scheme in uses_groups
               else "")
            + f", whose format is {_describe(trained_scheme, trained_group)}; the converted "
            "model will not compute what was trained (leave out --to and --group-size for "
            "that)")
    return chosen, group_size, note


def _check_out(out: str | Path, source: str | Path, force: bool) -> bool:
    """`check_output` for a conversion of `source`: also the run folder and checkpoint that
    `source` resolves to count as inputs."""
    return check_output(out, inputs=input_paths(source), force=force,
                        replaceable=is_converted_checkpoint,
                        kind="converted checkpoint")


def convert(source: str | Path, scheme: str | None, out: str | Path,
            group_size: int | None = None, quantize_head: bool = False, *,
            force: bool = False) -> ConvertResult:
    """Quantize the model at `source` to `scheme` and write it to `out` (atomically, under a
    lock; `force` may replace an earlier conversion at `out`, nothing else). `scheme` and
    `group_size` None: what the checkpoint was trained for (`choose_format`)."""
    if scheme is not None:
        check_scheme(scheme)
    if group_size is not None and group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got "
                        f"{group_size}")
    _check_out(out, source, force)  # before any work: a refusal should come at once
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathError.from_os_error(error, out, "write") from error
    targets = WITH_HEAD if quantize_head else DEFAULT_TARGETS
    with output_lock(out):
        replaces = _check_out(out, source, force)  # again: nobody else can write it now
        if is_hf_folder(source):
            # Not trained here: no QAT config, so the default is float and any --to is
            # post-training quantization, which needs no note.
            scheme, group_size, note = choose_format(QuantConfig(), scheme, group_size)
            note = None
            loaded = load_hf_folder(source, scheme, group_size, quantize_head)
            if quantize_head and loaded.model.lm_head is None:
                raise UserError("--quantize-head: this model ties its LM head to the embeddings")
            model = loaded.model
            bytes_before = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
        else:
            loaded = load(source)
            if loaded.scheme is not None:
                raise CheckpointError(f"{loaded.path} is already converted ({loaded.scheme}); "
                                      "convert from the training checkpoint instead")
            try:
                trained = trained_quant(loaded.config)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{loaded.path}/config.json: invalid quant section "
                                      f"({error})") from None
            scheme, group_size, note = choose_format(trained, scheme, group_size)
            if quantize_head and loaded.model.lm_head is None:
                raise UserError("--quantize-head: this model ties its LM head to the "
                                "embeddings")
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
        extra = {"weights": weights, "source": str(loaded.path)}
        if loaded.architecture is not None:
            extra["hf_architecture"] = loaded.architecture
        save_model(out, model, extra, files, replace=replaces)
    return ConvertResult(out, loaded.path, bytes_before,
                         (out / "model.safetensors").stat().st_size, loaded.verified,
                         _describe(scheme, group_size), note)
