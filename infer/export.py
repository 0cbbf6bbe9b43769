"""`python -m infer export CKPT --format hf --out DIR`: a checkpoint as a Hugging Face folder.

The folder holds config.json (LlamaForCausalLM for models trained here, the source
architecture for imported ones), model.safetensors with Hugging Face tensor names, and the
tokenizer: tokenizer.json, tokenizer_config.json (BOS/EOS and the chat template) and
generation_config.json (the stop ids). `transformers.AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)` load it with no extra code.

Quantized checkpoints are exported as their dequantized weights (bf16 or f32, `--dtype`):
the Hugging Face format has no place for this project's int8/int4/fp8 layouts, so the file is
as large as a float model's and holds exactly the values the quantized model computes with.
A tied head of a model trained here is scaled by 1/sqrt(d_model), which transformers does not
do, so it is written as a separate (untied) lm_head.

`--out` follows `hpllm.outputs.check_output` like every command that writes: a new path or an
empty folder, never the input, inside it or around it, never a training run or a folder
holding anything else. It is locked while written (`hpllm.locking.output_lock`) and appears by
one rename, complete or not at all.
"""

import json
from pathlib import Path

from hpllm.errors import PathError
from hpllm.hf import export_hf
from hpllm.hf_tokenizer import PretrainedTokenizer
from hpllm.locking import output_lock
from hpllm.outputs import check_output
from hpllm.tokenizer import ASSISTANT, EOS, USER, Tokenizer
from infer.loading import input_paths, load, require_tokenizer

# The built-in chat format (see infer/chat.py) as a Jinja template: the same tokens, in text.
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] + '"
    + ASSISTANT + "' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '" + EOS + "' }}"
    "{% else %}{{ raise_exception('only user and assistant turns are supported') }}"
    "{% endif %}{% endfor %}")


def _builtin_files(tokenizer: Tokenizer) -> tuple[dict[str, str], int, list[int]]:
    # The template already ends a user turn with <|assistant|>, so the generation prompt adds
    # nothing; transformers passes add_generation_prompt but this template needs none.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS,
        "add_bos_token": False, "chat_template": BUILTIN_TEMPLATE,
        "model_max_length": 1 << 30,
    }
    stop_ids = [tokenizer.eos_id, tokenizer.user_id]
    generation = {"eos_token_id": stop_ids, "do_sample": True, "temperature": 0.8, "top_k": 50}
    files = {"tokenizer.json": tokenizer.to_json(),
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
             "generation_config.json": json.dumps(generation, indent=2)}
    return files, tokenizer.eos_id, stop_ids


def _check_out(out: str | Path, source: str | Path) -> bool:
    return check_output(out, inputs=input_paths(source), kind="Hugging Face export",
                        force_flag=None)


def export(source: str | Path, out: str | Path, *, dtype: str = "bf16") -> Path:
    """Write the model at `source` (any CKPT) as a Hugging Face folder at `out`."""
    _check_out(out, source)  # before any work: a refusal should come at once
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathError.from_os_error(error, out, "write") from error
    with output_lock(out):
        replaces = _check_out(out, source)  # again: nobody else can write it now
        loaded = load(source)
        tokenizer = require_tokenizer(loaded)
        if isinstance(tokenizer, PretrainedTokenizer):
            files, bos_id = dict(tokenizer.files), tokenizer.bos_id
            eos = list(tokenizer.stop_ids)
        else:
            files, _, eos = _builtin_files(tokenizer)
            bos_id = None
        return export_hf(loaded.model, out, files,
                         architecture=loaded.architecture or "LlamaForCausalLM", dtype=dtype,
                         bos_id=bos_id, eos_id=eos, replace=replaces)
