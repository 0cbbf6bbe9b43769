"""Hugging Face model folders, both ways: import (config, sharded safetensors, tokenizer files)
and export (a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads).

Supported architectures are the Llama family as transformers names them: `LlamaForCausalLM`
(Llama 2/3/3.1/3.2, TinyLlama, SmolLM), `MistralForCausalLM` and `Qwen2ForCausalLM`. All three
are this project's decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a few config
fields (`ModelConfig.explicit_head_dim`, `qkv_bias`, `out_bias`, `rope_scaling`,
`scale_tied_head`); anything outside that is refused with one line naming the field.

Tensors are read from the files one at a time (the index of a sharded model says which file
holds which name) and converted one layer at a time: each layer is read, transposed to this
project's `[in, out]` layout, quantized if asked, and written into preallocated stacked buffers,
so converting to int8/int4 never holds the whole float model. Nothing here imports torch or
transformers, and nothing is downloaded.
"""

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from hpllm.config import DTYPE_ALIASES, ModelConfig, RopeScaling
from hpllm.errors import PathError, UserError
from hpllm.hf_tokenizer import GenerationDefaults, PretrainedTokenizer
from hpllm.linear import Linear
from hpllm.model import Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# model_type -> the transformers class that loads it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# The file dtype of each `--dtype` alias (hpllm.config.DTYPE_ALIASES names the same two).
EXPORT_DTYPES = {alias: np.dtype(name) if name == "float32" else ml_dtypes.bfloat16
                 for alias, name in DTYPE_ALIASES.items()}

# safetensors dtype codes <-> NumPy dtypes. safetensors' own NumPy reader cannot return
# bfloat16 (NumPy has no such dtype), so tensors are read from the byte ranges the header
# gives and viewed through ml_dtypes.
_FLOAT_CODES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16)}
_CODE_OF = {dtype: code for code, dtype in _FLOAT_CODES.items()}

# Per-layer tensors: Hugging Face name (after `model.layers.N.`) -> (path in this project's
# Block, transposed). HF stores Linear weights [out, in]; this project stores [in, out].
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("attn_norm.scale", False),
    "self_attn.q_proj.weight": ("attn.wq.weight", True),
    "self_attn.k_proj.weight": ("attn.wk.weight", True),
    "self_attn.v_proj.weight": ("attn.wv.weight", True),
    "self_attn.o_proj.weight": ("attn.wo.weight", True),
    "post_attention_layernorm.weight": ("mlp_norm.scale", False),
    "mlp.gate_proj.weight": ("mlp.w_gate.weight", True),
    "mlp.up_proj.weight": ("mlp.w_up.weight", True),
    "mlp.down_proj.weight": ("mlp.w_down.weight", True),
}
_QKV_BIASES = {"self_attn.q_proj.bias": ("attn.wq.bias", False),
               "self_attn.k_proj.bias": ("attn.wk.bias", False),
               "self_attn.v_proj.bias": ("attn.wv.bias", False)}
_OUT_BIAS = {"self_attn.o_proj.bias": ("attn.wo.bias", False)}
# Buffers some older checkpoints carry; they are recomputed, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFError(UserError):
    """A Hugging Face folder this project cannot load as it is (the message names why)."""


# ---------------------------------------------------------------------------------------------
# config.json

