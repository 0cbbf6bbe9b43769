"""A TinyLlama-1.1B-shaped Hugging Face folder with random bf16 weights, for measuring the
peak memory of `convert` (docs/performance.md). Usage: hf_random_1b.py OUT_DIR"""
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from hpllm.config import preset
from hpllm.hf import config_to_hf, expected_tensors, write_safetensors

out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
cfg = preset("1b")
rng = np.random.default_rng(0)
def tensors():
    for name, shape in expected_tensors(cfg).items():
        yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
write_safetensors(out / "model.safetensors", tensors(), ml_dtypes.bfloat16)
hf = config_to_hf(cfg.replace(scale_tied_head=False), "LlamaForCausalLM", "bfloat16")
(out / "config.json").write_text(json.dumps(hf))
