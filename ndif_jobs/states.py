"""The states of jobs and bundles, and the outcomes of attempts: the one place they are spelled.

Standard library only, so that the CLI's read path, the queue's SQL and the worker share these
without importing SQLAlchemy. Each state is a `str`: it compares equal to the text stored in the
database, and formats as that text, so the queue writes `f"state = '{JobState.QUEUED}'"` into its
SQL and reads rows back as plain strings.

A job's life: queued -> claimed -> running -> completed, or failed after its attempts are spent,
or back to queued with a time to retry. A job at a remote backend (NDIF) is `submitted` between
running and completed. A submission whose computation is already stored is `cached` at once.
"""

from __future__ import annotations

import enum


class _Text(str, enum.Enum):
    """A state that is its own text wherever it is written (f-strings, `str()`, JSON)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


class JobState(_Text):
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


#: States a job does not leave by itself.
FINAL_STATES = frozenset({JobState.COMPLETED, JobState.CACHED, JobState.FAILED, JobState.CANCELLED})
#: States of a job that some worker may still run or wait on.
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.CLAIMED, JobState.SUBMITTED, JobState.RUNNING})
#: States of a job whose result is stored.
DONE_STATES = frozenset({JobState.COMPLETED, JobState.CACHED})
#: States a job is in while some worker holds it (on a lease).
HELD_STATES = (JobState.CLAIMED, JobState.RUNNING, JobState.SUBMITTED)
#: Held states whose work lives only in the worker: an expired lease sends them back to the queue.
#: A `submitted` job's work is at the remote backend: another worker re-attaches to it instead.
LOCAL_HELD_STATES = (JobState.CLAIMED, JobState.RUNNING)


class BundleState(_Text):
    RUNNING = "running"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"


class AttemptOutcome(_Text):
    """How one attempt at a job ended (an open attempt has none yet)."""

    COMPLETED = "completed"
    FAILED = "failed"
    #: Given back untouched by a worker shutting down.
    RELEASED = "released"
    #: Put back by the outage breaker, no attempt spent.
    DEFERRED = "deferred"
    #: Its worker stopped renewing the lease (it died or hung).
    LEASE_EXPIRED = "lease expired"
    #: Its worker's process was found gone on its host.
    WORKER_GONE = "worker gone"
    #: Not an attempt: a note that the job was filed under a new key (see `Queue.rekey`).
    REKEYED = "re-keyed"


#: How the error of a queued job held back while NDIF does not run its model begins (no attempt
#: spent, not an error): `status` counts these apart from the jobs waiting to retry.
MODEL_WAIT_PREFIX = "waiting for NDIF to run "
