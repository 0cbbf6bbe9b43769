"""hpllm.locking: one writer per folder, a one-line refusal naming the holder, and no stale
lock after the holder is killed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpllm.errors import PathError
from hpllm.locking import LOCK_NAME, LockedError, folder_lock, output_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from hpllm.locking import folder_lock, output_lock
lock = {"folder": folder_lock, "output": output_lock}[sys.argv[1]]
with lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(kind: str, path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


@pytest.mark.parametrize("kind", ["folder", "output"])
def test_a_second_writer_is_refused_with_the_holders_pid_until_it_is_killed(tmp_path, kind):
    path = tmp_path / "run"
    path.mkdir()
    lock = {"folder": folder_lock, "output": output_lock}[kind]
    proc = _holder(kind, path)
    try:
        with pytest.raises(LockedError) as info:
            with lock(path):
                pass
        assert str(info.value) == (f"{path} is in use by another process (PID {proc.pid}); "
                                   "wait for it to finish or stop it")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with lock(path):  # the kernel dropped the killed holder's lock; its stale file is no bar
        pass


def test_the_lock_is_exclusive_within_one_process_and_released_after_the_block(tmp_path):
    with folder_lock(tmp_path) as lock_file:
        assert lock_file == tmp_path / LOCK_NAME
        assert lock_file.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockedError, match=rf"PID {os.getpid()}\)"):
            with folder_lock(tmp_path):
                pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    with folder_lock(tmp_path):
        pass


def test_output_lock_works_before_the_output_exists_and_for_every_spelling(tmp_path):
    (tmp_path / "sub").mkdir()
    with output_lock(tmp_path / "out") as lock_file:
        assert lock_file == tmp_path / ".out.lock" and not (tmp_path / "out").exists()
        with pytest.raises(LockedError):
            with output_lock(tmp_path / "sub" / ".." / "out"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_a_lock_where_nothing_can_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PathError, match=r"cannot lock .*file/run: Not a directory"):
        with folder_lock(tmp_path / "file" / "run"):
            pass
