"""`LoopNotices`: the worker loop's one call per pass, which finds what is worth telling.

The events are read from the queue, not from the loop's own steps, so that the loop needs one
call and no knowledge of them: after each claim, `tick` looks (at most every `LOOK_S`) for

* jobs this worker failed for good since the last look (the attempts table names the worker,
  so each failure is told by one worker only);
* sweeps and tags of the jobs this worker finished that have nothing left to run, and the
  whole queue when this worker finds nothing left to claim after doing some work: drained,
  with the counts and the time from the first job's submission to the last one's end. A sweep
  or tag is told by the worker that finished its last job;
* a stall: jobs queued, none finished by anyone for `NDIF_JOBS_STALL_S` (told once a stall);
* a remote backend the worker has found unavailable for `NDIF_JOBS_UNREACHABLE_S` (once an outage).

`close` tells of a worker that stops with an error, and sends what is pending.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from ..logging import get_logger
from .notifier import Notifier
from .settings import NotifySettings

if TYPE_CHECKING:
    from ..worker import Worker

log = get_logger("ndif_jobs.notify")

#: Least seconds between two looks at the queue for events.
LOOK_S = 2.0
_FINAL = "('completed', 'cached', 'failed', 'cancelled')"
_ACTIVE = "('queued', 'claimed', 'submitted', 'running')"

FAILED_BY_ME = text(
    "SELECT j.id, j.experiment, j.error FROM jobs j WHERE j.state = 'failed' AND j.finished_at > :since"
    " AND EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id AND a.worker = :me) ORDER BY j.finished_at, j.id"
)
FINISHED_BY_ME = text(
    f"SELECT DISTINCT j.sweep, j.tags FROM jobs j WHERE j.state IN {_FINAL} AND j.finished_at > :since"
    " AND EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id AND a.worker = :me)"
)
SWEEP_SUMMARY = text(
    "SELECT state, count(*), MIN(created_at), MAX(finished_at) FROM jobs WHERE sweep = :name GROUP BY state"
)
TAG_SUMMARY = text(
    "SELECT state, count(*), MIN(created_at), MAX(finished_at) FROM jobs WHERE tags LIKE :pattern ESCAPE '\\'"
    " GROUP BY state"
)
# Who finished the group's last job: the worker of its last attempt.
LAST_FINISHER = (
    "SELECT a.worker FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE {where} AND j.state IN "
    f"{_FINAL} ORDER BY j.finished_at DESC, a.id DESC LIMIT 1"
)
LAST_FINISHED = text("SELECT MAX(finished_at) FROM jobs")
QUEUED = text("SELECT count(*) FROM jobs WHERE state = 'queued'")


def _like_literal(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class LoopNotices:
    """What one worker tells, found once per pass of its loop."""

    def __init__(self, worker: Worker, notifier: Notifier, settings: NotifySettings) -> None:
        self.worker, self.notifier, self.settings = worker, notifier, settings
        self.engine = worker.service.queue.engine
        started = time.time()
        self._since = started
        self._next_look = 0.0
        self._busy_since: float | None = None
        self._stats_at_busy = (0, 0, 0)
        self._failed_told: set[str] = set()
        self._told_drained: set[tuple[str, str, float]] = set()
        self._stall_told = False
        self._quiet_since = started
        self._outage_since: dict[str, float] = {}
        self._outage_told: set[str] = set()

    @classmethod
    def for_worker(cls, worker: Worker) -> LoopNotices | None:
        """The notices of `worker`, or None when `NDIF_JOBS_NOTIFY` names no target."""
        settings = NotifySettings.load(worker.settings.home)
        if not settings.urls:
            return None
        notifier = Notifier(settings.urls, batch_s=settings.notify_batch_s, timeout_s=settings.notify_timeout_s)
        log.info("notifications on", targets=[t.where for t in notifier.targets])
        return cls(worker, notifier, settings)

    # -- the loop's calls -------------------------------------------------------------------

    def tick(self, claimed: int) -> None:
        """After each claim: `claimed` jobs were taken (0: nothing to do)."""
        stats = self.worker.stats
        if claimed and self._busy_since is None:
            self._busy_since = time.time()
            self._stats_at_busy = (stats.completed, stats.failed, stats.retried)
        t = time.monotonic()
        if t < self._next_look and claimed:
            return
        self._next_look = t + LOOK_S
        try:
            self._look(claimed)
        except Exception as exc:  # noqa: BLE001 - telling must never stop the work
            log.warning("could not look for events to notify", error=str(exc))

    def close(self, error: BaseException | None = None) -> None:
        """The worker is leaving: tell of the last failures (and of `error`), send what is pending."""
        try:
            self._failures(time.time())
        except Exception:  # noqa: BLE001 - the database may be why we leave
            pass
        if error is not None:
            self.notifier.worker_stopped(self.worker.id, f"{type(error).__name__}: {error}")
        self.notifier.close(timeout_s=self.settings.notify_timeout_s)

    # -- what is found -------------------------------------------------------------------

    def _look(self, claimed: int) -> None:
        now = time.time()
        self._failures(now)
        self._groups_drained(now)
        if not claimed:
            self._queue_drained(now)
        self._stall(now)
        self._outages(now)
        self._since = now - 1.0  # overlap a second: finished_at is set inside a transaction begun earlier

    def _failures(self, now: float) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(FAILED_BY_ME, {"since": self._since, "me": self.worker.id}).fetchall()
        for job_id, experiment, error in rows:
            if job_id in self._failed_told:
                continue
            self._failed_told.add(job_id)
            self.notifier.failed(job_id, experiment, error or "failed")

    def _groups_drained(self, now: float) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(FINISHED_BY_ME, {"since": self._since, "me": self.worker.id}).fetchall()
            sweeps = sorted({sweep for sweep, _tags in rows if sweep})
            tags = sorted({tag for _sweep, tags in rows for tag in (tags or "").split(",") if tag})
            for name in sweeps:
                self._group_drained(conn, f"sweep {name}", SWEEP_SUMMARY, {"name": name}, "j.sweep = :name")
            for tag in tags:
                pattern = f"%,{_like_literal(tag)},%"
                self._group_drained(conn, f"tag {tag}", TAG_SUMMARY, {"pattern": pattern},
                                    "j.tags LIKE :pattern ESCAPE '\\'")

    def _group_drained(self, conn: Any, scope: str, summary: Any, params: dict[str, Any], where: str) -> None:
        counts: dict[str, int] = {}
        first, last = float("inf"), 0.0
        for state, n, created, finished in conn.execute(summary, params):
            counts[state] = n
            first = min(first, created)
            last = max(last, finished or 0.0)
        if not counts or any(state in counts for state in ("queued", "claimed", "submitted", "running")):
            return
        told = ("group", scope, last)
        if told in self._told_drained:
            return
        finisher = conn.execute(text(LAST_FINISHER.format(where=where)), params).scalar()
        if finisher != self.worker.id:
            return
        self._told_drained.add(told)
        self.notifier.drained(scope, counts, last - first)

    def _queue_drained(self, now: float) -> None:
        stats = self.worker.stats
        if self._busy_since is None:
            return
        if self.worker.service.queue.waiting_count(runnable=self.worker.runnable) != 0:
            return
        completed, failed, retried = (now_n - then for now_n, then in zip(
            (stats.completed, stats.failed, stats.retried), self._stats_at_busy, strict=True))
        counts = {"completed": completed, "failed": failed, "retried": retried}
        if completed + failed > 0:
            self.notifier.drained("the queue", counts, now - self._busy_since)
        self._busy_since = None

    def _stall(self, now: float) -> None:
        with self.engine.connect() as conn:
            last = conn.execute(LAST_FINISHED).scalar() or 0.0
            queued = int(conn.execute(QUEUED).scalar() or 0)
        self._quiet_since = max(self._quiet_since, last)
        quiet_s = now - self._quiet_since
        if not queued or quiet_s < self.settings.stall_s:
            self._stall_told = False
            return
        if not self._stall_told:
            self._stall_told = True
            self.notifier.stalled(queued, quiet_s)

    def _outages(self, now: float) -> None:
        outages: dict[str, int] = getattr(self.worker.remote, "_outages", {})
        for backend, count in outages.items():
            if not count:
                self._outage_since.pop(backend, None)
                self._outage_told.discard(backend)
                continue
            since = self._outage_since.setdefault(backend, now)
            if now - since >= self.settings.unreachable_s and backend not in self._outage_told:
                self._outage_told.add(backend)
                self.notifier.unreachable(backend.upper() if backend == "ndif" else backend, now - since,
                                          "its requests failed or were refused")
