"""`python -m train`: parse the settings, run the training loop, and the error policy.

The settings and their flags are declared in train/settings.py, the run is set up by
`train.run.build_run`, and the loop below decides when to evaluate, log and save.

User mistakes (bad flag, missing data, corrupt checkpoint, NaN loss...) end with one line
`error: ...` on stderr and exit status 2; nothing already in the run folder is deleted or
overwritten. Anything else is a bug and keeps its traceback.
"""

import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

from hpllm.errors import UserError
from train.checkpointing import Checkpointer
from train.loop import Progress, eval_record, train_steps
from train.run import build_run
from train.run_folder import check_run_folder, resume_point, trim_metrics, write_json_atomically
from train.settings import Settings, build_parser, layer, out_folder, read_config_file

RESUME_HELP = ("continue from the newest checkpoint in --out, with its saved settings "
               "(default: off, start a new run)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str] | None) -> tuple[Settings, Path | None]:
    """(settings, the checkpoint to resume from or None) from the command line, --config and
    a resumed run's saved settings."""
    given = vars(build_parser(resume=RESUME_HELP).parse_args(argv))
    resume = given.pop("resume", False)
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    out = out_folder({**from_file, **given})
    checkpoint, saved = None, {}
    if resume:
        check_run_folder(out, resume)
        checkpoint, saved = resume_point(out)
    return layer(saved, from_file, given), checkpoint


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
    start = int(run.state.step)
    if start >= settings.steps:
        print(f"{out}: already at step {start} (--steps {settings.steps}); nothing to do",
              file=sys.stderr)
        return 0

    # Every check has passed: only now is anything written.
    out.mkdir(parents=True, exist_ok=True)
    config = run.config()
    write_json_atomically(out / "config.json", config)
    run.tokenizer.save(out / "tokenizer.json")
    metrics_path = out / "metrics.jsonl"
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
        with open(metrics_path, "a") as metrics_file:
            for state, record in train_steps(run.state, run.step_fn, batches, run.put_batch,
                                             total_steps=settings.steps,
                                             grad_accum=settings.grad_accum):
                step = record["step"]
                if settings.eval_every and (step % settings.eval_every == 0
                                            or step == settings.steps):
                    record |= eval_record(run.evaluate(state.model()))
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.update(step, record["loss"], record["tokens_per_s"],
                                record.get("eval_loss"))
                if ((settings.save_every and step % settings.save_every == 0)
                        or step == settings.steps or sigint.raised):
                    checkpointer.save(state, batches.state())
                if sigint.raised:
                    break
    finally:
        sigint.restore()
        batches.close()
    saved = checkpointer.folder / f"step_{step:06d}"
    if step == settings.steps:
        print(f"\ndone: {step} steps; checkpoint {saved}", file=sys.stderr)
    else:
        print(f"\ninterrupted at step {step}; saved {saved}. Continue with: python -m train "
              f"--out {out} --resume", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings, resume_from = parse(argv)
        return run(settings, resume_from)
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        # Ctrl-C before the first step, or a second Ctrl-C: the checkpoints already written
        # are complete (atomic saves); nothing new was saved.
        print("\ninterrupted; no new checkpoint written", file=sys.stderr)
        return 130
