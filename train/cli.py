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
from hpllm.errors import UserError
from train.checkpointing import Checkpointer
from train.loop import Progress, eval_record, train_steps
from train.processes import add_process_flags, join_if_asked, pop_process_flags
from train.run import build_run
from train.run_folder import check_run_folder, resume_point, trim_metrics, write_json_atomically
from train.settings import Settings, build_parser, layer, out_folder, read_config_file

RESUME_HELP = ("continue from the newest checkpoint in --out, with its saved settings "
               "(default: off, start a new run)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def command_parser():
    parser = build_parser(resume=RESUME_HELP)
    add_process_flags(parser)
    return parser


def parse(argv: list[str] | None) -> tuple[Settings, Path | None, dict[str, Any]]:
    """(settings, the checkpoint to resume from or None, the multi-process flags) from the
    command line, --config and a resumed run's saved settings."""
    given = vars(command_parser().parse_args(argv))
    processes = pop_process_flags(given)
    resume = given.pop("resume", False)
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    out = out_folder({**from_file, **given})
    checkpoint, saved = None, {}
    if resume:
        check_run_folder(out, resume)
        checkpoint, saved = resume_point(out)
    return layer(saved, from_file, given), checkpoint, processes


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


def run(settings: Settings, resume_from: Path | None) -> int:
    out = Path(settings.out)
    check_run_folder(out, resume_from is not None)
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

    # Every check has passed, in every process (check_same above is a collective, so no
    # process gets here before all have looked at the run folder): only now is anything
    # written, and only by the primary process.
    config = run.config()
    metrics_path = out / "metrics.jsonl"
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomically(out / "config.json", config)
        run.tokenizer.save(out / "tokenizer.json")
        if resume_from is not None:
            trim_metrics(metrics_path, start)
    checkpointer = Checkpointer(out, keep=settings.keep, tokenizer_json=run.tokenizer.to_json(),
                                config={k: v for k, v in config.items() if k != "devices"})
    checkpointer.remove_leftovers()

    batches = run.batches()
    progress = Progress(settings.steps)
    sigint = SigintFlag()
    step = start
    try:
        with open(metrics_path if primary else os.devnull, "a") as metrics_file:
            for state, record in train_steps(run.state, run.step_fn, batches, run.put_batch,
                                             total_steps=settings.steps,
                                             grad_accum=settings.grad_accum):
                step = record["step"]
                if settings.eval_every and (step % settings.eval_every == 0
                                            or step == settings.steps):
                    record |= eval_record(run.evaluate(state.model()))
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
        settings, resume_from, processes = parse(argv)
        joined = join_if_asked(processes)
        # Every process must train the same thing: compare what each resolved.
        distributed.check_same(json.dumps([settings.to_dict(), str(resume_from)],
                                          sort_keys=True), "the resolved settings")
        status = run(settings, resume_from)
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
