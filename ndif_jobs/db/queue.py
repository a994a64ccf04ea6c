"""Queue operations: every read and write of the jobs, bundles and attempts tables.

One `Queue` wraps one database. Writes are short transactions that hold the write lock from
their first statement (`Database.cursor(write=True)`: `BEGIN IMMEDIATE` on SQLite; a write of one
statement, such as queueing a single job of a new key, is its own transaction); the claim
is one such transaction, so two workers can never take the same job (on PostgreSQL the claim
uses `FOR UPDATE SKIP LOCKED` so workers do not even wait for each other). The claim takes only
jobs its worker can run (`Runnable`: its backend, its local stand-ins, the experiments it has
loaded), chosen in its own WHERE clause: a job no worker of a kind can run is never claimed and
given back, it stays queued for a worker that can.

The statements are written out below and run straight on the driver's cursor, a few per
transaction, each over a whole batch (`executemany`, or one `UPDATE ... RETURNING`): building
and compiling SQLAlchemy statements cost more than SQLite took to run them, and importing
SQLAlchemy alone costs the CLI's read commands a tenth of a second. They are plain SQL that
SQLite and PostgreSQL both read, with `?` placeholders (`%s` for PostgreSQL, swapped once) and
two dialect differences: `FOR UPDATE SKIP LOCKED`, and `= ANY(array)` for a list of ids. The
schema itself is `tables.py` and the alembic migrations; the row types here follow it (a test
checks). Most of its indexes are partial (queued jobs, held jobs, ...): a statement meant to read
one repeats its condition (`QUEUED_ROWS`, `HELD_ROWS`, `ENDED_ROWS`), which is what lets SQLite
use it.

A job's life (see `ndif_jobs.states`): queued -> claimed -> running -> completed, or failed after
its attempts are spent, or back to queued with a `not_before` time to retry. A bundle's outcome
is recorded by `complete`, `fail` (with a retry time or for good) and `close_bundle`, each its
own transaction, or several as one through `in_transaction`. Each is conditional on the
recording worker still holding the lease, which makes a late or duplicate completion a no-op
instead of a second result.

Every method that touches the database rides out a database that is briefly unreachable or
locked by running its transaction again (`retry.py`, for up to `db_retry_s` seconds). Each is
safe to run again even when the first run's COMMIT went through unseen; the few that must know
they are a re-run (`enqueue`, `claim`, `start_bundle`) are told so. See `retry.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..errors import BadInput, JobNotFound, StoreError, clip_error
from ..states import (
    ACTIVE_STATES,
    DONE_STATES,
    HELD_STATES,
    LOCAL_HELD_STATES,
    MODEL_WAIT_PREFIX,
    AttemptOutcome,
    BundleState,
    JobState,
)
from .base import Dialect, OnDatabase
from .engine import Database
from .retry import DEFAULT_RETRY_S, call_stamped_with_retry, call_with_retry, retried

if TYPE_CHECKING:
    from sqlalchemy import Engine

# Short names for the states the statements below are written with.
QUEUED, CLAIMED, SUBMITTED, RUNNING = JobState.QUEUED, JobState.CLAIMED, JobState.SUBMITTED, JobState.RUNNING
COMPLETED, CACHED, FAILED, CANCELLED = JobState.COMPLETED, JobState.CACHED, JobState.FAILED, JobState.CANCELLED
#: Every job state's text, in `JobState`'s order (which `counts` keeps).
JOB_STATES: tuple[str, ...] = tuple(s.value for s in JobState)



def now() -> float:
    return time.time()


def _like_literal(text: str) -> str:
    """`text` matched literally by LIKE ... ESCAPE '\\' (`%` and `_` are wildcards otherwise)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _clip_errors(failed: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(job_id, clip_error(error)) for job_id, error in failed]


def new_id() -> str:
    """A short, typeable job or bundle id (48 random bits; `show` accepts a unique prefix)."""
    import secrets  # only submitting and claiming need it: the read commands start without it

    return secrets.token_hex(6)


def encode_tags(tags: Iterable[str]) -> str:
    """Tags stored as `,a,b,` so that one `LIKE '%,a,%'` finds a tag exactly."""
    if not tags:
        return ""
    clean = sorted({t.strip() for t in tags if t.strip()})
    for tag in clean:
        if "," in tag or "%" in tag or "_" in tag:
            raise BadInput(f"tag {tag!r} may not contain ',', '%' or '_'")
    return f",{','.join(clean)}," if clean else ""


@dataclass
class NewJob:
    """What `submit` hands the queue: one experiment to run (or to serve from the store)."""

    key: str
    experiment: str
    model: str
    model_key: str
    backend: str
    params: dict[str, Any]
    priority: int = 0
    tags: Sequence[str] = ()
    max_attempts: int = 3
    estimated_bytes: int | None = None
    force: bool = False
    id: str = field(default_factory=new_id)
    #: Keys earlier versions filed this same computation under: a result there is found too.
    aliases: tuple[str, ...] = ()
    #: The sweep this job is one row of (its name), and which row.
    sweep: str | None = None
    sweep_row: int | None = None


@dataclass(frozen=True)
class Enqueued:
    """The outcome of submitting one `NewJob`: a new job, a join of a running one, or a cache hit."""

    id: str
    state: str
    joined: bool = False


@dataclass(frozen=True)
class Runnable:
    """The jobs one worker can run, which its claim selects in SQL (so the jobs it cannot run
    are never claimed, released and claimed again by the next worker of its kind).

    `backend`: None takes every job to its own backend; `ndif` only NDIF jobs; `local` local
    jobs and the NDIF jobs whose model is in `standins` (run here through their stand-in).
    `experiments`: the experiments this worker has loaded (None: any)."""

    backend: str | None = None
    standins: tuple[str, ...] = ()
    experiments: tuple[str, ...] | None = None

    def takes_backend(self, backend: str, model: str) -> bool:
        """Whether a job of `backend` and `model` is this worker's kind, whatever its experiment."""
        if self.backend in (None, backend):
            return True
        return self.backend == "local" and backend == "ndif" and model in self.standins

    @property
    def takes_submitted(self) -> bool:
        """Whether jobs at NDIF are this worker's to wait on (a local worker cannot re-attach)."""
        return self.backend != "local"


# -- rows ------------------------------------------------------------------------------------


class JobRow(NamedTuple):
    """A row of `jobs`: fields by name (`row.state`) or position, and `row._mapping`."""

    id: str
    key: str
    experiment: str
    model: str
    model_key: str
    backend: str
    params: str
    state: str
    priority: int
    tags: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    lease_owner: str | None
    lease_expires_at: float | None
    attempts: int
    max_attempts: int
    error: str | None
    bundle_id: str | None
    result_key: str | None
    result_bytes: int | None
    estimated_bytes: int | None
    sweep: str | None
    sweep_row: int | None

    @property
    def _mapping(self) -> dict[str, Any]:
        """The row as a dict, as SQLAlchemy's `Row._mapping` gives it."""
        return self._asdict()


class BundleRow(NamedTuple):
    """A row of `bundles`: one request to a backend, with its jobs' common model."""

    id: str
    backend: str
    model_key: str
    state: str
    worker: str | None
    remote_job_id: str | None
    status_history: str
    job_count: int
    created_at: float
    submitted_at: float | None
    finished_at: float | None
    deadline: float | None
    payload_bytes: int | None
    result_bytes: int | None
    error: str | None

    @property
    def _mapping(self) -> dict[str, Any]:
        return self._asdict()


class AttemptRow(NamedTuple):
    """A row of `attempts`: one worker's go at a job, and how it ended."""

    id: int
    job_id: str
    bundle_id: str | None
    number: int
    worker: str | None
    started_at: float
    finished_at: float | None
    outcome: str | None
    error: str | None

    @property
    def _mapping(self) -> dict[str, Any]:
        return self._asdict()


