"""Training over several processes on JAX's distributed runtime (127.0.0.1, gloo on CPU).

Every run here is real processes started by `python -m train launch`, the same code that runs
one process per host. They are slow on a shared 2-core machine (each process compiles the step,
and the processes' collectives go through TCP), so this file is its own group:
`pytest -m multiprocess` (`make test-multiprocess`, run by .ci/run after `make test`).

Every subprocess is started in its own session and its whole process group is killed when the
test ends, whatever happened.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hpllm.tokenizer import Tokenizer
from train.launch import free_port
from train.sources import open_splits

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[1]
# 4 windows of 32 tokens: splits over 1, 2 or 4 devices. A checkpoint at step 5 and at 10.
FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
        "--steps", "10", "--save-every", "5", "--keep", "0"]
# A run that fails or hangs is stopped after this long (a run takes ~1-2 min on a loaded
# 2-core machine, most of it compiling).
RUN_TIMEOUT_S = 420
# The bound for the survivors of a lost process.
LOST_BOUND_S = 60


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = [text for _, text in zip(range(40), open_splits().train, strict=False)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(texts, 512).save(path)
    return path


class Launch:
    """`python -m train launch ...` in its own process group, its output collected as it
    comes; `stop()` kills the whole group (launcher and every training process)."""

    def __init__(self, processes: int, devices: int, args: list[str]):
        env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
        env.pop("XLA_FLAGS", None)  # the launcher sets the device count
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "train", "launch", "--num-processes", str(processes),
             "--devices-per-process", str(devices), "--", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def pid_of(self, process_id: int) -> int:
        for line in self.lines:
            match = re.fullmatch(rf"launch: process {process_id} started \(pid (\d+)\)", line)
            if match:
                return int(match.group(1))
        raise AssertionError(f"no pid for process {process_id} in:\n{self.output()}")

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"launch still running after {timeout} s:\n{self.output()}") from None
        self.reader.join(10)
        self.proc.stdout.close()
        return code

    def stop(self) -> None:
        # Killed whether or not the launcher is still running: once it is gone, a training
        # process it started may not be.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.reader.join(10)
        # Closed on every path (an open pipe left to the garbage collector is an unraisable
        # ResourceWarning, which fails the session).
        self.proc.stdout.close()


@pytest.fixture
def launches():
    started: list[Launch] = []

    def start(processes: int, devices: int, args: list[str]) -> Launch:
        launch = Launch(processes, devices, args)
        started.append(launch)
        return launch

    yield start
    for launch in started:
        launch.stop()


def run_ok(start, processes: int, devices: int, args: list[str]) -> str:
    launch = start(processes, devices, args)
    code = launch.wait()
    assert code == 0, launch.output()
    return launch.output()


def saved_steps(out: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")
            if p.is_dir()]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_file):
    """Run folders of the same 10 steps as 1 process x 2 devices and 2 processes x 1 device."""
    root = tmp_path_factory.mktemp("runs")
    started: list[Launch] = []
    try:
        for processes, devices in ((1, 2), (2, 1)):
            out = root / f"{processes}x{devices}"
            launch = Launch(processes, devices,
                            [*FAST, "--tokenizer", str(tokenizer_file), "--out", str(out)])
            started.append(launch)
            assert launch.wait() == 0, launch.output()
            if processes == 2:
                output = launch.output()
                # Logs and metrics come from the primary only; its progress bar counts the
                # tokens of all processes (the global batch).
                assert "[0] " in output and "done: 10 steps" in output
                assert not re.search(r"^\[1\] .*(step \d+/|done:)", output, re.MULTILINE)
        yield root
    finally:
        for launch in started:
            launch.stop()


# Measured: 2 x 1 and 1 x 2 gave bit-identical losses on every step here (the same global
# batch, the same per-device computation, the same reduction order); 1e-6 leaves room for a
# reordered float32 sum (about 10 ulp of a loss near 6) without hiding a wrong batch or shard,
# which moves the loss by more than 1e-3.
SAME_LAYOUT_RTOL = 1e-6
# Measured (1 x 4 vs 2 x 2, and resuming on 1 device a run saved by 2): up to ~2e-7 relative,
# float32 reductions over a different split; tolerance set a few times above.
OTHER_LAYOUT_RTOL = 2e-6


def assert_same_losses(a: dict[int, float], b: dict[int, float], rtol: float,
                       steps=range(1, 11)) -> None:
    assert [s for s in steps if s in a] == list(steps), a
    assert [s for s in steps if s in b] == list(steps), b
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=rtol)


def test_two_processes_match_one_process(runs):
    assert_same_losses(losses(runs / "2x1"), losses(runs / "1x2"), SAME_LAYOUT_RTOL)
    checkpoints = sorted(p.name for p in (runs / "2x1" / "checkpoints").iterdir())
    assert checkpoints == ["step_000005", "step_000010"]  # written once, by the primary


def test_two_processes_of_two_devices_match_one_of_four(launches, tmp_path, tokenizer_file):
    args = [*FAST, "--tokenizer", str(tokenizer_file), "--steps", "6", "--save-every", "0"]
    run_ok(launches, 1, 4, [*args, "--out", str(tmp_path / "1x4")])
    run_ok(launches, 2, 2, [*args, "--out", str(tmp_path / "2x2")])
    assert_same_losses(losses(tmp_path / "2x2"), losses(tmp_path / "1x4"), OTHER_LAYOUT_RTOL,
                       steps=range(1, 7))


def resume_from_step_5(source: Path, copy: Path) -> Path:
    """A copy of run `source` as it was at step 5 (the step-10 checkpoint removed)."""
    shutil.copytree(source, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000010")
    return copy


@pytest.mark.parametrize(("saved_by", "processes", "devices", "rtol"), [
    ("2x1", 2, 1, SAME_LAYOUT_RTOL),   # N processes -> N
    ("2x1", 1, 1, OTHER_LAYOUT_RTOL),  # N processes -> 1 (one device)
    ("1x2", 2, 1, SAME_LAYOUT_RTOL),   # 1 process -> N
])
def test_resume_across_process_counts(runs, launches, tmp_path, saved_by, processes, devices,
                                      rtol):
    out = resume_from_step_5(runs / saved_by, tmp_path / "run")
    run_ok(launches, processes, devices, ["--out", str(out), "--resume"])
    resumed = losses(out)
    assert_same_losses(resumed, losses(runs / saved_by), rtol)


def test_lost_process_stops_the_others_and_the_run_resumes(launches, tmp_path, tokenizer_file):
    out = tmp_path / "run"
    args = [*FAST, "--tokenizer", str(tokenizer_file), "--out", str(out), "--steps", "400",
            "--save-every", "2", "--keep", "2"]
    launch = launches(2, 1, args)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # Any checkpoint from step 4 on: with --keep 2 a given step's folder lives only until two
    # later saves, less than one poll on a fast machine.
    while not saved_steps(out) or max(saved_steps(out)) < 4:
        assert launch.proc.poll() is None, launch.output()
        assert time.monotonic() < deadline, launch.output()
        time.sleep(0.5)
    os.kill(launch.pid_of(1), signal.SIGKILL)
    killed = time.monotonic()
    code = launch.wait(LOST_BOUND_S + 30)
    output = launch.output()
    assert code != 0, output
    survivor = [line for line in output.splitlines() if line.startswith("[0] error:")]
    assert len(survivor) == 1 and "lost process 1" in survivor[0], output
    assert "process 0 failed (exit status 3)" in output, output
    # The survivor's exit, not the launcher's kill after its grace period, ended the run.
    assert "killing it" not in output, output
    assert time.monotonic() - killed < LOST_BOUND_S + 15, output

    last = max(saved_steps(out))
    assert last >= 4
    run_ok(launches, 2, 1, ["--out", str(out), "--resume", "--steps", str(last + 2)])
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, last + 3))


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path, tokenizer_file):
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "train", *FAST, "--tokenizer", str(tokenizer_file), "--out",
         str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{free_port()}",
         "--num-processes", "2", "--process-id", "1", "--init-timeout", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not join" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Check failure" not in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def test_out_of_range_process_id_is_refused(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    result = subprocess.run(
        [sys.executable, "-m", "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
         "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --process-id 2 is out of range: with --num-processes 2 the ids are 0..1, "
        "each given to exactly one process"]


def test_processes_with_different_settings_are_refused(tmp_path, tokenizer_file):
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    port = free_port()
    common = [sys.executable, "-m", "train", *FAST, "--tokenizer", str(tokenizer_file),
              "--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2", "--init-timeout", "60"]
    procs = [subprocess.Popen([*common, "--process-id", str(i), "--lr", lr], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for i, lr in ((0, "0.001"), (1, "0.002"))]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, err
            assert "the resolved settings differ between processes" in err, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not (tmp_path / "run").exists()
