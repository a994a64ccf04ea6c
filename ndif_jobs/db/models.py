"""The queue's tables: jobs, bundles (one request to a backend) and attempts.

The schema is made and changed only by the alembic migrations under `alembic/versions`; these
classes describe it for SQLAlchemy and must match the latest migration (a test checks that).
Times are stored as UTC floats (epoch seconds): cheap to compare in SQL on every database, and
free of time-zone surprises.
"""

from __future__ import annotations

import enum
import time

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    experiment: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(500))
    model_key: Mapped[str] = mapped_column(String(1000))
    backend: Mapped[str] = mapped_column(String(20))
    params: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    tags: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text)
    bundle_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("bundles.id"))
    result_key: Mapped[str | None] = mapped_column(String(64))
    result_bytes: Mapped[int | None] = mapped_column(Integer)
    estimated_bytes: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_jobs_claim", "state", "priority", "created_at"),
        Index("ix_jobs_created", "created_at"),
    )

    @property
    def tag_list(self) -> list[str]:
        return [t for t in self.tags.strip(",").split(",") if t]


class Bundle(Base):
    __tablename__ = "bundles"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    backend: Mapped[str] = mapped_column(String(20))
    model_key: Mapped[str] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(20), default=BundleState.RUNNING.value)
    worker: Mapped[str | None] = mapped_column(String(100))
    remote_job_id: Mapped[str | None] = mapped_column(String(100))
    status_history: Mapped[str] = mapped_column(Text, default="[]")
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    submitted_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    deadline: Mapped[float | None] = mapped_column(Float)
    payload_bytes: Mapped[int | None] = mapped_column(Integer)
    result_bytes: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    bundle_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("bundles.id"))
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
