"""`python -m train`: parse the settings, run the training loop, and the error policy.

The settings and their flags are declared in train/settings.py, the run is set up by
`train.run.build_run`, and the loop below decides when to evaluate, log and save.

User mistakes (bad flag, missing data, corrupt checkpoint, NaN loss...) end with one line
`error: ...` on stderr and exit status 2; nothing already in the run folder is deleted or
overwritten. Anything else is a bug and keeps its traceback.
"""

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from hpllm import distributed
from hpllm.checkpoint import latest_checkpoint
from hpllm.errors import UserError
from hpllm.locking import folder_lock
from train.checkpointing import Checkpointer, open_init_source
from train.loop import NonFiniteLossError, Progress, eval_record, train_steps
from train.processes import add_process_flags, join_if_asked, pop_process_flags
from train.run import Run, build_run
from train.run_folder import (
    check_run_folder,
    os_errors,
    resume_point,
    trim_metrics,
    write_json_atomically,
    write_text_atomically,
)
from train.settings import (
    Settings,
    UsageError,
    build_parser,
    flag,
    layer,
    out_folder,
    read_config_file,
    same_path,
)

RESUME_HELP = (
    "continue the run in --out with its saved settings, from the newest checkpoint that "
    "verifies (a damaged newer one is skipped, with a note); a run folder with no checkpoint "
    "yet (stopped before its first save) starts again from step 0. A plain rerun into such a "
    "folder reuses it too (default: off, start a new run)")