#: The columns of each table, in `tables.py`'s order (a test checks them against it).
JOB_COLUMNS: tuple[str, ...] = JobRow._fields
BUNDLE_COLUMNS: tuple[str, ...] = BundleRow._fields
ATTEMPT_COLUMNS: tuple[str, ...] = AttemptRow._fields

_job_row = JobRow._make
# `json.dumps(params, sort_keys=True)`, without building a new encoder for every job.
_params_json = json.JSONEncoder(sort_keys=True).encode


class _Existing(NamedTuple):
    id: str
    key: str
    state: str
    result_key: str | None



def _insert_row(
    job: NewJob, state: str, created: float, finished: float | None, result_key: str | None
) -> tuple[Any, ...]:
    """The values of `INSERT_JOB` (`_INSERT_COLUMNS`, in order) for a new job."""
    return (
        job.id, job.key, job.experiment, job.model, job.model_key, job.backend, _params_json(job.params), state,
        job.priority, encode_tags(job.tags), created, created, finished, 0.0, 0, job.max_attempts, result_key,
        job.estimated_bytes, job.sweep, job.sweep_row,
    )


def _standing_for(job: NewJob, existing: dict[str, _Existing]) -> _Existing | None:
    """The job that stands for `job`'s computation, under its key or an older one: a done one first."""
    found = [existing[k] for k in (job.key, *job.aliases) if k in existing]
    return next((row for row in found if row.state in DONE_STATES), found[0] if found else None)


# -- the statements --------------------------------------------------------------------------


def _q(names: Iterable[str]) -> str:
    return ", ".join(f'"{n}"' if n == "key" else n for n in names)


_JOBS = _q(JOB_COLUMNS)
def _sql_list(states: Iterable[str]) -> str:
    """States as a SQL list of literals, in `JobState`'s order (so each statement is one text)."""
    wanted = set(states)
    return ", ".join(f"'{s}'" for s in JobState if s in wanted)


# The conditions of the partial indexes (`tables.py`). SQLite uses a partial index only for a
# query whose WHERE repeats its condition word for word, so the statements below use these.
#: Queued jobs (`ix_jobs_claim`).
QUEUED_ROWS = f"state = '{QUEUED}'"
#: Jobs some worker holds on a lease (`ix_jobs_lease`).
HELD_ROWS = f"state IN ({_sql_list(HELD_STATES)})"
#: Jobs that ended without running: served from the store, failed, cancelled (`ix_jobs_ended`).
ENDED_ROWS = f"state IN ({_sql_list((CACHED, FAILED, CANCELLED))})"

_HELD = HELD_ROWS
# Held jobs of one kind, each condition led by the lease index's own.
_LOCAL_HELD = f"{HELD_ROWS} AND state IN ({_sql_list(LOCAL_HELD_STATES)})"
_HELD_RUNNING = f"{HELD_ROWS} AND state = '{RUNNING}'"
HELD_AT_REMOTE = f"{HELD_ROWS} AND state = '{SUBMITTED}'"
_ACTIVE_SQL = _sql_list(ACTIVE_STATES)
_DONE_SQL = _sql_list(DONE_STATES)

