"""The queue's tables as SQLAlchemy Core `Table`s: the schema alembic and its test compare against.

The queue operations (`queue.py`) write their statements out by hand and follow these column
lists (a test checks that they do). The schema is made and changed only by the alembic
migrations under `alembic/versions`; a test checks that these definitions match the latest one.
Times are UTC epoch seconds as floats: cheap to compare in SQL on every database. The states
stored in the `state` columns are `ndif_jobs.states`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, text

from ..states import ACTIVE_STATES, DONE_STATES, FINAL_STATES, BundleState, JobState
from .queue import ENDED_ROWS, HELD_ROWS, QUEUED_ROWS

__all__ = [
    "ACTIVE_STATES", "DONE_STATES", "FINAL_STATES", "BundleState", "JobState", "attempts", "bundles", "jobs",
    "metadata", "now", "queue_identity", "results", "sweeps",
]


def now() -> float:
    return time.time()


metadata = MetaData()

bundles = Table(
    "bundles",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("backend", String(20), nullable=False),
    Column("model_key", String(1000), nullable=False),
    Column("state", String(20), nullable=False),
    Column("worker", String(100)),
    Column("remote_job_id", String(100)),
    Column("status_history", Text, nullable=False),
    Column("job_count", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("submitted_at", Float),
    Column("finished_at", Float),
    Column("deadline", Float),
    Column("payload_bytes", Integer),
    Column("result_bytes", Integer),
    Column("error", Text),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key", String(64), nullable=False, index=True),
    Column("experiment", String(200), nullable=False),
    Column("model", String(500), nullable=False),
    Column("model_key", String(1000), nullable=False),
    Column("backend", String(20), nullable=False),
    Column("params", Text, nullable=False),
    Column("state", String(20), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("tags", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("not_before", Float, nullable=False),
    Column("lease_owner", String(100)),
    Column("lease_expires_at", Float),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("error", Text),
    Column("bundle_id", String(32), ForeignKey("bundles.id")),
    Column("result_key", String(64)),
    Column("result_bytes", Integer),
    Column("estimated_bytes", Integer),
    Column("sweep", String(200)),
    Column("sweep_row", Integer),
)
# Each index holds only the rows its readers look for: a job is in two or three of them at a time
# (besides its id and key), so a write touches few b-trees. SQLite uses a partial index only for a
# query that repeats the index's condition word for word: `queue.py` writes its statements so.


def _only(condition: str) -> dict[str, Any]:
    """The dialect options that make an index partial: rows where `condition` holds."""
    return {"sqlite_where": text(condition), "postgresql_where": text(condition)}


# The claim's order (highest priority first, oldest first) over queued jobs, without a sort.
Index("ix_jobs_claim", jobs.c.state, jobs.c.priority.desc(), jobs.c.created_at, **_only(QUEUED_ROWS))
# Held jobs by state and lease end: expired leases (every claim probes it), who holds what.
Index("ix_jobs_lease", jobs.c.state, jobs.c.lease_expires_at, **_only(HELD_ROWS))
# The few jobs that ended without running, newest first per state: `list --state failed`, counts.
Index("ix_jobs_ended", jobs.c.state, jobs.c.created_at, **_only(ENDED_ROWS))
# The latest jobs of any state (`status`, `list`).
Index("ix_jobs_created", jobs.c.created_at)
# A sweep's jobs in row order, for its progress and its table of results.
Index("ix_jobs_sweep", jobs.c.sweep, jobs.c.sweep_row, **_only("sweep IS NOT NULL"))

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("bundle_id", String(32), ForeignKey("bundles.id")),
    Column("number", Integer, nullable=False),
    Column("worker", String(100)),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("outcome", String(20)),
    Column("error", Text),
)

#: Each result in the store, once however many jobs point at it, with its size: what `status`
#: sums as stored bytes without reading the jobs. Written with a job's completion, removed by
#: `gc` (and by `submit` finding a result gone) as it detaches the result's jobs. On SQLite a
#: WITHOUT ROWID table: keyed by `result_key` alone, a completion writes one b-tree here, not two.
results = Table(
    "results",
    metadata,
    Column("result_key", String(64), primary_key=True),
    Column("bytes", Integer, nullable=False),
    sqlite_with_rowid=False,
)

#: A sweep: a grid of jobs submitted from one spec file under one name. Its jobs carry the name
#: and their row; re-submitting the same name with a changed spec is refused by `digest`.
sweeps = Table(
    "sweeps",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("spec", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: Live workers, one row each, written by the worker's own beat (`ndif_jobs/runner/registry.py`):
#: what `ndif-jobs workers` lists, and how a worker on another host is asked to stop (it reads
#: `stop_requested` at its next beat: 1 finish the bundle in hand, 2 now).
workers = Table(
    "workers",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(100), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("backend", String(20)),
    Column("started_at", Float, nullable=False),
    Column("last_beat", Float, nullable=False),
    Column("bundle_id", String(32)),
    Column("jobs_done", Integer, nullable=False),
    Column("stop_requested", Integer, nullable=False),
)

#: One row: this queue's random id, made by its migration. A result store names the queues that
#: keep results in it by this id (`StoreBackend.record_queue`), which `gc` checks.
queue_identity = Table(
    "queue_identity",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", Float, nullable=False),
)
