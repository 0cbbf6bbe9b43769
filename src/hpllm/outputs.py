"""The one rule for where a command may write: never over anything it did not create.

Every command that writes a file or folder the user named (`infer convert --out`,
`train --out`, `train plot --out`, the benchmarks' `--out`) checks the path here first:

    replaces = check_output(args.out, inputs=[source], force=args.force,
                            replaceable=is_earlier_conversion, kind="converted checkpoint")
    with output_lock(out):     # hpllm.locking; then check again, now nobody else writes it
        ...
        write_checkpoint(out, ..., replace=replaces)

`check_output` refuses, with a `UserError` naming the flag, the path and what to do:
- an empty `--out ""` (which would otherwise mean the current folder);
- a path that is one of the inputs, lies inside one, or contains one (always; `force` too);
- an existing file, link to nothing, or anything else that is not a folder;
- a training run or training checkpoint (always; see `checkpoint.is_training_output`);
- an existing non-empty folder, unless `force` is given and `replaceable(path)` says it is an
  earlier output of this same command, holding nothing else;
- a path below a file (`PathError`, "Not a directory").
It returns whether something (an empty folder, or the earlier output) is at the path and will
be replaced: pass that as `replace=` to the writer, which only then replaces a folder.

Paths are compared after resolving symlinks and `..`, so another spelling of an input is still
that input.
"""

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from hpllm.checkpoint import is_training_output
from hpllm.errors import PathError, UserError


def _real(path: Path) -> Path:
    return Path(path).resolve()  # strict=False: resolves as far as the path exists


def check_output(
    out: str | Path,
    *,
    flag: str = "--out",
    inputs: Iterable[str | Path] = (),
    force: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    kind: str = "output",
    force_flag: str | None = "--force",
) -> bool:
    """Refuse `out` unless writing there loses nothing (see the module docstring).

    `out` should be the string the user typed (so that "" is caught before `Path` turns it
    into "."). `inputs` are the paths the command reads. `replaceable(path)` recognises an
    earlier output of this command (only such a folder may be replaced, and only with
    `force`); `kind` names it in messages, `force_flag` names the flag that sets `force`
    (None: the command has none). Returns True when the path exists (an empty folder,
    or an earlier output with `force`) and the writer must replace it.
    """
    if isinstance(out, str) and not out.strip():
        raise UserError(f"{flag} is empty; give a path")
    out = Path(out)
    real = _real(out)
    for given in inputs:
        source = _real(Path(given))
        if real == source:
            raise UserError(f"{flag} {out} is the input {given}; choose a new path")
        if source in real.parents:
            raise UserError(f"{flag} {out} is inside the input {given}; choose a path "
                            "outside it")
        if real in source.parents:
            raise UserError(f"{flag} {out} contains the input {given}; choose a new path")
    _check_parent(out)
    if not os.path.lexists(out):
        return False
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out} is a link to nothing; remove it or choose a new path")
    if not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a folder; choose a new path")
    if is_training_output(out):
        raise UserError(f"{flag} {out} is a training run or checkpoint; it is never replaced. "
                        "Choose a new path")
    if not _is_empty(out):
        earlier = replaceable is not None and replaceable(out)
        if not earlier:
            raise UserError(f"{flag} {out} already exists and holds files this command did not "
                            "write; choose a new path")
        if not force:
            hint = f", or pass {force_flag} to replace it" if force_flag else ""
            raise UserError(f"{flag} {out} already holds a {kind}; choose a new path{hint}")
    return True


def _is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError as error:
        raise PathError.from_os_error(error, folder, "read") from error


def _check_parent(out: Path) -> None:
    """A path under a file can never be created: say so before any work is done."""
    for parent in Path(os.path.abspath(out)).parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise PathError.from_os_error(OSError(errno.ENOTDIR, "Not a directory"), out,
                                              "write", f"{parent} is a file")
            return
