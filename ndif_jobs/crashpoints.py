"""Named points in a job's life where a test can make this process die, to prove recovery from each.

`NDIF_JOBS_CRASH_AT=<point>` makes the process SIGKILL itself the first time it reaches that
point: no `finally`, no signal handler, no flush, exactly as when the machine's OOM killer or
a power cut stops a worker. It is read from the environment (not a setting, so a `.env` cannot
switch it on by mistake) and is meant for tests only (`tests/test_crash_points.py`).

The points, in the order a job meets them:

  claimed     the claim is committed; no bundle has started
  running     the bundle is recorded and its jobs are `running`; nothing sent or run yet
  posted      NDIF accepted the request; its job id is not yet recorded here
  submitted   NDIF's job id is recorded; the worker is about to wait for it
  downloaded  NDIF's result is downloaded and decoded; nothing is stored yet
  storing     a result is written to its temporary folder, not yet renamed into place
  stored      a result is in place; its job is not yet marked completed
  finished    the bundle's jobs are marked completed
"""

from __future__ import annotations

import os
import signal

from .errors import BadInput

POINTS = ("claimed", "running", "posted", "submitted", "downloaded", "storing", "stored", "finished")

ENV = "NDIF_JOBS_CRASH_AT"


def _armed() -> str | None:
    point = os.environ.get(ENV) or None
    if point is not None and point not in POINTS:
        raise BadInput(f"{ENV}={point!r} is not a crash point (choose from: {', '.join(POINTS)})")
    return point


_point = _armed()


def reached(point: str) -> None:
    """Die here, at once, if this is the armed point."""
    if _point == point:
        os.kill(os.getpid(), signal.SIGKILL)