_INSERT_COLUMNS = (
    "id", "key", "experiment", "model", "model_key", "backend", "params", "state", "priority", "tags",
    "created_at", "updated_at", "finished_at", "not_before", "attempts", "max_attempts", "result_key",
    "estimated_bytes", "sweep", "sweep_row",
)
INSERT_JOB = f"INSERT INTO jobs ({_q(_INSERT_COLUMNS)}) VALUES ({', '.join('?' * len(_INSERT_COLUMNS))})"
# One submission whose key (and older keys) no job has: queued by this one statement, which reads
# and writes under the write lock (`Database.cursor(one_statement=True)`). Any job of those keys,
# in any state, leaves it to `_enqueue`, which joins, serves from the store or queues anew.
INSERT_NEW_KEY = (
    f"INSERT INTO jobs ({_q(_INSERT_COLUMNS)}) SELECT {', '.join('?' * len(_INSERT_COLUMNS))}"
    ' WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE "key" {keys})'
)
# Every job of the given keys; `_existing_by_key` keeps those that stand for their key. (Filtering
# on state in SQL tempts SQLite's planner into scanning `ix_jobs_lease` by state instead.)
EXISTING_BY_KEY = 'SELECT id, "key", state, result_key FROM jobs WHERE "key" {keys}'
REQUEUE_EXPIRED = (
    f"UPDATE jobs SET state = '{QUEUED}', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
    f" WHERE {_LOCAL_HELD} AND lease_expires_at < ? RETURNING id"
)
#: Whether any lease `REQUEUE_EXPIRED` would end has run out: the same index probe, read only.
ANY_EXPIRED = f"SELECT 1 FROM jobs WHERE {_LOCAL_HELD} AND lease_expires_at < ? LIMIT 1"
#: The attempt a dead worker left open, closed when its job is requeued or re-attached.
LOSE_ATTEMPTS = (
    f"UPDATE attempts SET finished_at = ?, outcome = '{AttemptOutcome.LEASE_EXPIRED}',"
    " error = 'its worker stopped renewing the lease (it died or hung)' WHERE job_id {ids} AND finished_at IS NULL"
)
# One statement takes the jobs and returns them: highest priority, then oldest, first.
CLAIM = (
    f"UPDATE jobs SET state = '{CLAIMED}', lease_owner = ?, lease_expires_at = ?, attempts = attempts + 1,"
    " updated_at = ?, started_at = COALESCE(started_at, ?), error = NULL"
    f" WHERE id IN (SELECT id FROM jobs WHERE state = '{QUEUED}' AND not_before <= ?{{runnable}}"
    f" ORDER BY priority DESC, created_at LIMIT ?{{skip_locked}}) RETURNING {_JOBS}"
)
# A re-run claim takes over what an earlier run of it claimed unseen: the jobs leased to this
# worker at exactly that run's time (nothing else gives them that `updated_at`), on a fresh lease.
ADOPT_CLAIMED = (
    f"UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE {HELD_ROWS} AND state = '{CLAIMED}'"
    " AND lease_owner = ?"
    f" AND updated_at {{times}} RETURNING {_JOBS}"
)
INSERT_ATTEMPT = "INSERT INTO attempts (job_id, number, worker, started_at) VALUES (?, ?, ?, ?)"
COMPLETE = (
    f"UPDATE jobs SET state = '{COMPLETED}', result_key = ?, result_bytes = ?, finished_at = ?, updated_at = ?,"
    f" lease_owner = NULL, lease_expires_at = NULL, error = NULL WHERE id = ? AND lease_owner = ? AND {_HELD}"
)
# Only the finishing worker's own attempt: a late finish must not close a later owner's attempt.
CLOSE_ATTEMPTS = (
    "UPDATE attempts SET finished_at = ?, outcome = ?, error = ?"
    " WHERE job_id = ? AND worker = ? AND finished_at IS NULL"
)
HELD_ATTEMPTS = f"SELECT attempts, max_attempts FROM jobs WHERE id = ? AND lease_owner = ? AND {_HELD}"
RETRY_LATER = (
    f"UPDATE jobs SET state = '{QUEUED}', not_before = ?, error = ?, updated_at = ?, lease_owner = NULL,"
    " lease_expires_at = NULL WHERE id = ?"
)
FAIL = (
    f"UPDATE jobs SET state = '{FAILED}', finished_at = ?, error = ?, updated_at = ?, lease_owner = NULL,"
    " lease_expires_at = NULL WHERE id = ?"
)
FAIL_HELD = (
    f"UPDATE jobs SET state = '{FAILED}', error = ?, finished_at = ?, updated_at = ?, lease_owner = NULL,"
    f" lease_expires_at = NULL WHERE id = ? AND lease_owner = ? AND {_HELD}"
)
FINISH_BUNDLE = "UPDATE bundles SET state = ?, finished_at = ?, error = ? WHERE id = ?"
INSERT_BUNDLE = (
    "INSERT INTO bundles (id, backend, model_key, state, worker, status_history, job_count, created_at)"
    " VALUES (?, ?, ?, ?, ?, '[]', ?, ?)"
)
BUNDLE_OF_WORKER = "SELECT 1 FROM bundles WHERE id = ? AND worker = ?"
START_JOBS = f"UPDATE jobs SET state = '{RUNNING}', bundle_id = ?, updated_at = ? WHERE id {{ids}} AND lease_owner = ?"
START_ATTEMPTS = "UPDATE attempts SET bundle_id = ? WHERE job_id {ids} AND finished_at IS NULL"
RENEW = f"UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id {{ids}} AND lease_owner = ? AND {_HELD}"
RELEASE = (
    f"UPDATE jobs SET state = '{QUEUED}', lease_owner = NULL, lease_expires_at = NULL,"
    f" attempts = {{max}}(attempts - 1, 0), updated_at = ? WHERE lease_owner = ? AND {_LOCAL_HELD}{{ids}}"
)
RELEASE_ATTEMPTS = (
    f"UPDATE attempts SET finished_at = ?, outcome = '{AttemptOutcome.RELEASED}' WHERE job_id IN"
    f" (SELECT id FROM jobs WHERE state = '{QUEUED}' AND updated_at = ?) AND finished_at IS NULL AND worker = ?"
)
# Back to the queue for a while with no attempt spent: the backend, not the job, was at fault.
DEFER = (
    f"UPDATE jobs SET state = '{QUEUED}', not_before = ?, error = ?, updated_at = ?, lease_owner = NULL,"
    f" lease_expires_at = NULL, attempts = {{max}}(attempts - 1, 0) WHERE id {{ids}} AND lease_owner = ?"
    f" AND {_LOCAL_HELD}"
)
DEFER_ATTEMPTS = (
    f"UPDATE attempts SET finished_at = ?, outcome = '{AttemptOutcome.DEFERRED}', error = ?"
    " WHERE job_id {ids} AND worker = ? AND finished_at IS NULL"
)
STATE_OF = "SELECT state FROM jobs WHERE id = ?"
CANCEL = (
    f"UPDATE jobs SET state = '{CANCELLED}', finished_at = ?, updated_at = ?, lease_owner = NULL,"
    " lease_expires_at = NULL WHERE id = ?"
)
REQUEUE = (
    f"UPDATE jobs SET state = '{QUEUED}', attempts = 0, not_before = 0.0, error = NULL, finished_at = NULL,"
    " result_key = NULL, result_bytes = NULL, bundle_id = NULL, updated_at = ? WHERE id = ?"
)
# Only while the job is still this worker's, and only once: a re-run finds the key already moved.
REKEY = (
    f'UPDATE jobs SET "key" = ?, model_key = ?, updated_at = ? WHERE id = ? AND lease_owner = ? AND {_HELD}'
    ' AND "key" <> ?'
)
NOTE_REKEYED = (
    "INSERT INTO attempts (job_id, bundle_id, number, worker, started_at, finished_at, outcome, error)"
    f" SELECT id, bundle_id, attempts, ?, ?, ?, '{AttemptOutcome.REKEYED}', ? FROM jobs WHERE id = ?"
)
# Queued jobs of the keys a bundle runs join it: the computation runs once for all of them.
JOIN_BUNDLE = (
    f"UPDATE jobs SET state = '{RUNNING}', bundle_id = ?, lease_owner = ?, lease_expires_at = ?,"
    " attempts = attempts + 1, updated_at = ?, started_at = COALESCE(started_at, ?), error = NULL"
    f" WHERE state = '{QUEUED}' AND backend = ? AND" ' "key" {keys}'
)
JOINED_ATTEMPTS = (
    "INSERT INTO attempts (job_id, bundle_id, number, worker, started_at)"
    f" SELECT j.id, j.bundle_id, j.attempts, j.lease_owner, ? FROM jobs j WHERE j.bundle_id = ? AND j.lease_owner = ?"
    f" AND j.{HELD_ROWS} AND j.state = '{RUNNING}' AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id"
    " AND a.worker = j.lease_owner AND a.finished_at IS NULL)"
)
BUNDLE_JOBS = f"SELECT {_JOBS} FROM jobs WHERE bundle_id = ? AND lease_owner = ? AND {_HELD_RUNNING}"
COUNT_BUNDLE_JOBS = (
    f"UPDATE bundles SET job_count = (SELECT count(*) FROM jobs WHERE {HELD_ROWS} AND bundle_id = ?) WHERE id = ?"
)
# Jobs per state without a pass over every row: the states few jobs are in, each from its partial
# index, and all jobs from the narrowest full index; `completed` is the rest. One statement, so
# one snapshot: the parts add up.
COUNTS = (
    "SELECT NULL, count(*) FROM jobs"
    f" UNION ALL SELECT '{QUEUED}', count(*) FROM jobs WHERE {QUEUED_ROWS}"
    f" UNION ALL SELECT state, count(*) FROM jobs WHERE {HELD_ROWS} GROUP BY state"
    f" UNION ALL SELECT state, count(*) FROM jobs WHERE {ENDED_ROWS} GROUP BY state"
)
SWEEP_COUNTS = "SELECT state, count(*) FROM jobs WHERE sweep = ? GROUP BY state"
JOB_BY_ID = f"SELECT {_JOBS} FROM jobs WHERE id = ?"
JOB_BY_KEY = (
    f'SELECT {_JOBS} FROM jobs WHERE "key" = ? ORDER BY state IN ({_DONE_SQL}) DESC, created_at DESC LIMIT 1'
)
# Ids are lowercase hex, so the ids starting with PREFIX are those in [PREFIX, PREFIX + "g").
JOBS_BY_PREFIX = f"SELECT {_JOBS} FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2"
JOBS_BY_IDS = f"SELECT {_JOBS} FROM jobs WHERE id {{ids}}"
STATES_BY_IDS = "SELECT id, state FROM jobs WHERE id {ids}"
DONE_BY_KEY = (
    f'SELECT {_JOBS} FROM jobs WHERE "key" = ? AND state IN ({_DONE_SQL}) AND result_key IS NOT NULL'
    " ORDER BY finished_at DESC LIMIT 1"
)
ATTEMPTS_OF = f"SELECT {_q(ATTEMPT_COLUMNS)} FROM attempts WHERE job_id = ? ORDER BY number, id"
BUNDLE = f"SELECT {_q(BUNDLE_COLUMNS)} FROM bundles WHERE id = ?"
BUNDLES_IN_STATE = f"SELECT {_q(BUNDLE_COLUMNS)} FROM bundles WHERE state = ? ORDER BY created_at"
STORED_BYTES = "SELECT COALESCE(SUM(bytes), 0) FROM results"
#: A result just stored, with its size (the latest size of a result stored again under its key).
RECORD_RESULT = (
    "INSERT INTO results (result_key, bytes) VALUES (?, ?)"
    " ON CONFLICT (result_key) DO UPDATE SET bytes = excluded.bytes"
)
FORGET_RESULTS = "DELETE FROM results WHERE result_key {keys}"
# What `verify` and `gc` read: the jobs that hold a result, and those that still need their key's.
JOBS_WITH_RESULTS = f"SELECT {_JOBS} FROM jobs WHERE result_key IS NOT NULL AND state IN ({_DONE_SQL})"
QUEUE_IDENTITY = "SELECT id FROM queue_identity"
RESULT_REFERENCES = (
    f"SELECT {_JOBS} FROM jobs WHERE state IN ({_ACTIVE_SQL}) OR result_key IS NOT NULL ORDER BY created_at"
)
ACTIVE_KEYS = f'SELECT DISTINCT "key" FROM jobs WHERE "key" {{keys}} AND state IN ({_ACTIVE_SQL})'
DONE_RESULT_KEYS = f"SELECT DISTINCT result_key FROM jobs WHERE result_key {{keys}} AND state IN ({_DONE_SQL})"
DETACH_RESULTS = "UPDATE jobs SET result_key = NULL, error = ?, updated_at = ? WHERE result_key {keys}"
DETACH_MISSING = (
    "UPDATE jobs SET result_key = NULL, error = 'result missing from the store', updated_at = ?"
    f" WHERE result_key {{keys}} AND state IN ({_DONE_SQL})"
)
# Held jobs whose worker stopped renewing the lease (a range probe of `ix_jobs_lease`).
LEASE_EXPIRED_COUNTS = f"SELECT state, count(*) FROM jobs WHERE {_HELD} AND lease_expires_at < ? GROUP BY state"
# (Not those held back for their model: `status` counts them apart.)
RETRY_WAITING = (
    f"SELECT count(*), MIN(not_before) FROM jobs WHERE state = '{QUEUED}' AND not_before > ? AND error IS NOT NULL"
    " AND error NOT LIKE ?"
)
# What a worker could still take or wait for: queued, held, or at NDIF (those it can run).
WAITING = (
    f"SELECT (SELECT count(*) FROM jobs WHERE {QUEUED_ROWS}{{runnable}})"
    " + (SELECT count(*) FROM jobs WHERE {held}{runnable})"
)
#: The start of the note on queued jobs that the workers seen so far cannot run (see `note_unrunnable`).
NEEDS_WORKER = "waiting for a worker that can run"
# Queued jobs a worker cannot run, by what it lacks, and how many already say so. (The LIKE
# patterns are bound, not written in: a literal `%` would read as a placeholder to psycopg.)
UNRUNNABLE = (
    "SELECT experiment, backend, model, count(*), SUM(CASE WHEN error LIKE ? THEN 1 ELSE 0 END)"
    f" FROM jobs WHERE state = '{QUEUED}' AND NOT ({{runnable}}) GROUP BY experiment, backend, model"
)
NOTE_UNRUNNABLE = (
    f"UPDATE jobs SET error = ?, updated_at = ? WHERE state = '{QUEUED}' AND experiment = ? AND backend = ?"
    " AND (error IS NULL OR (error LIKE ? AND error <> ?))"
)
NEEDS_WORKER_COUNTS = (
    f"SELECT experiment, count(*) FROM jobs WHERE state = '{QUEUED}' AND error LIKE ?"
    " GROUP BY experiment"
)
# Who holds jobs now, and until when (a range probe of `ix_jobs_lease`, as few rows as jobs held).
HOLDERS = (
    "SELECT lease_owner, count(*), MAX(lease_expires_at) FROM jobs WHERE {held}{runnable}"
    " AND lease_owner IS NOT NULL GROUP BY lease_owner"
)
# A gone worker's jobs: back to the queue at once, the attempt it spent given back (it was not
# the job's fault); its jobs at NDIF get their lease ended, so the next worker re-attaches now.
TAKE_BACK = (
    f"UPDATE jobs SET state = '{QUEUED}', lease_owner = NULL, lease_expires_at = NULL,"
    f" attempts = {{max}}(attempts - 1, 0), updated_at = ? WHERE lease_owner = ? AND {_LOCAL_HELD} RETURNING id"
)
TAKE_BACK_ATTEMPTS = (
    f"UPDATE attempts SET finished_at = ?, outcome = '{AttemptOutcome.WORKER_GONE}', error = ?"
    " WHERE job_id {ids} AND worker = ? AND finished_at IS NULL"
)
END_LEASES_AT_NDIF = (
    f"UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE lease_owner = ? AND {HELD_AT_REMOTE}"
)
#: A job taken back from gone workers as often as it may be attempted is what stops them (killed
#: for memory, say): it fails rather than stopping every worker that takes it.
FAIL_WORKER_KILLERS = (
    f"UPDATE jobs SET state = '{FAILED}', finished_at = ?, updated_at = ?, error = ?"
    f" WHERE id {{ids}} AND state = '{QUEUED}' AND max_attempts <= (SELECT COUNT(*) FROM attempts"
    f" WHERE attempts.job_id = jobs.id AND attempts.outcome = '{AttemptOutcome.WORKER_GONE}') RETURNING id"
)
KILLED_WORKERS_ERROR = (
    "its worker's process died every time it ran this job, as many times as it may be attempted (killed"
    " for memory, or the experiment ends the process?): failed so that it stops no more workers; check"
    " the experiment, then `ndif-jobs retry` it"
)
ABANDON_BUNDLES = (
    f"UPDATE bundles SET state = '{BundleState.ABANDONED}', finished_at = ?, error = ? WHERE worker = ?"
    f" AND state = '{BundleState.RUNNING}'"
)

