"""The worker: claim -> bundle -> send/wait -> store -> finish, until told to stop.

* `loop.py`: the loop (claim, group, pack, dispatch, signals) and a bundle's named steps, with
  its outcomes through three handlers (success, failure, retry).
* `remote.py`: what only bundles at a remote backend need: committing the remote job id before
  the wait, re-attaching after a crash, splitting a bundle the backend failed as a whole, and
  the outage breaker.
* `heartbeat.py`: lease renewal while a bundle runs.

Backends (`backends/`) run the bundles; the worker knows them only through their interface.
"""

from __future__ import annotations

from ..errors import BundleTimeout
from .loop import Worker, WorkerStats, worker_id

__all__ = ["BundleTimeout", "Worker", "WorkerStats", "worker_id"]
