"""The one error type for user mistakes: the CLI prints it as one line, exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a user (a file, a flag, a preset name): shown as one clear line."""
