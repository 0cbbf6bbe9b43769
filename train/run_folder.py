"""The run folder OUT: what may be written there, the settings saved in it, its metrics log.

    OUT/config.json     every resolved setting of the run (written before the first step)
    OUT/tokenizer.json
    OUT/metrics.jsonl   one JSON line per step
    OUT/checkpoints/    see train/checkpointing.py
"""

import json
import os
from pathlib import Path
from typing import Any

from hpllm.checkpoint import CheckpointError, read_config
from train.checkpointing import find_resume_checkpoint
from train.settings import FIELDS, UsageError


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that is a file, or that holds a run we were not asked to resume."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if not resume and out.is_dir() and ((out / "config.json").exists()
                                        or (out / "checkpoints").exists()):
        raise UsageError(f"--out {out} already holds a training run; pass --resume to continue "
                         f"it, or choose another --out")


def resume_point(out: Path) -> tuple[Path, dict[str, Any]]:
    """(the checkpoint to resume from, the training settings saved in it)."""
    path = find_resume_checkpoint(out)
    train = read_config(path).get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{path / 'config.json'}: no 'train' settings")
    return path, {key: value for key, value in train.items() if key in FIELDS}


def write_json_atomically(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (steps that will be run again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
