"""What every command line of the project shares: help that shows defaults, and one-line errors with exit code 2."""

import argparse
import os
import sys
from pathlib import Path

from deim_lib.errors import OutputError, UserError, one_line


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (it holds example commands) and the default of every flag that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def report(error: UserError) -> int:
    """Print ``error`` as the one line a user reads (under torchrun, from the first process only); exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {one_line(error)}", file=sys.stderr)
    return 2


def make_output_dir(path: str | Path, flag: str) -> Path:
    """Create the folder ``path`` (given as ``flag``); a file in the way, or a folder that cannot be created or written,
    is a one-line error naming both, before any work starts."""
    path = Path(path)
    blocking = next((part for part in (path, *path.parents) if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"{flag} {path}: {blocking} is a file, not a folder; pass another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"{flag} {path}: cannot create the folder ({reason}); pass another {flag}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: the folder is not writable; pass another {flag}")
    return path
