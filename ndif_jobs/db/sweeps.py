"""The sweeps table and the sweep-wide reads of the jobs table.

A sweep is a named grid of jobs submitted from one file. Its row in `sweeps` keeps the file's
digest, so that the same name submitted from a different file is refused (unless forced)
rather than mixing two experiments under one name; its jobs carry the name and their row
(`jobs.sweep`, `jobs.sweep_row`, indexed together), which is all that progress, resubmission
and the table of results need.

Every operation is one short transaction run through the queue's retry helper, on the
queue's own connections (see `queue.py` and `retry.py`): plain SQL with `?` placeholders,
swapped for `%s` on PostgreSQL by the queue's `_Sql`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BadInput
from ..states import JobState
from .base import OnDatabase
from .queue import CACHED, COMPLETED, FAILED, JOB_STATES, Queue, now
from .retry import retried

_SWEEP_COLUMNS = "name, digest, source, spec, created_at, updated_at"
SWEEP_BY_NAME = f"SELECT {_SWEEP_COLUMNS} FROM sweeps WHERE name = ?"
ALL_SWEEPS = f"SELECT {_SWEEP_COLUMNS} FROM sweeps ORDER BY created_at"
INSERT_SWEEP = f"INSERT INTO sweeps ({_SWEEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
UPDATE_SWEEP = "UPDATE sweeps SET digest = ?, source = ?, spec = ?, updated_at = ? WHERE name = ?"
PROGRESS = (
    "SELECT state, count(*), MIN(finished_at), MAX(finished_at), MIN(created_at) FROM jobs WHERE sweep = ?"
    " GROUP BY state"
)
SWEEP_ROWS = 'SELECT sweep_row, "key", state, id FROM jobs WHERE sweep = ? ORDER BY sweep_row, created_at'
FAILED_OF_SWEEP = f"SELECT id FROM jobs WHERE sweep = ? AND state IN ('{FAILED}', 'cancelled')"
DONE_KEYS = 'SELECT DISTINCT "key" FROM jobs WHERE "key" {keys} AND state IN (\'completed\', \'cached\')' \
    " AND result_key IS NOT NULL"


@dataclass(frozen=True)
class SweepRecord:
    """A row of `sweeps`: the name, the digest of the file it was submitted from, the file's
    text and its parsed form (JSON), and when it was first and last submitted."""

    name: str
    digest: str
    source: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass
class Progress:
    """How far a sweep's jobs got. `rate` (jobs finished per second) and `eta_s` come from the
    first and last finish times of the jobs that ran; None until two have finished."""

    name: str
    counts: dict[str, int]
    first_finished: float | None = None
    last_finished: float | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return self.counts.get(COMPLETED, 0) + self.counts.get(CACHED, 0)

    @property
    def failed(self) -> int:
        return self.counts.get(FAILED, 0)

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed - self.counts.get(JobState.CANCELLED, 0)

    @property
    def rate(self) -> float | None:
        ran = self.counts.get(COMPLETED, 0) + self.failed
        if ran < 2 or self.first_finished is None or self.last_finished is None:
            return None
        span = self.last_finished - self.first_finished
        return (ran - 1) / span if span > 0 else None

    @property
    def eta_s(self) -> float | None:
        if self.remaining == 0:
            return 0.0
        rate = self.rate
        return self.remaining / rate if rate else None

    def percent(self, *states: str) -> float:
        return 100.0 * sum(self.counts.get(s, 0) for s in states) / self.total if self.total else 0.0


@dataclass(frozen=True)
class RowJob:
    """The newest job of one sweep row: what resubmitting compares against."""

    row: int
    key: str
    state: str
    id: str


def _record(row: Sequence[Any]) -> SweepRecord:
    name, digest, source, spec, created, updated = row
    return SweepRecord(name, digest, source, json.loads(spec), float(created), float(updated))


class Sweeps(OnDatabase):
    """The sweep operations of one queue database (its connections, its retry window)."""

    def __init__(self, queue: Queue) -> None:
        super().__init__(queue.engine, queue.db_retry_s, queue._sql)
        self.queue = queue

    @retried
    def save(self, name: str, digest: str, source: str, spec: dict[str, Any], force: bool = False) -> bool:
        """Record sweep `name` as submitted from a file of `digest`. True when it is new.

        The same name from a file of another digest is refused (`BadInput`) unless `force`,
        which makes the new file the sweep's. Saving the same file again only stamps the time."""
        t = now()
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(SWEEP_BY_NAME), (name,))
            row = cur.fetchone()
            if row is None:
                cur.execute(self._sql(INSERT_SWEEP), (name, digest, source, json.dumps(spec, sort_keys=True), t, t))
                return True
            if row[1] != digest and not force:
                raise BadInput(refused_message(name))
            cur.execute(self._sql(UPDATE_SWEEP), (digest, source, json.dumps(spec, sort_keys=True), t, name))
            return False

    @retried
    def get(self, name: str) -> SweepRecord | None:
        with self.db.cursor() as cur:
            cur.execute(self._sql(SWEEP_BY_NAME), (name,))
            row = cur.fetchone()
        return _record(row) if row is not None else None

    def require(self, name: str) -> SweepRecord:
        """The sweep called `name`; `BadInput` naming the known ones if there is none."""
        found = self.get(name)
        if found is None:
            known = [s.name for s in self.all()]
            listed = f" (known: {', '.join(known[:20])})" if known else " (none submitted yet: ndif-jobs sweep FILE)"
            raise BadInput(f"no sweep {name!r}{listed}")
        return found

    @retried
    def all(self) -> list[SweepRecord]:
        with self.db.cursor() as cur:
            cur.execute(self._sql(ALL_SWEEPS))
            return [_record(r) for r in cur.fetchall()]

    @retried
    def progress(self, name: str) -> Progress:
        with self.db.cursor() as cur:
            cur.execute(self._sql(PROGRESS), (name,))
            rows = cur.fetchall()
        counts = {s: 0 for s in JOB_STATES}
        firsts: list[float] = []
        lasts: list[float] = []
        for state, n, first, last, _created in rows:
            counts[state] = int(n)
            # Cached jobs finish the moment they are submitted: they say nothing of the rate.
            if state in (COMPLETED, FAILED) and first is not None:
                firsts.append(float(first))
                lasts.append(float(last))
        return Progress(name, counts, min(firsts) if firsts else None, max(lasts) if lasts else None)

    @retried
    def rows(self, name: str) -> dict[int, RowJob]:
        """Each row of sweep `name` with its newest job (row -> key, state, id)."""
        with self.db.cursor() as cur:
            cur.execute(self._sql(SWEEP_ROWS), (name,))
            found = cur.fetchall()
        return {int(row): RowJob(int(row), key, state, job_id) for row, key, state, job_id in found if row is not None}

    @retried
    def failed_jobs(self, name: str) -> list[str]:
        """The ids of the sweep's failed and cancelled jobs."""
        with self.db.cursor() as cur:
            cur.execute(self._sql(FAILED_OF_SWEEP), (name,))
            return [r[0] for r in cur.fetchall()]

    @retried
    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of `keys` that some job holds a result for (submitting them gives `cached`)."""
        found: set[str] = set()
        with self.db.cursor() as cur:
            for chunk in self._sql.chunks(sorted(set(keys))):
                in_sql, bound = self._sql.in_(chunk)
                cur.execute(self._sql(DONE_KEYS, keys=in_sql), bound)
                found.update(r[0] for r in cur.fetchall())
        return found


def refused_message(name: str) -> str:
    return (f"sweep {name!r} was submitted from a different file: rename the sweep (its `name`), or pass --force"
            " to make this file the sweep's (its jobs so far stay in it)")
