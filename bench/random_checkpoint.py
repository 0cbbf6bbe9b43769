"""A random-weight checkpoint of a preset's shape, converted to a weight format, for benchmarks
that drive the CLI (`serve_load.py`, `chat_speed.py`): only the speed matters, not the text.

The tokenizer is trained on the bundled corpus up to the preset's vocabulary size, so that the
random model's tokens decode to text (a streamed reply whose tokens decode to nothing would
show no tokens to time).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, preset_name: str, scheme: str, quantize_head: bool = False
                     ) -> Path:
    import jax

    from hpllm.checkpoint import write_checkpoint
    from hpllm.config import preset
    from hpllm.model import Transformer
    from hpllm.tokenizer import Tokenizer

    cfg = preset(preset_name)
    with (REPO / "data" / "train.jsonl").open() as lines:
        texts = [json.loads(line)["text"] for line in lines]
    tokenizer = Tokenizer.train(texts, vocab_size=cfg.vocab_size)
    source = folder / "float"
    write_checkpoint(source, {"model": cfg.to_dict(), "quant": {"mode": "none"}, "step": 0},
                     {"model": Transformer(cfg, key=jax.random.key(0))},
                     {"tokenizer.json": tokenizer.to_json()})
    out = folder / f"{preset_name}-{scheme}"
    subprocess.run([sys.executable, "-m", "infer", "convert", str(source), "--to", scheme,
                    "--out", str(out), *(["--quantize-head"] if quantize_head else [])],
                   check=True, cwd=REPO)
    return out