RESUME_FROM_HELP = ("like --resume, but from the checkpoint of step STEP, or the checkpoint "
                    "folder PATH (default: the newest that verifies)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str] | None) -> tuple[Settings, bool, Path | None, dict[str, Any]]:
    """(settings, resume, the checkpoint to resume from or None, the multi-process flags)
    from the command line, --config and a resumed run's saved settings."""
    parser = build_parser()
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    parser.add_argument("--resume-from", metavar="STEP_OR_PATH", help=RESUME_FROM_HELP)
    add_process_flags(parser)
    given = vars(parser.parse_args(argv))
    processes = pop_process_flags(given)
    resume_from = given.pop("resume_from", None)
    resume = given.pop("resume", False) or resume_from is not None
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    if not resume:
        from_file, given = with_init_source(from_file, given)
    out = out_folder({**from_file, **given})
    checkpoint, saved, saved_in = None, {}, ""
    if resume:
        checkpoint, saved, saved_in = resume_point(out, resume_from)
    return layer(saved, from_file, given, saved_in), resume, checkpoint, processes


def with_init_source(from_file: dict[str, Any], given: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """With --init-from: the settings its checkpoint fixes (model, tokenizer) join the
    --config layer, and --init-from names the checkpoint itself; a flag or --config value
    that contradicts them is an error."""
    layered = {**from_file, **given}
    if layered.get("init_from") is None:
        return from_file, given
    source = open_init_source(layered["init_from"])
    for name, value in source.settings.items():
        if name in layered and same_path(name, layered[name]) != same_path(name, value):
            kind = "checkpoint" if source.hf_architecture is None else "Hugging Face folder"
            theirs = (f"the --init-from {kind}'s {value}" if value is not None else
                      f"--init-from {source.path}, whose config.json gives the model")
            raise UsageError(f"{flag(name)} {layered[name]} differs from {theirs}; the model "
                             "and tokenizer come from it, leave the flag out")
    return {**from_file, **source.settings}, {**given, "init_from": str(source.path)}


class SigintFlag:
    """Ctrl-C sets a flag that the loop checks after each step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run(settings: Settings, resume: bool, resume_from: Path | None) -> int:
    out = Path(settings.out)
    check_run_folder(out, settings, resume)
    run = build_run(settings, resume_from=resume_from)
    # A tokenizer learned by each process from the same text must come out the same.
    distributed.check_same(run.tokenizer.to_json(), "the tokenizers")
    start = int(run.state.step)
    primary = distributed.is_primary()
    if start >= settings.steps:
        if primary:
            print(f"{out}: already at step {start} (--steps {settings.steps}); nothing to do",
                  file=sys.stderr)
        return 0
    # Every check has passed, in every process (check_same above is a collective: no process
    # gets here before all have looked at the run folder). Only now is anything written, by
    # one program at a time, and in a multi-process run by the primary only: it alone holds
    # the folder's lock; the other processes train and write nothing.
    try:
        if not primary:
            return train(run, out, primary=False)
        with os_errors(out, "create"):
            out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out):
            check_run_folder(out, settings, resume)  # again: now nobody else writes here
            return train(run, out, primary=True)
    except NonFiniteLossError as error:
        raise UserError(f"{error}; {advice(error, out)}") from None


def advice(error: NonFiniteLossError, out: Path) -> str:
    """What to do after a non-finite loss, for its cause and the checkpoints there are."""
    newest = latest_checkpoint(out)
    if newest is None:
        again = (f"no checkpoint was written, so python -m train --out {out} --resume starts "
                 "again from step 0")
    else:
        again = (f"the newest checkpoint is {newest.name}: python -m train --out {out} --resume "
                 "continues from it, --resume-from STEP from an earlier one")
    if not error.params_finite:
        return f"the update diverged: lower --lr or --clip, or raise --warmup; {again}"
    if error.first:
        return ("the loss of the starting parameters is not finite, so the learning rate is not "
                f"the cause: try --dtype f32 and check the data; {again}")
    if newest is not None and newest.name == f"step_{error.step - 1:06d}":
        again = (f"the newest checkpoint, {newest.name}, holds those parameters: resume from an "
                 f"earlier one with python -m train --out {out} --resume-from STEP")
    return (f"the parameters after step {error.step - 1} already give a non-finite loss: "
            f"lower --lr or --clip, or raise --warmup; {again}")


def train(run: Run, out: Path, primary: bool) -> int:
    """The training loop of python -m train: evaluate, log and save between the steps. Only
    the `primary` process writes (run files, metrics, progress; checkpoints are gathered from
    every process by `Checkpointer.save`)."""
    settings, start = run.settings, int(run.state.step)
    config = run.config()
    metrics_path = out / "metrics.jsonl"
    if primary:
        write_json_atomically(out / "config.json", config)
        for name, text in run.tokenizer.files.items():
            write_text_atomically(out / name, text)
        trim_metrics(metrics_path, start)  # steps after the checkpoint will be run again
    checkpointer = Checkpointer(out, keep=settings.keep, tokenizer_files=run.tokenizer.files,
                                config={k: v for k, v in config.items() if k != "devices"})
    checkpointer.remove_leftovers()

    batches = run.batches()
    progress = Progress(settings.steps)
    sigint = SigintFlag()
    step = start
    try:
        with os_errors(metrics_path, "open"):
            metrics_file = open(metrics_path if primary else os.devnull, "a")  # noqa: SIM115
        with metrics_file:
            for state, record in train_steps(run.state, run.step_fn, batches, run.put_batch,
                                             total_steps=settings.steps,
                                             grad_accum=settings.grad_accum):
                step = record["step"]
                if settings.eval_every and (step % settings.eval_every == 0
                                            or step == settings.steps):
                    record |= eval_record(run.evaluate(state.model()))
                with os_errors(metrics_path, "write"):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if primary:
                    progress.update(step, record["loss"], record["tokens_per_s"],
                                    record.get("eval_loss"))
                # Ctrl-C reaches the processes at different steps; they must stop together.
                stop = distributed.any_process(sigint.raised)
                if ((settings.save_every and step % settings.save_every == 0)
                        or step == settings.steps or stop):
                    checkpointer.save(state, batches.state())
                if stop:
                    break
    finally:
        sigint.restore()
        batches.close()
    saved = checkpointer.folder / f"step_{step:06d}"
    if not primary:
        return 0
    if step == settings.steps:
        print(f"\ndone: {step} steps; checkpoint {saved}", file=sys.stderr)
    else:
        print(f"\ninterrupted at step {step}; saved {saved}. Continue with: python -m train "
              f"--out {out} --resume", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    joined = False
    try:
        settings, resume, resume_from, processes = parse(argv)
        joined = join_if_asked(processes)
        # Every process must train the same thing: compare what each resolved.
        distributed.check_same(json.dumps([settings.to_dict(), str(resume_from)],
                                          sort_keys=True), "the resolved settings")
        status = run(settings, resume, resume_from)
        return distributed.finish(status) if joined else status
    except UserError as error:
        if joined:
            # Skip JAX's exit-time shutdown barrier: the other processes may not reach it.
            print(f"error: process {distributed.process_index()}: {error}", file=sys.stderr,
                  flush=True)
            os._exit(2)
        fail(str(error))
    except Exception as error:
        if joined and distributed.is_collective_failure(error):
            distributed.abandon(error, processes.get("heartbeat_timeout")
                                or distributed.HEARTBEAT_TIMEOUT_S)
        raise
    except KeyboardInterrupt:
        # Ctrl-C before the first step, or a second Ctrl-C: the checkpoints already written
        # are complete (atomic saves); nothing new was saved.
        print("\ninterrupted; no new checkpoint written", file=sys.stderr)
        return 130
