"""The errors a user can fix, and how every command reports them.

Every error that bad input raises (a config, a flag, a path, a checkpoint, a dataset, a slots
file, a folder in use or not writable) derives from `UserError`, and its message names the
problem and the fix. `command` wraps a command's `main`: such an error ends the command with that
one line on stderr and exit code 2, never a traceback. Anything else is a bug and keeps its
traceback. The subclasses live beside what raises them (config.ConfigError, files.WriteError,
locks.LockedError, checkpoint.CheckpointError, slots.SlotsError) and derive from the built-in
exception they replaced too, so `except ValueError` still catches a ConfigError.
"""
from __future__ import annotations

import functools
import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Input a user can fix; the message says what is wrong and what to do."""


class UsageError(UserError, ValueError):
    """A command-line argument that cannot be used (argparse's own checks aside)."""


class MissingExtra(UserError, ImportError):
    """An optional extra that the asked-for feature needs is not installed; the message names
    the pip command."""


class DataError(UserError, ValueError):
    """A dataset folder or setting is unusable; the message names the problem and the fix. Below
    the data readers (data/) and the scene generator (scenes.py), which both raise it."""


def report(e: UserError) -> int:
    """Says `e` as the command's one line on stderr; returns the exit code for it."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def command(main):
    """`main(argv=None) -> exit code`, with a UserError said in one line and exit code 2."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            return report(e)
    return run
