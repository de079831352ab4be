"""Where a command writes, checked before it works: a long run never ends on a path it
cannot write (the measurement lost, a traceback instead of one line)."""

from __future__ import annotations

import os
from pathlib import Path

from splitllm.errors import UserError


def output_dir(path: Path, option: str) -> Path:
    """`path`, a folder `option` names for a command's output, created now if missing."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create this folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: this folder is not writable")
    return path


def output_file(path: Path, option: str) -> Path:
    """`path`, a file `option` names for a command's output: its folder exists (created now)
    and is writable, and the path is not a folder."""
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder, not a file")
    output_dir(path.parent, option)
    return path
