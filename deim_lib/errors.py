"""The one base class of problems with the user's input (files, keys, values), as opposed to bugs.

Every command catches ``UserError`` once and prints its message as one line: what is wrong, which file or key, and
the fix. Anything else (a failing worker process, a full disk, a bug) keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file or key and the fix."""


def one_line(error: BaseException) -> str:
    """The user-facing line of ``error``.

    A DataLoader worker re-raises a worker's exception with the worker's traceback prepended to the message; the
    original message is then its last line, after the exception's class name.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0]
    kind = type(error)
    line = lines[-1]  # the worker's "ClassName: message" or "package.module.ClassName: message"
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__name__}: "):
        line = line.removeprefix(prefix)
    return line


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be used; the message names the file and the fix."""


class OutputError(UserError):
    """An output folder or file that cannot be written; the message names it and what is intact."""
