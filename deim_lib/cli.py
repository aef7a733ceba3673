"""What every command line of the project shares: help that shows defaults, and one-line errors with exit code 2."""

import argparse
import os
import sys

from deim_lib.errors import UserError, one_line


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
