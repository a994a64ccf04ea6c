"""Typed ORM classes for the queue's tables (jobs, bundles, attempts).

They map onto the Core tables of `tables.py`, which the queue operations use directly; these
classes serve code that wants rows as objects (scripts, notebooks, tests) and give alembic its
metadata. The states live in `tables.py` and are re-exported here.
"""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase, Mapped

from . import tables
from .tables import (  # noqa: F401 - re-exported
    ACTIVE_STATES,
    DONE_STATES,
    FINAL_STATES,
    BundleState,
    JobState,
    now,
)


class Base(DeclarativeBase):
    metadata = tables.metadata


class Job(Base):
    __table__ = tables.jobs

    id: Mapped[str]
    key: Mapped[str]
    experiment: Mapped[str]
    model: Mapped[str]
    model_key: Mapped[str]
    backend: Mapped[str]
    params: Mapped[str]
    state: Mapped[str]
    priority: Mapped[int]
    tags: Mapped[str]
    created_at: Mapped[float]
    updated_at: Mapped[float]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    not_before: Mapped[float]
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[float | None]
    attempts: Mapped[int]
    max_attempts: Mapped[int]
    error: Mapped[str | None]
    bundle_id: Mapped[str | None]
    result_key: Mapped[str | None]
    result_bytes: Mapped[int | None]
    estimated_bytes: Mapped[int | None]


class Bundle(Base):
    __table__ = tables.bundles

    id: Mapped[str]
    backend: Mapped[str]
    model_key: Mapped[str]
    state: Mapped[str]
    worker: Mapped[str | None]
    remote_job_id: Mapped[str | None]
    status_history: Mapped[str]
    job_count: Mapped[int]
    created_at: Mapped[float]
    submitted_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    deadline: Mapped[float | None]
    payload_bytes: Mapped[int | None]
    result_bytes: Mapped[int | None]
    error: Mapped[str | None]


class Attempt(Base):
    __table__ = tables.attempts

    id: Mapped[int]
    job_id: Mapped[str]
    bundle_id: Mapped[str | None]
    number: Mapped[int]
    worker: Mapped[str | None]
    started_at: Mapped[float]
    finished_at: Mapped[float | None]
    outcome: Mapped[str | None]
    error: Mapped[str | None]
