"""`ndif-jobs logs [--follow]`: the detached worker's log, as `pueue follow` shows a task's.

Prints the last lines, then with `follow` whatever is appended, until the worker's process ends
(or Ctrl-C). A log that shrinks (rotated, truncated) is read again from its start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: Seconds between two looks at a followed log.
FOLLOW_POLL_S = 0.2


def tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last `lines` lines of `path`, and the offset its end was at."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        block, data = 8192, b""
        while size > 0 and data.count(b"\n") <= lines:
            step = min(block, size)
            size -= step
            f.seek(size)
            data = f.read(step) + data
            block *= 2
        end = f.seek(0, os.SEEK_END)
    text = data.decode(errors="replace").splitlines()
    return text[-lines:] if lines > 0 else [], end


def follow(
    path: Path, out: IO[str], lines: int = 20, *, alive: Callable[[], bool] | None = None,
    poll_s: float = FOLLOW_POLL_S, stop_after_s: float | None = None,
) -> None:
    """Print the last `lines` of `path`, then what is appended until `alive()` turns false
    (the rest is printed first), `stop_after_s` passes, or Ctrl-C."""
    last, offset = tail(path, lines)
    for line in last:
        out.write(line + "\n")
    out.flush()
    started = time.monotonic()
    pending = b""
    try:
        while True:
            running = alive() if alive is not None else True
            size = path.stat().st_size if path.exists() else 0
            if size < offset:
                offset = 0  # truncated or rotated: read it again from the start
            if size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(size - offset)
                offset += len(chunk)
                pending += chunk
                complete = pending.split(b"\n")
                pending = complete.pop()
                for raw in complete:
                    out.write(raw.decode(errors="replace") + "\n")
                out.flush()
            if not running or (stop_after_s is not None and time.monotonic() - started > stop_after_s):
                if pending:
                    out.write(pending.decode(errors="replace") + "\n")
                    out.flush()
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return
