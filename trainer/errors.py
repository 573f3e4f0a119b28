"""Expected user errors: one base class, so every entry point can print them as one or two lines and exit 2.

A `UserError` means the input is wrong (a config key, a data folder, a checkpoint file, a disk), never a bug:
its message names the input and the way out. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2  # as argparse: the command line or its inputs are wrong


class UserError(Exception):
    """A wrong input, told in words: the message names the input (a config key, a path) and the fix."""