def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose config.json is a Hugging Face model config (has `model_type`
    and no hpllm `model` section)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise HFError(f"{file}: file not found") from None
    except (OSError, ValueError) as error:
        raise HFError(f"{file}: unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise HFError(f"{file}: expected a JSON object")
    return data


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json (checked by `config_from_hf`)."""
    return read_json(Path(folder) / CONFIG_FILE)


def hf_model_config(folder: str | Path, context: int | None = None) -> ModelConfig:
    """The ModelConfig of the Hugging Face folder `folder` (see `config_from_hf`); an
    unsupported config is one line naming the file and the field."""
    hf = read_hf_config(folder)
    try:
        return config_from_hf(hf, context)
    except HFError as error:
        message = str(error).removeprefix(f"{CONFIG_FILE}: ")
        raise HFError(f"{Path(folder) / CONFIG_FILE}: {message}") from None


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, from the older `rope_theta`/`rope_scaling` keys or the newer
    `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10_000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise HFError(f"rope_scaling type {kind!r} is not supported (only linear and llama3)")
    try:
        if kind == "linear":
            return theta, RopeScaling("linear", float(scaling["factor"]))
        return theta, RopeScaling(
            "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as error:
        raise HFError(f"rope_scaling {scaling!r} is incomplete or invalid ({error})") from None


def config_from_hf(hf: dict[str, Any], context: int | None = None) -> ModelConfig:
    """This project's ModelConfig for a Hugging Face config.json (refusing what it cannot run).

    `context` is the longest sequence that will be used (default: max_position_embeddings,
    capped by a sliding window when the model has one); a sliding window shorter than it is
    refused, since attention here always sees the whole context.
    """
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFError(f"model_type {model_type!r} is not supported (supported: "
                      f"{', '.join(ARCHITECTURES)})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"hidden_act {act!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise HFError("mlp_bias true is not supported (only MLPs without biases)")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size")
    missing = [name for name in required if not isinstance(hf.get(name), int)]
    if missing:
        raise HFError(f"config.json: {missing[0]} is missing or not an integer")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    max_positions = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    uses_window = window is not None and hf.get("use_sliding_window", model_type == "mistral")
    if context is None:
        context = min(max_positions, int(window)) if uses_window else max_positions
    if uses_window and int(window) < context:
        raise HFError(f"sliding_window {window} is shorter than the context in use ({context}); "
                      "only full attention is supported")
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_ff=hf["intermediate_size"], max_seq_len=int(context), rope_theta=theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            explicit_head_dim=None if head_dim * n_heads == hf["hidden_size"] else int(head_dim),
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=attention_bias and model_type != "qwen2",
            rope_scaling=scaling, scale_tied_head=False)
    except ValueError as error:
        raise HFError(f"config.json: {error}") from None


def config_to_hf(cfg: ModelConfig, architecture: str = "LlamaForCausalLM",
                 dtype: str = "float32", bos_id: int | None = None,
                 eos_id: int | list[int] | None = None) -> dict[str, Any]:
    """A Hugging Face config.json for `cfg` (written with the older `rope_theta` /
    `rope_scaling` keys, which transformers 4 and 5 both read)."""
    model_type = {arch: kind for kind, arch in ARCHITECTURES.items()}[architecture]
    if cfg.qkv_bias != cfg.out_bias and model_type != "qwen2":
        raise HFError(f"{architecture} cannot express biases on q/k/v without o (use Qwen2)")
    if model_type == "qwen2" and cfg.out_bias:
        raise HFError("Qwen2ForCausalLM has no output-projection bias")
    # A tied head scaled by 1/sqrt(d_model) (models trained here) is exported untied.
    tied = cfg.tie_embeddings and not cfg.scale_tied_head
    config: dict[str, Any] = {
        "architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": tied, "torch_dtype": dtype,
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    if model_type != "qwen2":
        config["attention_bias"] = cfg.qkv_bias
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        config["rope_scaling"] = (
            {"rope_type": "linear", "factor": s.factor} if s.kind == "linear" else
            {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
             "high_freq_factor": s.high_freq_factor,
             "original_max_position_embeddings": s.original_max_position})
    return config


# ---------------------------------------------------------------------------------------------
# Reading safetensors files lazily

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(file: Path) -> dict[str, TensorInfo]:
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as error:
        raise HFError(f"{file}: unreadable safetensors header ({error})") from None
    size = file.stat().st_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype")
        if code not in _FLOAT_CODES:
            raise HFError(f"{file}: tensor {name} has dtype {code}; only F32, F16 and BF16 "
                          "weights are supported")
        begin, end = (8 + header_len + offset for offset in info["data_offsets"])
        if end > size:
            raise HFError(f"{file}: tensor {name} lies past the end of the file (truncated?)")
        tensors[name] = TensorInfo(file, _FLOAT_CODES[code], tuple(info["shape"]), begin, end)
    return tensors


def tensor_index(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the model at `folder`: model.safetensors, or the shards that
    model.safetensors.index.json lists."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index_file}: no weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = folder / shard
            if not shard_file.is_file():
                raise HFError(f"{shard_file}: shard listed in {INDEX_FILE} not found")
            tensors.update(_read_header(shard_file))
        return tensors
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise HFError(f"{folder}: no {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors "
                      "weights are supported)")
    return _read_header(single)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as float32 (read into memory of its own: no mapping of the whole file)."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = np.frombuffer(f.read(info.end - info.start), dtype=info.dtype)
    return raw.reshape(info.shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Name mapping

def _layer_table(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    table = dict(_LAYER_WEIGHTS)
    if cfg.qkv_bias:
        table.update(_QKV_BIASES)
    if cfg.out_bias:
        table.update(_OUT_BIAS)
    return table


def _hf_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transposed else shape


def _named_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in leaves}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for a model of `cfg`."""
    skeleton = eqx.filter_eval_shape(Transformer, cfg.replace(n_layers=1), key=jax.random.key(0))
    block = _named_shapes(skeleton.blocks)  # leading layer axis of 1
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d_model),
                "model.norm.weight": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    for layer in range(cfg.n_layers):
        for hf_name, (ours, transposed) in _layer_table(cfg).items():
            expected[f"model.layers.{layer}.{hf_name}"] = _hf_shape(block[ours][1:], transposed)
    return expected


