"""The one exception type for bad user input, and how OS errors on the user's paths become one.

Code that validates what a user handed in (a flag, a file, a folder, a setting) raises
`UserError` or a subclass, with a message that says what to do. The command-line programs
catch this type and print one `error: ...` line; anything else is a bug and keeps its
traceback.

Operating-system errors on the user's paths (a read-only or full disk, a permission denied, a
file where a folder should be, `/proc`) are user errors too, but they arise deep inside writes
and reads. The code that does the I/O on a path the user chose catches `OSError` there and
re-raises it as `PathError.from_os_error(error, path, "write")` ("cannot write PATH: No space
left on device"), after cleaning up what it had started. The CLIs therefore catch `UserError`
only: an `OSError` that reaches them came from somewhere nobody expected, and shows its
traceback like any other bug.
"""

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user; the message names the input and says what to do."""


class PathError(UserError):
    """The operating system refused an operation on a path the user chose; the message names
    the path and the OS's reason, in one line."""

    @classmethod
    def from_os_error(cls, error: OSError, path: str | Path, action: str,
                      hint: str = "") -> "PathError":
        """`cannot <action> <path>: <reason>[; <hint>]`, where reason is the OS's text for the
        error number ("Read-only file system", "No space left on device") and `path` is what
        the user named (not an internal temporary name). Raise it `from error`."""
        reason = os.strerror(error.errno) if error.errno else (str(error) or type(error).__name__)
        message = f"cannot {action} {path}: {reason}"
        return cls(f"{message}; {hint}" if hint else message)
