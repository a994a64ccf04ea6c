"""The queue's tables as SQLAlchemy Core `Table`s, and the job and bundle states.

The queue operations (`queue.py`) work on these directly: Core keeps the CLI's read path and the
worker's hot path free of the ORM's import and per-row costs. `models.py` maps the typed ORM
classes onto the same tables. The schema is made and changed only by the alembic migrations under
`alembic/versions`; a test checks that these definitions match the latest one. Times are UTC
epoch seconds as floats: cheap to compare in SQL on every database.
"""

from __future__ import annotations

import enum
import time

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text


class JobState(str, enum.Enum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    CACHED = "cached"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.CACHED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.CLAIMED, JobState.SUBMITTED, JobState.RUNNING})
DONE_STATES = frozenset({JobState.COMPLETED, JobState.CACHED})


class BundleState(str, enum.Enum):
    RUNNING = "running"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"


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
)
# The claim reads queued jobs highest priority first, oldest first: this index gives that order
# without a sort, however long the queue.
Index("ix_jobs_claim", jobs.c.state, jobs.c.priority.desc(), jobs.c.created_at)
Index("ix_jobs_created", jobs.c.created_at)
Index("ix_jobs_lease", jobs.c.state, jobs.c.lease_expires_at)
# `status` sums stored bytes per result key from this index alone (no table scan, no sort).
Index("ix_jobs_result", jobs.c.result_key, jobs.c.result_bytes)

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