def check_tensors(tensors: dict[str, TensorInfo], cfg: ModelConfig, folder: Path) -> None:
    """One line naming the first missing, unexpected or misshapen tensor."""
    expected = expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise HFError(f"{folder}: tensor {name} is missing")
        if tensors[name].shape != shape:
            raise HFError(f"{folder}: tensor {name} has shape {list(tensors[name].shape)}, the "
                          f"config implies {list(shape)}")
    for name in sorted(tensors):
        if name in expected or name.endswith(_IGNORED_SUFFIXES):
            continue
        # A tied model may still carry its (identical) head; transformers ignores it too.
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        raise HFError(f"{folder}: unexpected tensor {name} (not part of a {cfg.n_layers}-layer "
                      "model of this config)")


# ---------------------------------------------------------------------------------------------
# Import

def _fill(skeleton: Any, arrays: dict[str, np.ndarray]) -> Any:
    """`skeleton` (ShapeDtypeStruct leaves) with each leaf taken from `arrays` by its path."""
    def take(path, leaf):
        return jnp.asarray(arrays[jax.tree_util.keystr(path, simple=True, separator=".")],
                           leaf.dtype).reshape(leaf.shape)
    return jax.tree_util.tree_map_with_path(take, skeleton)


def _write_layer(buffers: Any, layer: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda b, x: lax.dynamic_update_index_in_dim(b, x[0], index, 0),
                        buffers, layer)


# The stacked buffers are donated, so each layer is written in place (no second copy).
_write_layer_in_place = jax.jit(_write_layer, donate_argnums=0)


def _convert(tree: Any, scheme: str | None, group_size: int, targets: tuple[str, ...]) -> Any:
    if scheme is None:
        return tree
    from hpllm.quant import quantize_weights

    return quantize_weights(tree, scheme, group_size=group_size, targets=targets)


# One compiled conversion serves every layer (they share a shape).
_convert_layer = eqx.filter_jit(
    lambda block, scheme, group_size: _convert(block, scheme, group_size, ("*",)))


def load_weights(folder: str | Path, cfg: ModelConfig, *, scheme: str | None = None,
                 group_size: int = 128, quantize_head: bool = False) -> Transformer:
    """The model stored at `folder` in Hugging Face layout, converted to `scheme` (None: float32
    weights) one layer at a time."""
    folder = Path(folder)
    tensors = tensor_index(folder)
    check_tensors(tensors, cfg, folder)
    key = jax.random.key(0)
    block_targets = ("*",)
    one_layer = eqx.filter_eval_shape(Transformer, cfg.replace(n_layers=1), key=key).blocks
    stacked = eqx.filter_eval_shape(
        lambda: _convert(Transformer(cfg, key=key).blocks, scheme, group_size, block_targets))
    buffers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stacked)
    table = _layer_table(cfg)
    for layer in range(cfg.n_layers):
        arrays = {}
        for hf_name, (ours, transposed) in table.items():
            array = read_tensor(tensors[f"model.layers.{layer}.{hf_name}"])
            arrays[ours] = array.T if transposed else array
        block = _convert_layer(_fill(one_layer, arrays), scheme, group_size)
        buffers = _write_layer_in_place(buffers, block, jnp.int32(layer))
        del arrays, block

    model = eqx.filter_eval_shape(Transformer, cfg, key=key)
    top = {"embed": read_tensor(tensors["model.embed_tokens.weight"]),
           "final_norm.scale": read_tensor(tensors["model.norm.weight"])}
    if not cfg.tie_embeddings:
        top["lm_head.weight"] = read_tensor(tensors["lm_head.weight"]).T
    top_skeleton = eqx.tree_at(lambda m: m.blocks, model, replace_fn=lambda _: None)
    model = eqx.tree_at(lambda m: m.blocks, _fill(top_skeleton, top), buffers,
                        is_leaf=lambda x: x is None)
    if quantize_head and scheme is not None and model.lm_head is not None:
        model = eqx.tree_at(lambda m: m.lm_head, model,
                            _convert(model.lm_head, scheme, group_size, ("*",)))
    return model


