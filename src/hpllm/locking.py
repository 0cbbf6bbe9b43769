"""One writer per folder: an exclusive, non-blocking OS lock that a killed process releases.

    with folder_lock(run_dir):          # a folder that outlives the command (a training run)
        ...
    with output_lock(out):              # a path that the command creates by a final rename
        ...

Both take `fcntl.flock(LOCK_EX | LOCK_NB)` on a small lock file and write the holder's PID
into it. The lock belongs to the open file, so it ends when the holder exits for any reason,
`kill -9` included: a stale lock file (left by a killed holder) never blocks anyone. A second
process that wants the same lock does not wait: it gets a `LockedError` (a `UserError`, so the
CLIs print it as one line) naming the folder and the PID that holds it.

- `folder_lock(folder)` locks `folder/.hpllm.lock`; the folder must exist.
- `output_lock(path)` locks `.NAME.lock` beside `path` (in its parent folder), so it works
  before `path` exists, for outputs written into a temporary folder and renamed into place.

The lock file is removed on release. That is safe because a process that gets the lock checks
that the file it locked is still the one at the lock's path (a holder may have unlinked it in
between) and tries again otherwise. OS errors while taking the lock (a read-only folder, a
path under a file) become a `PathError`.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from hpllm.errors import PathError, UserError

LOCK_NAME = ".hpllm.lock"


class LockedError(UserError):
    """Another process holds the lock on a folder."""


def _holder(fd: int) -> str:
    """The PID written in a lock file ("unknown" while the holder has not written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def hold_lock(lock_file: Path, what: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `lock_file` (created if missing) for the `with` block.

    `what` is the folder the lock protects, for the error message. Yields the lock file's
    path. Raises `LockedError` at once if another process holds the lock, `PathError` if the
    lock file cannot be created.
    """
    lock_file = Path(lock_file)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise PathError.from_os_error(error, what, "lock") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockedError(f"{what} is in use by another process (PID {holder}); wait for "
                              "it to finish or stop it") from None
        except OSError as error:
            os.close(fd)
            raise PathError.from_os_error(error, what, "lock") from error
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited behind removed this file: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_file
    finally:
        # Unlink while still holding the lock, so nobody can lock this file and keep it.
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


def folder_lock(folder: Path) -> contextlib.AbstractContextManager[Path]:
    """Lock an existing folder (for example a training run) for one writer: `folder/.hpllm.lock`."""
    folder = Path(folder)
    return hold_lock(folder / LOCK_NAME, folder)


def output_lock(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Lock a path that may not exist yet for one writer: `.NAME.lock` beside it. The parent
    folder must exist (it is where the output gets renamed into place)."""
    path = Path(path)
    real = path.resolve()  # every spelling of the path (symlinks, "..") shares one lock
    return hold_lock(real.parent / f".{real.name}.lock", path)