def _state_condition(state: str) -> str:
    """`state = 'X'` for a known state, led by the condition of the partial index that holds it
    (so `list --state failed` reads that index, not the table). Raises `BadInput` otherwise."""
    if state not in JOB_STATES:
        raise BadInput(f"unknown state {state!r} (choose from: {', '.join(JOB_STATES)})")
    if state in HELD_STATES:
        return f"{HELD_ROWS} AND state = '{state}'"
    if state in (CACHED, FAILED, CANCELLED):
        return f"{ENDED_ROWS} AND state = '{state}'"
    return f"state = '{state}'"


def _job_filter(
    state: str | None, tag: str | None, experiment: str | None, sweep: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space; "" for no filter) of `list_jobs` and `count_jobs`."""
    where: list[str] = []
    params: list[Any] = []
    if sweep is not None:
        where.append("sweep = ?")
        params.append(sweep)
    if state:
        where.append(_state_condition(state))
    if tag:
        where.append("tags LIKE ? ESCAPE '\\'")
        params.append(f"%,{_like_literal(tag)},%")
    if experiment:
        where.append("experiment = ?")
        params.append(experiment)
    return (" WHERE " + " AND ".join(where) if where else ""), params


T = TypeVar("T")


class Outcomes:
    """What a worker records when a bundle ends, on one open write transaction at one time.

    Only jobs still leased to the recording worker are touched, so a late or repeated call
    (a worker that lost its lease, a re-run after a lost COMMIT) changes nothing."""

    def __init__(self, cur: Any, sql: Dialect, t: float) -> None:
        self._cur = cur
        self._sql = sql
        self._t = t

    def complete(self, worker: str, completed: Sequence[tuple[str, str, int]]) -> int:
        """Mark jobs completed, each as (job id, result key, result bytes). Returns how many."""
        if not completed:
            return 0
        t, cur, sql = self._t, self._cur, self._sql
        if len(completed) == 1:  # a job at a time: `execute` costs less than `executemany` of one row
            ((j, k, b),) = completed
            cur.execute(sql(COMPLETE), (k, b, t, t, j, worker))
            done = max(cur.rowcount, 0)
            if b is not None:
                cur.execute(sql(RECORD_RESULT), (k, b))
            cur.execute(sql(CLOSE_ATTEMPTS), (t, AttemptOutcome.COMPLETED, None, j, worker))
            return done
        cur.executemany(sql(COMPLETE), [(k, b, t, t, j, worker) for j, k, b in completed])
        done = max(cur.rowcount, 0)
        # The worker stored each result before this, whether or not it still holds the job.
        cur.executemany(sql(RECORD_RESULT), [(k, b) for _, k, b in completed if b is not None])
        cur.executemany(sql(CLOSE_ATTEMPTS), [(t, AttemptOutcome.COMPLETED, None, j, worker) for j, _, _ in completed])
        return done

    def fail(self, worker: str, failed: Sequence[tuple[str, str]], retry_in_s: float | None = None) -> dict[str, int]:
        """Fail jobs, each as (job id, error). With `retry_in_s`, a job with attempts left goes back
        to the queue for that long instead; without, every one fails for good (an error no second
        attempt can fix: bad params, bad code). Returns how many were retried and failed."""
        t, cur, sql = self._t, self._cur, self._sql
        counts = {"retried": 0, "failed": 0}
        for job_id, error in _clip_errors(failed):
            if retry_in_s is None:
                cur.execute(sql(FAIL_HELD), (error, t, t, job_id, worker))
                counts["failed"] += max(cur.rowcount, 0)
            else:
                cur.execute(sql(HELD_ATTEMPTS), (job_id, worker))
                row = cur.fetchone()
                if row is None:
                    continue
                if row[0] < row[1]:
                    cur.execute(sql(RETRY_LATER), (t + retry_in_s, error, t, job_id))
                    counts["retried"] += 1
                else:
                    cur.execute(sql(FAIL), (t, error, t, job_id))
                    counts["failed"] += 1
            cur.execute(sql(CLOSE_ATTEMPTS), (t, AttemptOutcome.FAILED, error, job_id, worker))
        return counts

    def close_bundle(self, bundle_id: str, error: str | None = None) -> None:
        """Close a bundle: completed, or failed with `error`."""
        state = BundleState.FAILED if error else BundleState.COMPLETED
        self._cur.execute(self._sql(FINISH_BUNDLE), (state, self._t, clip_error(error) if error else None, bundle_id))


class Queue(OnDatabase):
    def __init__(
        self, engine: Database | Engine, db_retry_s: float = DEFAULT_RETRY_S,
        result_exists: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(engine, db_retry_s)
        #: Whether a result key is on disk: a done job whose result is gone is not served as a hit.
        self.result_exists = result_exists
        #: `INSERT_NEW_KEY` in this dialect, by how many older keys it checks besides the job's own.
        self._insert_new_key: dict[int, str] = {}
        #: The claim statement and what it binds, for each kind of worker.
        self._claim_sql: dict[Runnable, tuple[str, list[Any]]] = {}

    # -- submitting ------------------------------------------------------------------

    def enqueue(self, new_jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Insert jobs in one transaction, deduplicating by cache key.

        A key with a completed result gives a `cached` job pointing at it; a key already queued
        or running is joined (its id returned) unless `force` is set. One job of a key no job
        has is queued by a single statement (`_enqueue_new_key`): a single enqueue's whole cost.
        """
        if not new_jobs:
            return []
        t = now()
        if len(new_jobs) == 1 and not new_jobs[0].force:
            job = new_jobs[0]
            return [call_with_retry(
                lambda rerun: self._enqueue_new_key(job, t, rerun), window_s=self.db_retry_s, database=self.engine,
                name="enqueue",
            )]
        return call_with_retry(
            lambda rerun: self._enqueue(new_jobs, t, rerun), window_s=self.db_retry_s, database=self.engine,
            name="enqueue",
        )

    def _enqueue_new_key(self, job: NewJob, t: float, rerun: bool) -> Enqueued:
        """One submission: queued by one statement when no job has its key (the common case, and
        the whole cost of a single enqueue), else `_enqueue`'s transaction. A re-run goes straight
        to `_enqueue`, which finds the job by id if the first run committed unseen."""
        if not rerun:
            in_sql, keys = self._sql.in_((job.key, *job.aliases))
            sql = self._insert_new_key.get(len(job.aliases))
            if sql is None:
                sql = self._insert_new_key[len(job.aliases)] = self._sql(INSERT_NEW_KEY, keys=in_sql)
            with self.db.cursor(write=True, one_statement=True) as cur:
                cur.execute(sql, (*_insert_row(job, QUEUED, t, None, None), *keys))
                if cur.rowcount == 1:
                    return Enqueued(job.id, QUEUED)
        return self._enqueue([job], t, rerun)[0]

    def _enqueue(self, new_jobs: Sequence[NewJob], t: float, rerun: bool) -> list[Enqueued]:
        """`enqueue`'s transaction. A re-run whose first run committed unseen finds its jobs by
        id (a job's id is chosen before the first run) and does not insert them again."""
        out: list[Enqueued] = []
        rows: list[tuple[Any, ...]] = []
        with self.db.cursor(write=True) as cur:
            inserted = self._states_by_id(cur, [j.id for j in new_jobs]) if rerun else {}
            existing = self._existing_by_key(cur, {k for j in new_jobs if not j.force for k in (j.key, *j.aliases)})
            seen_in_batch: dict[str, Enqueued] = {}
            for i, job in enumerate(new_jobs):
                if job.id in inserted:
                    entry = Enqueued(job.id, inserted[job.id])
                    out.append(entry)
                    if entry.state == QUEUED:
                        seen_in_batch[job.key] = entry
                    continue
                created = t + i * 1e-6  # keeps a batch's order in the claim order (oldest first)
                hit: Enqueued | _Existing | None = None
                if not job.force:
                    hit = seen_in_batch.get(job.key) or _standing_for(job, existing)
                if hit is not None and hit.state in ACTIVE_STATES:
                    out.append(Enqueued(hit.id, hit.state, joined=True))
                    continue
                state, result_key, finished = QUEUED, None, None
                if isinstance(hit, _Existing) and hit.state in DONE_STATES:
                    state, result_key, finished = CACHED, hit.result_key, t
                rows.append(_insert_row(job, state, created, finished, result_key))
                entry = Enqueued(job.id, state)
                out.append(entry)
                if state == QUEUED:
                    seen_in_batch[job.key] = entry
            if rows:
                cur.executemany(self._sql(INSERT_JOB), rows)
        return out

    def _states_by_id(self, cur: Any, job_ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in self._sql.chunks(list(job_ids)):
            in_sql, params = self._sql.in_(chunk)
            cur.execute(self._sql(STATES_BY_IDS, ids=in_sql), params)
            found.update((job_id, state) for job_id, state in cur.fetchall())
        return found

    def _existing_by_key(self, cur: Any, keys: set[str]) -> dict[str, _Existing]:
        """For each key, the job that best stands for it: a done one first, then an active one.

        A done job whose result is no longer on disk (deleted by hand, or lost) stands for
        nothing: it is detached, so that the submission runs again rather than point at nothing.
        """
        found: dict[str, _Existing] = {}
        on_disk: dict[str, bool] = {}
        keys_list = list(keys)
        for chunk in self._sql.chunks(keys_list):
            in_sql, params = self._sql.in_(chunk)
            cur.execute(self._sql(EXISTING_BY_KEY, keys=in_sql), params)
            for row in cur.fetchall():
                row = _Existing._make(row)
                # A live job, or a done one with its result (gc may have removed it since).
                if row.state not in ACTIVE_STATES and (row.state not in DONE_STATES or row.result_key is None):
                    continue
                if row.state in DONE_STATES and row.result_key is not None and self.result_exists is not None:
                    if row.result_key not in on_disk:
                        on_disk[row.result_key] = self.result_exists(row.result_key)
                    if not on_disk[row.result_key]:
                        continue
                best = found.get(row.key)
                if best is None or (row.state in DONE_STATES and best.state not in DONE_STATES):
                    found[row.key] = row
        gone = [key for key, there in on_disk.items() if not there]
        for chunk in self._sql.chunks(gone):
            in_sql, params = self._sql.in_(chunk)
            cur.execute(self._sql(DETACH_MISSING, keys=in_sql), [now(), *params])
            cur.execute(self._sql(FORGET_RESULTS, keys=in_sql), params)
        return found

    # -- claiming and finishing (the worker's side) ---------------------------------------

    def claim(
        self, worker: str, limit: int, lease_s: float, backend: str | None = None, runnable: Runnable | None = None
    ) -> list[JobRow]:
        """Take up to `limit` runnable jobs for `worker`, highest priority and oldest first:
        of `backend`, or those `runnable` covers (it overrides `backend`)."""
        runnable = runnable or Runnable(backend=backend)
        claimed = call_stamped_with_retry(
            lambda t, earlier: self._claim(worker, limit, lease_s, runnable, t, earlier),
            window_s=self.db_retry_s, database=self.engine, name="claim",
        )
        claimed.sort(key=lambda r: (-r.priority, r.created_at, r.id))
        return claimed

    def _claim(
        self, worker: str, limit: int, lease_s: float, runnable: Runnable | None, t: float, earlier: Sequence[float]
    ) -> list[JobRow]:
        """`claim`'s transaction at time `t`; `earlier`: the times of this claim's failed runs.

        A failed run may have committed unseen: the jobs it leased to `worker` (at one of those
        times) are returned, on a fresh lease, instead of claiming more. Their attempts are
        already recorded."""
        runnable = runnable or Runnable()
        prepared = self._claim_sql.get(runnable)
        if prepared is None:
            cond, values = self._sql.runnable(runnable)
            sql = self._sql(CLAIM, runnable=f" AND {cond}" if cond else "", skip_locked=self._sql.skip_locked)
            prepared = self._claim_sql[runnable] = (sql, values)
        sql, values = prepared
        params = [worker, t + lease_s, t, t, t, *values, limit]
        with self.db.cursor(write=True) as cur:
            if earlier:
                in_sql, times = self._sql.in_(earlier)
                cur.execute(self._sql(ADOPT_CLAIMED, times=in_sql), [t + lease_s, t, worker, *times])
                adopted = [_job_row(r) for r in cur.fetchall()]
                if adopted:
                    return adopted
            self._requeue_expired(cur, t)
            cur.execute(sql, params)
            claimed = [_job_row(r) for r in cur.fetchall()]
            if not claimed:
                return []
            if len(claimed) == 1:  # `execute` costs less than `executemany` of one row
                cur.execute(self._sql(INSERT_ATTEMPT), (claimed[0].id, claimed[0].attempts, worker, t))
            else:
                cur.executemany(self._sql(INSERT_ATTEMPT), [(r.id, r.attempts, worker, t) for r in claimed])
        return claimed

    def _requeue_expired(self, cur: Any, t: float) -> int:
        """Jobs whose worker stopped renewing its lease go back to the queue.

        Every claim asks, and almost always no lease has run out: a read of the lease index
        (`ix_jobs_lease`) says so in half the time of the UPDATE that finds nothing to change."""
        cur.execute(self._sql(ANY_EXPIRED), (t,))
        if cur.fetchone() is None:
            return 0
        cur.execute(self._sql(REQUEUE_EXPIRED), (t, t))
        lost = [row[0] for row in cur.fetchall()]
        self.close_lost_attempts(cur, lost, t)
        return len(lost)

    def close_lost_attempts(self, cur: Any, job_ids: Sequence[str], t: float) -> None:
        """Close the attempts that dead workers left open on these jobs, saying so."""
        for chunk in self._sql.chunks(list(job_ids)):
            in_sql, ids = self._sql.in_(chunk)
            cur.execute(self._sql(LOSE_ATTEMPTS, ids=in_sql), [t, *ids])

    @retried
    def renew_leases(self, worker: str, job_ids: Sequence[str], lease_s: float) -> int:
        t = now()
        n = 0
        with self.db.cursor(write=True) as cur:
            for chunk in self._sql.chunks(list(job_ids)):
                in_sql, ids = self._sql.in_(chunk)
                cur.execute(self._sql(RENEW, ids=in_sql), [t + lease_s, t, *ids, worker])
                n += max(cur.rowcount, 0)
        return n

    def start_bundle(self, worker: str, backend: str, model_key: str, job_ids: Sequence[str]) -> str:
        """Record one request to a backend and move its jobs to `running`."""
        bundle_id = new_id()  # chosen once, so a re-run finds the bundle its first run made
        call_with_retry(
            lambda rerun: self._start_bundle(bundle_id, worker, backend, model_key, job_ids, rerun),
            window_s=self.db_retry_s, database=self.engine, name="start_bundle",
        )
        return bundle_id

    def _start_bundle(
        self, bundle_id: str, worker: str, backend: str, model_key: str, job_ids: Sequence[str], rerun: bool
    ) -> None:
        """`start_bundle`'s transaction. A re-run whose first run committed unseen finds the bundle
        row and does not insert it again; moving the jobs is the same either way."""
        t = now()
        with self.db.cursor(write=True) as cur:
            exists = False
            if rerun:
                cur.execute(self._sql(BUNDLE_OF_WORKER), (bundle_id, worker))
                exists = cur.fetchone() is not None
            if not exists:
                cur.execute(self._sql(INSERT_BUNDLE),
                            (bundle_id, backend, model_key, BundleState.RUNNING, worker, len(job_ids), t))
            for chunk in self._sql.chunks(list(job_ids)):
                in_sql, ids = self._sql.in_(chunk)
                cur.execute(self._sql(START_JOBS, ids=in_sql), [bundle_id, t, *ids, worker])
                cur.execute(self._sql(START_ATTEMPTS, ids=in_sql), [bundle_id, *ids])

    # The outcome of a bundle: each operation is one transaction; `in_transaction` runs several
    # as one (a bundle's completed and failed jobs and its close, all or nothing).

    @retried
    def complete(self, worker: str, completed: Sequence[tuple[str, str, int]]) -> int:
        """Mark held jobs completed, each as (job id, result key, result bytes). Returns how many."""
        with self.db.cursor(write=True) as cur:
            return Outcomes(cur, self._sql, now()).complete(worker, completed)

    @retried
    def fail(self, worker: str, failed: Sequence[tuple[str, str]], retry_in_s: float | None = None) -> dict[str, int]:
        """Fail held jobs, each as (job id, error). See `Outcomes.fail`."""
        with self.db.cursor(write=True) as cur:
            return Outcomes(cur, self._sql, now()).fail(worker, failed, retry_in_s)

    @retried
    def close_bundle(self, bundle_id: str, error: str | None = None) -> None:
        """Close a bundle: completed, or failed with `error`."""
        with self.db.cursor(write=True) as cur:
            Outcomes(cur, self._sql, now()).close_bundle(bundle_id, error)

    def in_transaction(self, work: Callable[[Outcomes], T], name: str = "outcomes") -> T:
        """`work(outcomes)` in one transaction, run again whole while the database is unreachable:
        so it must touch nothing but the database (each `Outcomes` operation is safe to run twice)."""

        def run(_rerun: bool) -> T:
            with self.db.cursor(write=True) as cur:
                return work(Outcomes(cur, self._sql, now()))

        return call_with_retry(run, window_s=self.db_retry_s, database=self.engine, name=name)

    @retried
    def defer(
        self, worker: str, job_ids: Sequence[str], error: str, delay_s: float, bundle_id: str | None = None
    ) -> int:
        """Put held jobs back in the queue for `delay_s` without spending an attempt, saying why:
        the backend could not take them (NDIF unreachable), through no fault of theirs. Only jobs
        still leased to `worker` are touched, so running it twice changes nothing."""
        t = now()
        deferred = 0
        error = clip_error(error)
        with self.db.cursor(write=True) as cur:
            for chunk in self._sql.chunks(list(job_ids)):
                in_sql, ids = self._sql.in_(chunk)
                cur.execute(self._sql(DEFER, max=self._sql.max, ids=in_sql), [t + delay_s, error, t, *ids, worker])
                deferred += max(cur.rowcount, 0)
                cur.execute(self._sql(DEFER_ATTEMPTS, ids=in_sql), [t, error, *ids, worker])
            if bundle_id is not None:
                cur.execute(self._sql(FINISH_BUNDLE), (BundleState.FAILED, t, error, bundle_id))
        return deferred

    @retried
    def release(self, worker: str, job_ids: Sequence[str] | None = None) -> int:
        """Give held jobs back to the queue untouched (a worker shutting down)."""
        t = now()
        released = 0
        with self.db.cursor(write=True) as cur:
            if job_ids is None:
                cur.execute(self._sql(RELEASE, max=self._sql.max, ids=""), (t, worker))
                released = max(cur.rowcount, 0)
            else:
                for chunk in self._sql.chunks(list(job_ids)):
                    in_sql, ids = self._sql.in_(chunk)
                    cur.execute(self._sql(RELEASE, max=self._sql.max, ids=f" AND id {in_sql}"), [t, worker, *ids])
                    released += max(cur.rowcount, 0)
            if released:
                cur.execute(self._sql(RELEASE_ATTEMPTS), (t, t, worker))
        return released

    # -- user actions ----------------------------------------------------------------

    @retried
    def cancel(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Cancel jobs that have not finished. Returns each id's state afterwards."""
        t = now()
        out: dict[str, str] = {}
        with self.db.cursor(write=True) as cur:
            for job_id in job_ids:
                cur.execute(self._sql(STATE_OF), (job_id,))
                row = cur.fetchone()
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                if row[0] in ACTIVE_STATES:
                    cur.execute(self._sql(CANCEL), (t, t, job_id))
                    out[job_id] = CANCELLED
                else:
                    out[job_id] = row[0]
        return out

    @retried
    def retry(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Queue failed, cancelled or completed jobs again with a fresh attempt budget."""
        t = now()
        out: dict[str, str] = {}
        with self.db.cursor(write=True) as cur:
            for job_id in job_ids:
                cur.execute(self._sql(STATE_OF), (job_id,))
                row = cur.fetchone()
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                if row[0] in ACTIVE_STATES:
                    out[job_id] = row[0]
                    continue
                cur.execute(self._sql(REQUEUE), (t, job_id))
                out[job_id] = QUEUED
        return out

    # -- one computation per key (the worker's side of joining) ----------------------------

    @retried
    def rekey(self, worker: str, changes: Sequence[tuple[str, str, str, str]]) -> int:
        """File held jobs under the key of what runs now, each with a note in its history.

        `changes` holds (job id, key, model key, note). A job whose key was computed from an
        experiment source (or model files) that changed before it ran is moved to the key of the
        code that runs, so that its result is never served for the code it was submitted with.
        """
        t = now()
        moved = 0
        with self.db.cursor(write=True) as cur:
            for job_id, key, model_key, note in changes:
                cur.execute(self._sql(REKEY), (key, model_key, t, job_id, worker, key))
                if cur.rowcount > 0:
                    moved += 1
                    cur.execute(self._sql(NOTE_REKEYED), (worker, t, t, clip_error(note), job_id))
        return moved

    @retried
    def join_bundle(
        self, worker: str, bundle_id: str, backend: str, keys: Sequence[str], lease_s: float
    ) -> list[JobRow]:
        """Add the queued `backend` jobs of `keys` to a running bundle, leased to `worker`, as a
        submit joins a queued job of its key: one run then completes them all (several jobs
        retried together, a forced resubmit). Returns every job the bundle now holds."""
        t = now()
        sql = self._sql
        with self.db.cursor(write=True) as cur:
            for chunk in sql.chunks(list(keys)):
                in_sql, bound = sql.in_(chunk)
                cur.execute(sql(JOIN_BUNDLE, keys=in_sql), [bundle_id, worker, t + lease_s, t, t, backend, *bound])
            cur.execute(sql(JOINED_ATTEMPTS), (t, bundle_id, worker))
            cur.execute(sql(COUNT_BUNDLE_JOBS), (bundle_id, bundle_id))
            cur.execute(sql(BUNDLE_JOBS), (bundle_id, worker))
            return [_job_row(r) for r in cur.fetchall()]

    # -- reading -----------------------------------------------------------------------

    @retried
    def counts(self, sweep: str | None = None) -> dict[str, int]:
        """Jobs per state (of one sweep, given its name), every state listed."""
        if sweep is not None:
            found = {state: int(n) for state, n in self._all(self._sql(SWEEP_COUNTS), (sweep,))}
            return {s: found.get(s, 0) for s in JOB_STATES}
        found = {state: int(n) for state, n in self._all(self._sql(COUNTS))}
        total = found.pop(None, 0)
        found[COMPLETED] = total - sum(found.values())
        return {s: found.get(s, 0) for s in JOB_STATES}

    @retried
    def list_jobs(
        self,
        state: str | None = None,
        tag: str | None = None,
        experiment: str | None = None,
        limit: int | None = 50,
        newest_first: bool = True,
        sweep: str | None = None,
        offset: int = 0,
    ) -> list[JobRow]:
        """Jobs matching every filter given, newest (or oldest) first: `limit` of them (None: all)
        after skipping `offset`."""
        where, params = _job_filter(state, tag, experiment, sweep)
        sql = f"SELECT {_JOBS} FROM jobs{where}"
        sql += " ORDER BY created_at DESC, id" if newest_first else " ORDER BY created_at, id"
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"  # no limit: NULL on PostgreSQL, -1 on SQLite
            params += [limit if limit is not None or self.is_postgres else -1, offset]
        return [_job_row(r) for r in self._all(self._sql(sql), params)]

    @retried
    def count_jobs(
        self, state: str | None = None, tag: str | None = None, experiment: str | None = None,
        sweep: str | None = None,
    ) -> int:
        """How many jobs `list_jobs` would list without a limit, counted by the database."""
        where, params = _job_filter(state, tag, experiment, sweep)
        return int(self._all(self._sql(f"SELECT count(*) FROM jobs{where}"), params)[0][0])

    @retried
    def get(self, job_ref: str) -> JobRow:
        """A job by id, unique id prefix, or cache key. Raises `JobNotFound`."""
        ref = job_ref.strip().lower()
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            raise JobNotFound(f"no job {job_ref!r}: job ids are hexadecimal")
        sql = self._sql
        with self.db.cursor() as cur:
            cur.execute(sql(JOB_BY_ID), (ref,))
            row = cur.fetchone()
            if row is not None:
                return _job_row(row)
            if len(ref) == 64:
                cur.execute(sql(JOB_BY_KEY), (ref,))
                row = cur.fetchone()
                if row is not None:
                    return _job_row(row)
            if len(ref) >= 4:
                cur.execute(sql(JOBS_BY_PREFIX), (ref, ref + "g"))
                rows = cur.fetchall()
                if len(rows) == 1:
                    return _job_row(rows[0])
                if len(rows) > 1:
                    raise JobNotFound(f"job id prefix {job_ref!r} is ambiguous: give more characters")
        raise JobNotFound(f"no job {job_ref!r}")

    @retried
    def get_many(self, job_ids: Sequence[str]) -> list[JobRow]:
        out: list[JobRow] = []
        with self.db.cursor() as cur:
            for chunk in self._sql.chunks(list(job_ids)):
                in_sql, ids = self._sql.in_(chunk)
                cur.execute(self._sql(JOBS_BY_IDS, ids=in_sql), ids)
                out.extend(_job_row(r) for r in cur.fetchall())
        return out

    @retried
    def done_by_key(self, key: str) -> JobRow | None:
        """The newest job that holds a result for `key`, if any."""
        rows = self._all(self._sql(DONE_BY_KEY), (key,))
        return _job_row(rows[0]) if rows else None

    @retried
    def attempts_of(self, job_id: str) -> list[AttemptRow]:
        return [AttemptRow._make(r) for r in self._all(self._sql(ATTEMPTS_OF), (job_id,))]

    @retried
    def bundle(self, bundle_id: str) -> BundleRow | None:
        rows = self._all(self._sql(BUNDLE), (bundle_id,))
        return BundleRow._make(rows[0]) if rows else None

    @retried
    def bundles_in_state(self, state: str) -> list[BundleRow]:
        """Bundles in `state` (e.g. `submitted`: waiting at NDIF), oldest first."""
        return [BundleRow._make(r) for r in self._all(self._sql(BUNDLES_IN_STATE), (state,))]

    @retried
    def lease_expired_counts(self) -> dict[str, int]:
        """Held jobs whose worker stopped renewing its lease, per state: the next worker takes
        them (claimed/running back to the queue, submitted re-attached by NDIF job id)."""
        return {state: n for state, n in self._all(self._sql(LEASE_EXPIRED_COUNTS), (now(),))}

    @retried
    def retry_waiting(self) -> tuple[int, float | None]:
        """Queued jobs waiting out a retry delay after an error, and when the first is due."""
        n, first = self._all(self._sql(RETRY_WAITING), (now(), MODEL_WAIT_PREFIX + "%"))[0]
        return int(n), first

    @retried
    def waiting_count(self, backend: str | None = None, runnable: Runnable | None = None) -> int:
        """Unfinished jobs (of `backend`, or that `runnable` covers) that a worker may still run
        or wait on, whoever holds them."""
        runnable = runnable or Runnable(backend=backend)
        cond, values = self._sql.runnable(runnable)
        held = _HELD if runnable.takes_submitted else _LOCAL_HELD
        sql = self._sql(WAITING, held=held, runnable=f" AND {cond}" if cond else "")
        return int(self._all(sql, [*values, *values])[0][0])

    @retried
    def unrunnable(self, runnable: Runnable) -> list[tuple[str, str, str, int, int]]:
        """Queued jobs that `runnable` leaves, as (experiment, backend, model, jobs, noted):
        `noted` of them already say they wait for a worker that can run them."""
        cond, values = self._sql.runnable(runnable)
        if not cond:
            return []
        rows = self._all(self._sql(UNRUNNABLE, runnable=cond), [NEEDS_WORKER + "%", *values])
        return [(e, b, m, int(n), int(noted or 0)) for e, b, m, n, noted in rows]

    @retried
    def note_unrunnable(self, experiment: str, backend: str, note: str) -> int:
        """Say on the queued jobs of `experiment` (on `backend`) what they wait for, where they
        say nothing else (an error they are waiting to retry after is kept). `status` counts them."""
        note = f"{NEEDS_WORKER} {note}"
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(NOTE_UNRUNNABLE), (note, now(), experiment, backend, NEEDS_WORKER + "%", note))
            return max(cur.rowcount, 0)

    @retried
    def needs_worker_counts(self) -> dict[str, int]:
        """Queued jobs per experiment that a worker has found it cannot run."""
        return {e: int(n) for e, n in self._all(self._sql(NEEDS_WORKER_COUNTS), (NEEDS_WORKER + "%",))}

    @retried
    def holders(self, runnable: Runnable | None = None) -> list[tuple[str, int, float]]:
        """Each worker holding jobs (that `runnable` covers), as (worker, jobs, lease end)."""
        runnable = runnable or Runnable()
        cond, values = self._sql.runnable(runnable)
        held = _HELD if runnable.takes_submitted else _LOCAL_HELD
        rows = self._all(self._sql(HOLDERS, held=held, runnable=f" AND {cond}" if cond else ""), values)
        return [(owner, int(n), float(until)) for owner, n, until in rows]

    @retried
    def take_back(self, owner: str, reason: str) -> dict[str, int]:
        """The jobs of a worker whose process is gone, taken back now rather than when its lease
        ends: unstarted or running ones back to the queue with their attempt given back (the job
        was not at fault), those at NDIF with their lease ended so the next worker re-attaches,
        its unfinished local bundles abandoned. A job whose workers died as many times as it may
        be attempted fails instead (`FAIL_WORKER_KILLERS`). Only `owner`'s jobs are touched, so
        running it twice changes nothing. Returns how many jobs were requeued, failed, and
        released at NDIF."""
        t = now()
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(TAKE_BACK, max=self._sql.max), (t, owner))
            requeued = [row[0] for row in cur.fetchall()]
            failed: list[str] = []
            for chunk in self._sql.chunks(requeued):
                in_sql, ids = self._sql.in_(chunk)
                cur.execute(self._sql(TAKE_BACK_ATTEMPTS, ids=in_sql), [t, reason, *ids, owner])
                cur.execute(self._sql(FAIL_WORKER_KILLERS, ids=in_sql), [t, t, KILLED_WORKERS_ERROR, *ids])
                failed += [row[0] for row in cur.fetchall()]
            cur.execute(self._sql(END_LEASES_AT_NDIF), (t, t, owner))
            at_ndif = max(cur.rowcount, 0)
            cur.execute(self._sql(ABANDON_BUNDLES), (t, reason, owner))
        return {"requeued": len(requeued) - len(failed), "failed": len(failed), "at_ndif": at_ndif}

    @retried
    def stored_bytes(self) -> int:
        """Bytes of stored results, each result counted once however many jobs share it."""
        return int(self._all(self._sql(STORED_BYTES))[0][0])

    # -- the result store's housekeeping (`verify`, `gc`) ----------------------------------

    @retried
    def identity(self) -> str:
        """This queue's random id, made with its schema: how a result store tells its queues apart."""
        rows = self._all(self._sql(QUEUE_IDENTITY))
        if len(rows) != 1:
            raise StoreError(f"the queue database's table queue_identity holds {len(rows)} rows, not one: "
                             "restore it from a backup (its id names this queue in the result store)")
        return str(rows[0][0])

    @retried
    def jobs_with_results(self) -> list[JobRow]:
        """Every finished job that points at a stored result."""
        return [_job_row(r) for r in self._all(self._sql(JOBS_WITH_RESULTS))]

    @retried
    def result_references(self) -> list[JobRow]:
        """Every job that needs a result: unfinished ones (their key's) and those pointing at
        one; oldest first."""
        return [_job_row(r) for r in self._all(self._sql(RESULT_REFERENCES))]

    @retried
    def detach_results(self, keys: Sequence[str], error: str) -> list[str]:
        """Detach every job from these results, saying why, except the results whose key an
        unfinished job has (it will store there); committed on return. Returns the keys detached."""
        sql = self._sql
        with self.db.cursor(write=True) as cur:
            busy = self._keys(cur, ACTIVE_KEYS, keys)
            doomed = [k for k in keys if k not in busy]
            for chunk in sql.chunks(doomed):
                in_sql, bound = sql.in_(chunk)
                cur.execute(sql(DETACH_RESULTS, keys=in_sql), [error, now(), *bound])
                cur.execute(sql(FORGET_RESULTS, keys=in_sql), bound)
        return doomed

    @retried
    def needed_results(self, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that a job needs: an unfinished job of that key, or a finished one
        pointing at it."""
        with self.db.cursor() as cur:
            return self._keys(cur, ACTIVE_KEYS, keys) | self._keys(cur, DONE_RESULT_KEYS, keys)

    def _keys(self, cur: Any, statement: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in self._sql.chunks(list(keys)):
            in_sql, bound = self._sql.in_(chunk)
            cur.execute(self._sql(statement, keys=in_sql), bound)
            found.update(row[0] for row in cur.fetchall())
        return found
