"""The one exception type for bad user input.

Code that validates what a user handed in (a flag, a file, a folder, a setting) raises
`UserError` or a subclass, with a message that says what to do. The command-line programs
catch this type (and OS errors on the user's paths) and print one `error: ...` line; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names the input and says what to do."""
