"""Live workers: each worker's row in the `workers` table, kept fresh by a beat thread.

The beat runs on its own thread, not in the loop, so that a worker busy with a bundle for an
hour still shows as live. Each beat writes the time, the bundle in hand and the jobs done, and
reads back whether someone asked this worker to stop: `workers stop` signals a worker on its own
host directly, and marks a worker on another host, which stops here at its next beat (1: after
the bundle in hand, as a first SIGTERM; 2: now, as a second).

A beat that fails (the database away) is logged and tried again next beat: keeping the row
fresh never stops the worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import owners
from ..logging import get_logger

if TYPE_CHECKING:
    from ..db.workers import WorkerRow, Workers
    from ..worker import Worker

log = get_logger("ndif_jobs.runner")

#: Seconds between two beats of a worker.
BEAT_S = 10.0
#: A worker with no beat for this long is shown as stale (it hung, or died without its row removed).
STALE_AFTER_S = 3 * BEAT_S + 5


class WorkerRecord:
    """One worker's row: registered on `start`, beaten every `beat_s`, removed on `close`."""

    def __init__(self, table: Workers, worker: Worker, beat_s: float = BEAT_S) -> None:
        self.table, self.worker, self.beat_s = table, worker, beat_s
        self._stop_seen = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-beat")

    @classmethod
    def start(cls, worker: Worker, beat_s: float | None = None) -> WorkerRecord:
        """Register `worker` and start beating (every `NDIF_JOBS_WORKER_BEAT_S`, default 10 s)."""
        from ..db.workers import Workers

        beat_s = beat_s or float(os.environ.get("NDIF_JOBS_WORKER_BEAT_S", BEAT_S))
        record = cls(Workers.of_queue(worker.service.queue), worker, beat_s)
        record._register()
        record._thread.start()
        return record

    def _register(self) -> None:
        owner = owners.parse(self.worker.id)
        try:
            self.table.register(self.worker.id, owners.this_host(), os.getpid(), self.worker.backend_filter,
                                float(owner.started) if owner else time.time())
        except Exception as exc:  # noqa: BLE001 - the worker runs without its row; the next beat tries again
            log.warning("could not register this worker in the workers table", error=str(exc))

    def beat(self) -> bool:
        """One beat now; returns whether a stop was asked of this worker."""
        try:
            asked = self.table.beat(self.worker.id, self.worker.stats.completed + self.worker.stats.failed)
        except Exception as exc:  # noqa: BLE001 - a missed beat is tried again next time
            log.warning("worker beat failed", error=str(exc))
            return self._stop_seen > 0
        if asked is None:
            self._register()
            return self._stop_seen > 0
        if asked > self._stop_seen:
            self._stop_seen = asked
            self._obey(asked)
        return asked > 0

    def _obey(self, level: int) -> None:
        from ..db.workers import STOP_NOW

        now = level >= STOP_NOW
        log.info("stop asked through the workers table", now=now)
        self.worker.stop()
        if now and callable(signal.getsignal(signal.SIGTERM)):
            # The worker's own second-signal path: release held jobs and exit at once.
            os.kill(os.getpid(), signal.SIGTERM)

    def _run(self) -> None:
        while not self._closing.wait(self.beat_s):
            self.beat()

    def close(self) -> None:
        """Stop beating and remove the row: the worker is leaving."""
        self._closing.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.table.remove(self.worker.id)
        except Exception as exc:  # noqa: BLE001 - a row left behind shows as stale
            log.warning("could not remove this worker's row from the workers table", error=str(exc))


# -- reading and stopping workers (the `workers` commands) ------------------------------------


@dataclass(frozen=True)
class LiveWorker:
    """A worker row with what `workers` shows about it."""

    row: WorkerRow
    stale: bool
    here: bool

    @property
    def id(self) -> str:
        return self.row.id


def why_stale(worker_id: str, host: str, last_beat: float, now: float,
              stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a registered worker looks dead ("process gone" on this host, "no beat" for
    `stale_after_s`), or None while it beats."""
    if host == owners.this_host() and owners.is_gone(worker_id):
        return "process gone"
    if now - last_beat > stale_after_s:
        return "no beat"
    return None


def list_workers(table: Workers, stale_after_s: float = STALE_AFTER_S) -> list[LiveWorker]:
    """Every registered worker, each marked stale as `why_stale` judges it."""
    t = time.time()
    out = []
    for row in table.all():
        stale = why_stale(row.id, row.host, row.last_beat, t, stale_after_s) is not None
        out.append(LiveWorker(row, stale, row.host == owners.this_host()))
    return out


@dataclass
class StopReport:
    signalled: list[str]
    marked: list[str]
    forgotten: list[str]


def stop_workers(
    table: Workers, chosen: list[LiveWorker], now: bool, kill: Callable[[int, int], None] = os.kill
) -> StopReport:
    """Stop these workers: a SIGTERM to those on this host (the first stop; with `now`, a second
    one too), and a mark read at the next beat for the others. Rows of gone workers are removed."""
    from ..db.workers import STOP_AFTER_BUNDLE, STOP_NOW

    report = StopReport([], [], [])
    level = STOP_NOW if now else STOP_AFTER_BUNDLE
    remote: list[str] = []
    for worker in chosen:
        if worker.here and owners.is_gone(worker.id):
            report.forgotten.append(worker.id)
        elif worker.here:
            _signal(worker.row.pid, 2 if now else 1, kill)
            report.signalled.append(worker.id)
        else:
            remote.append(worker.id)
    # Local workers are marked too: a worker whose signal handler is not installed (the Python
    # API's `Worker.run`) still stops at its next beat.
    table.request_stop([*remote, *report.signalled], level)
    table.forget(report.forgotten)
    report.marked = remote
    return report


def _signal(pid: int, times: int, kill: Callable[[int, int], None]) -> None:
    for i in range(times):
        if i:
            time.sleep(0.2)  # the first signal's handler has run: the second means "now"
        try:
            kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return


def worker_summary(worker: LiveWorker) -> dict[str, Any]:
    """A worker as `workers --json` prints it."""
    row = worker.row
    return {
        "id": row.id, "host": row.host, "pid": row.pid, "backend": row.backend or "any",
        "started_at": row.started_at, "last_beat": row.last_beat, "bundle": row.bundle_id,
        "jobs_done": row.jobs_done, "stale": worker.stale, "this_host": worker.here,
        "stop_requested": row.stop_requested,
    }
