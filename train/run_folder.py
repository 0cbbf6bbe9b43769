"""The run folder OUT: what may be written there, which checkpoint a resume starts from, the
settings saved in it, and its metrics log.

    OUT/config.json     every resolved setting of the run (written before the first step)
    OUT/tokenizer.json  (+ the tokenizer files of a model imported from Hugging Face)
    OUT/metrics.jsonl   one JSON line per step
    OUT/checkpoints/    see train/checkpointing.py
    OUT/.hpllm.lock     held (fcntl.flock) by the process training into OUT

`train` writes only into a folder that is new, empty, or a training run (its config.json has
"train" and "model" sections, or it holds a checkpoint), and never into or around its own
inputs. A run folder without a checkpoint (stopped before its first save) can be started again:
with --resume from step 0 under its saved settings, or by a plain rerun that reuses the folder.
"""

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpllm.checkpoint import CheckpointError, list_checkpoints, read_config, verify_checkpoint
from hpllm.errors import PathError
from hpllm.locking import LOCK_NAME
from hpllm.outputs import check_output
from train.settings import FIELDS, Settings, UsageError, check_types


@contextlib.contextmanager
def os_errors(path: Path, action: str) -> Iterator[None]:
    """An OSError on `path` (a user's path) becomes one line: cannot ACTION PATH: reason."""
    try:
        yield
    except OSError as error:
        raise PathError.from_os_error(error, path, action) from error


def saved_run_settings(out: Path) -> dict[str, Any] | None:
    """The "train" settings of OUT/config.json if OUT is a training run folder, else None."""
    try:
        config = json.loads((out / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(config, dict) and isinstance(config.get("train"), dict)
            and "model" in config):
        return None
    known = {key: value for key, value in config["train"].items() if key in FIELDS}
    return check_types(known, str(out / "config.json"))


def inputs_of(settings: Settings) -> list[str]:
    """The local paths the run reads."""
    paths = [settings.data]
    if settings.tokenizer != "train":
        paths.append(settings.tokenizer)
    if settings.init_from is not None:
        paths.append(settings.init_from)
    return paths


def check_run_folder(out: Path, settings: Settings, resume: bool) -> None:
    """Refuse an --out that is not ours to write: a file, a folder holding other things, or
    one that is, holds or lies inside an input; or a run we were not asked to resume."""
    real = out.resolve()
    for flag, given in (("--data", settings.data), ("--tokenizer", settings.tokenizer),
                        ("--init-from", settings.init_from)):
        if (flag == "--tokenizer" and given == "train") or given is None:
            continue
        source = Path(given).expanduser().resolve()
        what = {"--data": "the training data", "--tokenizer": "the --tokenizer file",
                "--init-from": "the --init-from checkpoint"}[flag]
        if real == source or source in real.parents or real in source.parents:
            raise UsageError(f"--out {out} is, holds or lies inside {what} ({flag} {given}); "
                             "choose a run folder outside it")
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    run = saved_run_settings(out) is not None or bool(list_checkpoints(out))
    if not run:
        entries = []
        if out.is_dir():
            with os_errors(out, "read"):
                entries = [p.name for p in out.iterdir() if p.name != LOCK_NAME]
        if entries:
            raise UsageError(f"--out {out} is not a training run and holds files train did not "
                             f"write ({', '.join(sorted(entries)[:3])}); choose a new or empty "
                             "folder")
        if not out.exists():  # a path under a file, an empty --out...
            check_output(str(out), flag="--out", inputs=inputs_of(settings),
                         kind="training run")
    elif not resume and list_checkpoints(out):
        raise UsageError(f"--out {out} already holds a training run; pass --resume to continue "
                         "it, or choose another --out")


def choose_checkpoint(out: Path, resume_from: str | None) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume starts from (None: the run has none yet, start from step 0)
    and one note per newer checkpoint skipped because it does not verify."""
    if resume_from is not None:
        path = (out / "checkpoints" / f"step_{int(resume_from):06d}" if resume_from.isdigit()
                else Path(resume_from))
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--resume-from {resume_from}: no checkpoint at {path}")
        verify_checkpoint(path)
        return path, []
    notes, first_error = [], None
    for path in list_checkpoints(out):
        try:
            verify_checkpoint(path)
            return path, notes
        except CheckpointError as error:
            first_error = first_error or error
            notes.append(f"resume: skipped {path.name}, it does not verify ({error})")
    if first_error is not None:
        raise CheckpointError(f"--resume: no checkpoint in {out / 'checkpoints'} verifies; the "
                              f"newest: {first_error}")
    if saved_run_settings(out) is None:
        raise CheckpointError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without "
                              "--resume to start a new run")
    return None, []


def resume_point(out: Path, resume_from: str | None
                 ) -> tuple[Path | None, dict[str, Any], str]:
    """(the checkpoint to resume from or None, the training settings saved with it, the file
    they were read from)."""
    if not out.is_dir():
        raise CheckpointError(f"--resume: no checkpoint in {out} (no such folder); run without "
                              "--resume to start a new run")
    checkpoint, notes = choose_checkpoint(out, resume_from)
    for note in notes:
        print(note, file=sys.stderr)
    if checkpoint is None:
        return None, saved_run_settings(out) or {}, str(out / "config.json")
    file = checkpoint / "config.json"
    config = read_config(checkpoint)
    for section in ("train", "quant"):
        if not isinstance(config.get(section), dict):
            raise CheckpointError(f"{file}: {section!r} must be a JSON object of settings, "
                                  f"got {json.dumps(config.get(section))[:60]}")
    known = {key: value for key, value in config["train"].items() if key in FIELDS}
    return checkpoint, check_types(known, str(file)), str(file)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with os_errors(path, "write"):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def write_json_atomically(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past `last_step` (steps that will be run again)."""
    if not path.exists():
        return
    kept = []
    with os_errors(path, "rewrite"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
