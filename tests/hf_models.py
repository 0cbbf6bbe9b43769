"""Small random-weight Hugging Face model folders built with transformers (the independent
reference for tests/test_hf.py), each with a small byte-level BPE tokenizer and a chat
template of one of the three common styles."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 320  # model rows; the tokenizer uses fewer (real models pad their vocab too)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")

# style -> (special tokens, bos, eos, template, extra stop token)
STYLES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>",
               LLAMA3_TEMPLATE, "<|eot_id|>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
               CHATML_TEMPLATE, "<|endoftext|>"),
    "zephyr": (["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>",
               "</s>", ZEPHYR_TEMPLATE, None),
}

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! How are you today? "
        "Llamas, mistrals and qwens all speak here; numbers 0123456789 too.\n") * 20

# name -> (config class, config kwargs, chat style)
CONFIGS = {
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2), "llama3"),
    "llama3_rope": ("LlamaConfig", dict(
        num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "llama3"),
    "llama_tied_head_dim": ("LlamaConfig", dict(num_key_value_heads=4, head_dim=32,
                                                tie_word_embeddings=True), "zephyr"),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), "chatml"),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=None), "zephyr"),
}


def build_tokenizer(style: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, template, _ = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=template)


def _randomize(model, seed: int) -> None:
    """Weights large enough that the logits are peaked (greedy decoding has clear winners) and
    biases that are not zero (transformers initialises them to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * 1.5 / fan_in**0.5)


def build_model(name: str, folder: Path) -> Path:
    """Save model `name` (CONFIGS) with its tokenizer into `folder`; returns `folder`."""
    class_name, kwargs, style = CONFIGS[name]
    tokenizer = build_tokenizer(style)
    config = getattr(transformers, class_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(0)
    model_class = getattr(transformers, class_name.replace("Config", "ForCausalLM"))
    model = model_class(config).eval()
    _randomize(model, seed=len(name))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    stop = STYLES[style][4]
    eos_ids = [tokenizer.eos_token_id] + (
        [tokenizer.convert_tokens_to_ids(stop)] if stop else [])
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def load_reference(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
