"""Every garbage collection of a process, logged: when it ended, its generation, its pause.

`install(path)` records each collection (`gc.callbacks`) and appends them to `path` every
second from a daemon thread, one line each: unix time, generation, milliseconds, objects
collected. `pauses_line(path, start, end)` sums one window of a log per generation.
`loadtest_tails.py --gc-out DIR` installs it in the clients' process and the server's and prints
each probe's. A collection holds the GIL throughout, so it stalls every thread of its process:
in the clients' process, every client at once.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

FLUSH_S = 1.0


def install(path: str) -> None:
    """Log this process's collections to `path` (appended every `FLUSH_S`)."""
    started = [0.0]
    done: list[str] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            done.append(f"{time.time():.4f} {info['generation']} "
                        f"{(time.perf_counter() - started[0]) * 1e3:.3f} {info['collected']}\n")

    def flush() -> None:
        while True:
            time.sleep(FLUSH_S)
            lines = [done.pop(0) for _ in range(len(done))]
            if lines:
                with open(path, "a") as out:
                    out.writelines(lines)

    gc.callbacks.append(on_gc)
    threading.Thread(target=flush, daemon=True, name="gc-log").start()


def pauses_line(path: Path, start: float, end: float) -> str:
    """The collections logged in [start, end] (unix seconds): per generation, how many, their
    total and longest pause (ms)."""
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    parts = []
    for generation in (0, 1, 2):
        ms = [float(r[2]) for r in rows if int(r[1]) == generation and start <= float(r[0]) <= end]
        parts.append(f"gen {generation}: {len(ms)}, {sum(ms):.0f} ms, longest "
                     f"{max(ms, default=0.0):.1f} ms")
    return "; ".join(parts)