@dataclasses.dataclass
class HFModel:
    """What `load_hf` returns: the model, its tokenizer (with BOS/EOS, stop ids and chat
    template), default sampling, and the source's architecture (for export)."""

    model: Transformer
    tokenizer: PretrainedTokenizer
    generation: GenerationDefaults
    architecture: str
    path: Path


def load_hf(folder: str | Path, *, scheme: str | None = None, group_size: int = 128,
            quantize_head: bool = False, context: int | None = None) -> HFModel:
    """Load a Hugging Face model folder (converted to `scheme` in memory when given)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = hf_model_config(folder, context)
    architecture = ARCHITECTURES[hf["model_type"]]
    tokenizer = PretrainedTokenizer.from_folder(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(f"{folder}: tokenizer has {tokenizer.vocab_size} ids, more than the "
                      f"model's vocab_size {cfg.vocab_size}")
    model = load_weights(folder, cfg, scheme=scheme, group_size=group_size,
                         quantize_head=quantize_head)
    return HFModel(model, tokenizer, tokenizer.generation, architecture, folder)


# ---------------------------------------------------------------------------------------------
# Export

def _float_weight(weight: Any) -> jax.Array:
    return weight if eqx.is_array(weight) else weight.dequantize()


def hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array in HF layout) for every weight of `model`; quantized
    weights are dequantized."""
    cfg = model.cfg
    embed = np.asarray(model.embed, np.float32)
    yield "model.embed_tokens.weight", embed
    for layer in range(cfg.n_layers):
        block = (jax.tree.map(lambda x, i=layer: x[i], model.blocks) if model.is_stacked
                 else model.blocks[layer])
        named = {}
        for path, linear in jax.tree_util.tree_leaves_with_path(
                block, is_leaf=lambda x: isinstance(x, Linear)):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            if isinstance(linear, Linear):
                named[f"{name}.weight"] = _float_weight(linear.weight)
                if linear.bias is not None:
                    named[f"{name}.bias"] = linear.bias
        named.update({"attn_norm.scale": block.attn_norm.scale,
                      "mlp_norm.scale": block.mlp_norm.scale})
        for hf_name, (ours, transposed) in _layer_table(cfg).items():
            array = np.asarray(named[ours], np.float32)
            yield f"model.layers.{layer}.{hf_name}", array.T if transposed else array
    yield "model.norm.weight", np.asarray(model.final_norm.scale, np.float32)
    if model.lm_head is not None:
        yield "lm_head.weight", np.asarray(_float_weight(model.lm_head.weight), np.float32).T
    elif cfg.scale_tied_head:
        # HF ties without scaling: write the head this model really uses, untied.
        yield "lm_head.weight", embed / np.float32(np.sqrt(cfg.d_model))


def write_safetensors(file: Path, tensors: Iterator[tuple[str, np.ndarray]], dtype: Any
                      ) -> None:
    """A safetensors file (PyTorch flavour, as transformers expects) of `tensors` in `dtype`."""
    arrays = [(name, np.ascontiguousarray(array.astype(dtype))) for name, array in tensors]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in arrays:
        header[name] = {"dtype": _CODE_OF[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, array in arrays:
            f.write(array.tobytes())


def export_hf(model: Transformer, out: str | Path, files: dict[str, str], *,
              architecture: str = "LlamaForCausalLM", dtype: str = "bf16",
              bos_id: int | None = None, eos_id: int | list[int] | None = None,
              replace: bool = False) -> Path:
    """Write `model` as a Hugging Face folder at `out`: config.json, model.safetensors in
    `dtype` ("bf16" or "f32"), and `files` (tokenizer and generation settings, name -> text).
    Written into a temporary folder and renamed into place. `out` must not exist, unless
    `replace` (the caller checked it with `hpllm.outputs.check_output`: an empty folder).
    An OS error is a `PathError` naming `out`, with nothing left behind."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise HFError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if out.exists() and not replace:
        raise HFError(f"{out} already exists; choose a new --out folder")
    config = config_to_hf(model.cfg, architecture, DTYPE_ALIASES[dtype],
                          bos_id, eos_id)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write_safetensors(tmp / WEIGHTS_FILE, hf_tensors(model), EXPORT_DTYPES[dtype])
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)  # over an empty folder too
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PathError.from_os_error(error, out, "write") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
