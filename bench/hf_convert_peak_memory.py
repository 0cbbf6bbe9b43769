"""Peak host memory (max RSS) of converting a Hugging Face folder layer by layer
(docs/performance.md). Usage: hf_convert_peak_memory.py HF_DIR int8|int4|f32"""
import resource
import sys
import time
from pathlib import Path

import jax

from hpllm.hf import config_from_hf, load_weights, read_json

folder, scheme = Path(sys.argv[1]), (None if sys.argv[2] == "f32" else sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t = time.time()
model = load_weights(folder, config_from_hf(read_json(folder / "config.json")), scheme=scheme)
jax.block_until_ready(model)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
print(f"{scheme or 'f32'}: file {size:.2f} GiB, peak RSS {peak:.2f} GiB "
      f"({peak / size:.2f}x the file; {before:.2f} GiB before loading), {time.time() - t:.0f} s")
