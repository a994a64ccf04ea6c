"""The `workers` table: one row per live worker, written by its beat, read by `ndif-jobs workers`.

A worker inserts its row when it starts, updates it every beat (time, bundle in hand, jobs
done) and deletes it when it leaves. A worker killed outright leaves its row behind: `workers`
shows it as stale (no beat for `stale_after_s`, or its process gone on this host), and
`forget` removes such rows. Asking a worker to stop writes `stop_requested` (1: after the
bundle in hand, 2: now), which the worker reads at its next beat: the way to stop a worker on
another host, where no signal reaches.

Like the queue's, every method rides out a database that is briefly unreachable by running its
transaction again (`retry.py`); each is safe to run twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, desc, insert, select, update

from .base import OnDatabase
from .engine import write_transaction
from .retry import retried
from .tables import bundles, now, workers

#: `stop_requested`: finish the bundle in hand, then exit (a first SIGTERM).
STOP_AFTER_BUNDLE = 1
#: `stop_requested`: release held jobs and exit now (a second SIGTERM).
STOP_NOW = 2
#: Bundle states in which a worker has a bundle in hand.
_IN_HAND = ("running", "submitted")


@dataclass(frozen=True)
class WorkerRow:
    """One worker as its last beat left it."""

    id: str
    host: str
    pid: int
    backend: str | None
    started_at: float
    last_beat: float
    bundle_id: str | None
    jobs_done: int
    stop_requested: int

    @classmethod
    def from_row(cls, row: Any) -> WorkerRow:
        return cls(**dict(row._mapping))


class Workers(OnDatabase):
    """The worker-table operations, on the queue's database (a `Database` or an Engine), through
    SQLAlchemy Core."""

    @classmethod
    def of_queue(cls, queue: OnDatabase) -> Workers:
        """The table on `queue`'s database, with its retry window."""
        return cls(queue.engine, queue.db_retry_s)

    @retried
    def register(self, worker_id: str, host: str, pid: int, backend: str | None, started_at: float) -> None:
        """This worker's row, fresh (a re-run replaces what its first run inserted)."""
        t = now()
        with write_transaction(self.engine) as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))
            conn.execute(insert(workers).values(
                id=worker_id, host=host, pid=pid, backend=backend, started_at=started_at, last_beat=t,
                bundle_id=None, jobs_done=0, stop_requested=0,
            ))

    @retried
    def beat(self, worker_id: str, jobs_done: int) -> int | None:
        """Record a beat; returns the stop asked of the worker (0: none), or None when its row is
        gone (forgotten as stale while the worker hung): the caller registers again."""
        in_hand = (
            select(bundles.c.id).where(bundles.c.worker == worker_id, bundles.c.state.in_(_IN_HAND))
            .order_by(desc(bundles.c.created_at)).limit(1).scalar_subquery()
        )
        with write_transaction(self.engine) as conn:
            done = conn.execute(
                update(workers).where(workers.c.id == worker_id)
                .values(last_beat=now(), jobs_done=jobs_done, bundle_id=in_hand)
            )
            if done.rowcount == 0:
                return None
            return int(conn.execute(select(workers.c.stop_requested).where(workers.c.id == worker_id)).scalar_one())

    @retried
    def remove(self, worker_id: str) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    @retried
    def all(self) -> list[WorkerRow]:
        """Every worker row, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(workers).order_by(workers.c.started_at, workers.c.id)).fetchall()
        return [WorkerRow.from_row(r) for r in rows]

    @retried
    def request_stop(self, worker_ids: Sequence[str], level: int) -> int:
        """Ask these workers to stop at their next beat (never lowering a stop already asked)."""
        if not worker_ids:
            return 0
        raised = case((workers.c.stop_requested > level, workers.c.stop_requested), else_=level)
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(workers).where(workers.c.id.in_(list(worker_ids))).values(stop_requested=raised)
            )
            return int(result.rowcount)

    @retried
    def forget(self, worker_ids: Sequence[str]) -> int:
        """Remove the rows of workers that are gone."""
        if not worker_ids:
            return 0
        with write_transaction(self.engine) as conn:
            return int(conn.execute(delete(workers).where(workers.c.id.in_(list(worker_ids)))).rowcount)
