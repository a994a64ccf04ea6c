"""Queue operations: every read and write of the jobs, bundles and attempts tables.

One `Queue` wraps one database. Writes are short transactions that hold the write lock from
their first statement (`write_transaction`); the claim is one such transaction, so two workers
can never take the same job (on PostgreSQL the claim uses `FOR UPDATE SKIP LOCKED` so workers
do not even wait for each other). Everything is SQLAlchemy Core: the worker's hot path does a
few statements per bundle, not per job.

A job's life (see `JobState`): queued -> claimed -> running -> completed, or failed after its
attempts are spent, or back to queued with a `not_before` time to retry. Finishing a job is
conditional on the finishing worker still holding its lease, which makes a late or duplicate
completion a no-op instead of a second result.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Row, and_, bindparam, func, insert, or_, select, update

from ..errors import BadInput, JobNotFound
from .engine import write_transaction
from .tables import ACTIVE_STATES, DONE_STATES, BundleState, JobState, attempts, bundles, jobs, now

#: States a job is in while some worker holds it.
HELD_STATES = (JobState.CLAIMED.value, JobState.RUNNING.value)


def new_id() -> str:
    """A short, typeable job or bundle id (48 random bits; `show` accepts a unique prefix)."""
    return secrets.token_hex(6)


def encode_tags(tags: Iterable[str]) -> str:
    """Tags stored as `,a,b,` so that one `LIKE '%,a,%'` finds a tag exactly."""
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


@dataclass(frozen=True)
class Enqueued:
    """The outcome of submitting one `NewJob`: a new job, a join of a running one, or a cache hit."""

    id: str
    state: str
    joined: bool = False


class Queue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    # -- submitting ------------------------------------------------------------------

    def enqueue(self, new_jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Insert jobs in one transaction, deduplicating by cache key.

        A key with a completed result gives a `cached` job pointing at it; a key already queued
        or running is joined (its id returned) unless `force` is set.
        """
        if not new_jobs:
            return []
        t = now()
        out: list[Enqueued] = []
        rows: list[dict[str, Any]] = []
        with write_transaction(self.engine) as conn:
            existing = self._existing_by_key(conn, {j.key for j in new_jobs if not j.force})
            seen_in_batch: dict[str, Enqueued] = {}
            for i, job in enumerate(new_jobs):
                created = t + i * 1e-6  # keeps a batch's order in the claim order (oldest first)
                hit = None if job.force else (seen_in_batch.get(job.key) or existing.get(job.key))
                if hit is not None and hit.state in ACTIVE_VALUES:
                    out.append(Enqueued(hit.id, hit.state, joined=True))
                    continue
                state = JobState.QUEUED.value
                result_key = None
                if hit is not None and hit.state in DONE_VALUES:
                    state, result_key = JobState.CACHED.value, hit.result_key
                rows.append(
                    {
                        "id": job.id,
                        "key": job.key,
                        "experiment": job.experiment,
                        "model": job.model,
                        "model_key": job.model_key,
                        "backend": job.backend,
                        "params": json.dumps(job.params, sort_keys=True),
                        "state": state,
                        "priority": job.priority,
                        "tags": encode_tags(job.tags),
                        "created_at": created,
                        "updated_at": created,
                        "finished_at": t if state == JobState.CACHED.value else None,
                        "not_before": 0.0,
                        "attempts": 0,
                        "max_attempts": job.max_attempts,
                        "result_key": result_key,
                        "estimated_bytes": job.estimated_bytes,
                    }
                )
                entry = Enqueued(job.id, state)
                out.append(entry)
                if state == JobState.QUEUED.value:
                    seen_in_batch[job.key] = entry
            if rows:
                conn.execute(insert(jobs), rows)
        return out

    def _existing_by_key(self, conn: Any, keys: set[str]) -> dict[str, Any]:
        """For each key, the job that best stands for it: a done one first, then an active one."""
        found: dict[str, Any] = {}
        keys_list = list(keys)
        for start in range(0, len(keys_list), 500):
            chunk = keys_list[start : start + 500]
            result = conn.execute(
                select(jobs.c.id, jobs.c.key, jobs.c.state, jobs.c.result_key).where(
                    jobs.c.key.in_(chunk),
                    or_(
                        jobs.c.state.in_(list(ACTIVE_VALUES)),
                        # A done job whose result was removed (gc) no longer stands for its key.
                        and_(jobs.c.state.in_(list(DONE_VALUES)), jobs.c.result_key.is_not(None)),
                    ),
                )
            )
            for row in result:
                best = found.get(row.key)
                if best is None or (row.state in DONE_VALUES and best.state not in DONE_VALUES):
                    found[row.key] = row
        return found

    # -- claiming and finishing (the worker's side) ---------------------------------------

    def claim(
        self, worker: str, limit: int, lease_s: float, backend: str | None = None
    ) -> list[Row[Any]]:
        """Take up to `limit` runnable jobs for `worker`, highest priority and oldest first."""
        t = now()
        with write_transaction(self.engine) as conn:
            self._requeue_expired(conn, t)
            query = (
                select(jobs.c.id)
                .where(jobs.c.state == JobState.QUEUED.value, jobs.c.not_before <= t)
                .order_by(jobs.c.priority.desc(), jobs.c.created_at)
                .limit(limit)
            )
            if backend is not None:
                query = query.where(jobs.c.backend == backend)
            if self.is_postgres:
                query = query.with_for_update(skip_locked=True)
            ids = [r[0] for r in conn.execute(query)]
            if not ids:
                return []
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids))
                .values(
                    state=JobState.CLAIMED.value,
                    lease_owner=worker,
                    lease_expires_at=t + lease_s,
                    attempts=jobs.c.attempts + 1,
                    updated_at=t,
                    started_at=func.coalesce(jobs.c.started_at, t),
                    error=None,
                )
            )
            claimed = list(conn.execute(select(jobs).where(jobs.c.id.in_(ids))))
            conn.execute(
                insert(attempts),
                [{"job_id": r.id, "number": r.attempts, "worker": worker, "started_at": t} for r in claimed],
            )
        order = {job_id: i for i, job_id in enumerate(ids)}
        claimed.sort(key=lambda r: order[r.id])
        return claimed

    def _requeue_expired(self, conn: Any, t: float) -> int:
        """Jobs whose worker stopped renewing its lease go back to the queue."""
        result = conn.execute(
            update(jobs)
            .where(jobs.c.state.in_(HELD_STATES), jobs.c.lease_expires_at < t)
            .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None, updated_at=t)
        )
        return result.rowcount or 0

    def renew_leases(self, worker: str, job_ids: Sequence[str], lease_s: float) -> int:
        t = now()
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(list(job_ids)), jobs.c.lease_owner == worker, jobs.c.state.in_(HELD_STATES))
                .values(lease_expires_at=t + lease_s, updated_at=t)
            )
        return result.rowcount or 0

    def start_bundle(self, worker: str, backend: str, model_key: str, job_ids: Sequence[str]) -> str:
        """Record one request to a backend and move its jobs to `running`."""
        bundle_id = new_id()
        t = now()
        with write_transaction(self.engine) as conn:
            conn.execute(
                insert(bundles).values(
                    id=bundle_id,
                    backend=backend,
                    model_key=model_key,
                    state=BundleState.RUNNING.value,
                    worker=worker,
                    status_history="[]",
                    job_count=len(job_ids),
                    created_at=t,
                )
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(list(job_ids)), jobs.c.lease_owner == worker)
                .values(state=JobState.RUNNING.value, bundle_id=bundle_id, updated_at=t)
            )
            conn.execute(
                update(attempts)
                .where(attempts.c.job_id.in_(list(job_ids)), attempts.c.finished_at.is_(None))
                .values(bundle_id=bundle_id)
            )
        return bundle_id

    def finish(
        self,
        worker: str,
        completed: Sequence[tuple[str, str, int]] = (),
        failed: Sequence[tuple[str, str]] = (),
        bundle_id: str | None = None,
        bundle_error: str | None = None,
        retry_delay_s: float = 0.0,
    ) -> dict[str, int]:
        """Record a bundle's outcome in one transaction.

        `completed` holds (job id, result key, result bytes); `failed` holds (job id, error).
        A failed job with attempts left goes back to the queue after `retry_delay_s`; only jobs
        still leased to `worker` are touched, so a late or repeated call changes nothing.
        Returns how many jobs were completed, retried and failed.
        """
        t = now()
        counts = {"completed": 0, "retried": 0, "failed": 0}
        # Spelled out with OR: an expanding IN cannot take part in an executemany.
        held = and_(
            jobs.c.lease_owner == worker,
            or_(*(jobs.c.state == state for state in HELD_STATES)),
        )
        with write_transaction(self.engine) as conn:
            if completed:
                result = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("jid"), held)
                    .values(
                        state=JobState.COMPLETED.value,
                        result_key=bindparam("rkey"),
                        result_bytes=bindparam("rbytes"),
                        finished_at=t,
                        updated_at=t,
                        lease_owner=None,
                        lease_expires_at=None,
                        error=None,
                    ),
                    [{"jid": j, "rkey": k, "rbytes": b} for j, k, b in completed],
                )
                counts["completed"] = result.rowcount or 0
                self._close_attempts(conn, [j for j, _, _ in completed], "completed", None, t)
            for job_id, error in failed:
                row = conn.execute(
                    select(jobs.c.attempts, jobs.c.max_attempts).where(jobs.c.id == job_id, held)
                ).first()
                if row is None:
                    continue
                if row.attempts < row.max_attempts and retry_delay_s >= 0:
                    values = {"state": JobState.QUEUED.value, "not_before": t + retry_delay_s}
                    counts["retried"] += 1
                else:
                    values = {"state": JobState.FAILED.value, "finished_at": t}
                    counts["failed"] += 1
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(error=error, updated_at=t, lease_owner=None, lease_expires_at=None, **values)
                )
                self._close_attempts(conn, [job_id], "failed", error, t)
            if bundle_id is not None:
                state = BundleState.FAILED if bundle_error else BundleState.COMPLETED
                conn.execute(
                    update(bundles)
                    .where(bundles.c.id == bundle_id)
                    .values(state=state.value, finished_at=t, error=bundle_error)
                )
        return counts

    def fail_permanently(self, worker: str, failed: Sequence[tuple[str, str]], bundle_id: str | None = None) -> int:
        """Fail jobs with no retry: errors that no second attempt can fix (bad params, bad code)."""
        t = now()
        with write_transaction(self.engine) as conn:
            n = 0
            for job_id, error in failed:
                result = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.lease_owner == worker, jobs.c.state.in_(HELD_STATES))
                    .values(
                        state=JobState.FAILED.value,
                        error=error,
                        finished_at=t,
                        updated_at=t,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                )
                n += result.rowcount or 0
                self._close_attempts(conn, [job_id], "failed", error, t)
        return n

    def release(self, worker: str, job_ids: Sequence[str] | None = None) -> int:
        """Give held jobs back to the queue untouched (a worker shutting down)."""
        t = now()
        condition = and_(jobs.c.lease_owner == worker, jobs.c.state.in_(HELD_STATES))
        if job_ids is not None:
            condition = and_(condition, jobs.c.id.in_(list(job_ids)))
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(jobs)
                .where(condition)
                .values(
                    state=JobState.QUEUED.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=func.max(jobs.c.attempts - 1, 0) if not self.is_postgres else func.greatest(jobs.c.attempts - 1, 0),
                    updated_at=t,
                )
            )
            released = result.rowcount or 0
            if released:
                held_ids = select(jobs.c.id).where(jobs.c.state == JobState.QUEUED.value, jobs.c.updated_at == t)
                conn.execute(
                    update(attempts)
                    .where(attempts.c.job_id.in_(held_ids), attempts.c.finished_at.is_(None), attempts.c.worker == worker)
                    .values(finished_at=t, outcome="released")
                )
        return released

    @staticmethod
    def _close_attempts(conn: Any, job_ids: Sequence[str], outcome: str, error: str | None, t: float) -> None:
        conn.execute(
            update(attempts)
            .where(attempts.c.job_id.in_(list(job_ids)), attempts.c.finished_at.is_(None))
            .values(finished_at=t, outcome=outcome, error=error)
        )

    # -- user actions ----------------------------------------------------------------

    def cancel(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Cancel jobs that have not finished. Returns each id's state afterwards."""
        t = now()
        out: dict[str, str] = {}
        with write_transaction(self.engine) as conn:
            for job_id in job_ids:
                row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                if row.state in ACTIVE_VALUES:
                    conn.execute(
                        update(jobs)
                        .where(jobs.c.id == job_id)
                        .values(
                            state=JobState.CANCELLED.value,
                            finished_at=t,
                            updated_at=t,
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                    )
                    out[job_id] = JobState.CANCELLED.value
                else:
                    out[job_id] = row.state
        return out

    def retry(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Queue failed, cancelled or completed jobs again with a fresh attempt budget."""
        t = now()
        out: dict[str, str] = {}
        with write_transaction(self.engine) as conn:
            for job_id in job_ids:
                row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                if row.state in ACTIVE_VALUES:
                    out[job_id] = row.state
                    continue
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        state=JobState.QUEUED.value,
                        attempts=0,
                        not_before=0.0,
                        error=None,
                        finished_at=None,
                        result_key=None,
                        result_bytes=None,
                        bundle_id=None,
                        updated_at=t,
                    )
                )
                out[job_id] = JobState.QUEUED.value
        return out

    # -- reading -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
            found = {state: n for state, n in rows}
        return {s.value: found.get(s.value, 0) for s in JobState}

    def list_jobs(
        self,
        state: str | None = None,
        tag: str | None = None,
        experiment: str | None = None,
        limit: int | None = 50,
        newest_first: bool = True,
    ) -> list[Row[Any]]:
        query = select(jobs)
        if state:
            query = query.where(jobs.c.state == state)
        if tag:
            query = query.where(jobs.c.tags.like(f"%,{tag},%"))
        if experiment:
            query = query.where(jobs.c.experiment == experiment)
        order = jobs.c.created_at.desc() if newest_first else jobs.c.created_at
        query = query.order_by(order, jobs.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return list(conn.execute(query))

    def get(self, job_ref: str) -> Row[Any]:
        """A job by id, unique id prefix, or cache key. Raises `JobNotFound`."""
        ref = job_ref.strip().lower()
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            raise JobNotFound(f"no job {job_ref!r}: job ids are hexadecimal")
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == ref)).first()
            if row is not None:
                return row
            if len(ref) == 64:
                row = conn.execute(
                    select(jobs)
                    .where(jobs.c.key == ref)
                    .order_by(jobs.c.state.in_(list(DONE_VALUES)).desc(), jobs.c.created_at.desc())
                ).first()
                if row is not None:
                    return row
            if len(ref) >= 4:
                rows = list(conn.execute(select(jobs).where(jobs.c.id.like(f"{ref}%")).limit(2)))
                if len(rows) == 1:
                    return rows[0]
                if len(rows) > 1:
                    raise JobNotFound(f"job id prefix {job_ref!r} is ambiguous: give more characters")
        raise JobNotFound(f"no job {job_ref!r}")

    def get_many(self, job_ids: Sequence[str]) -> list[Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(jobs).where(jobs.c.id.in_(list(job_ids)))))

    def done_by_key(self, key: str) -> Row[Any] | None:
        """The newest job that holds a result for `key`, if any."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(jobs)
                .where(jobs.c.key == key, jobs.c.state.in_(list(DONE_VALUES)), jobs.c.result_key.is_not(None))
                .order_by(jobs.c.finished_at.desc())
            ).first()

    def attempts_of(self, job_id: str) -> list[Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)))

    def bundle(self, bundle_id: str) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(select(bundles).where(bundles.c.id == bundle_id)).first()

    def pending_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(jobs).where(
                    or_(jobs.c.state == JobState.QUEUED.value, jobs.c.state.in_(HELD_STATES))
                )
            ).scalar_one()

    def stored_bytes(self) -> int:
        """Bytes of stored results, each result counted once however many jobs share it."""
        per_key = (
            select(jobs.c.result_key, func.max(jobs.c.result_bytes).label("size"))
            .where(jobs.c.result_key.is_not(None), jobs.c.result_bytes.is_not(None))
            .group_by(jobs.c.result_key)
            .subquery()
        )
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(per_key.c.size), 0))).scalar_one())

    def result_keys_in_use(self) -> dict[str, str]:
        """Every result key a job points at, with that job's state (for `gc`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.result_key, jobs.c.state).where(jobs.c.result_key.is_not(None)))
            return {k: s for k, s in rows}


ACTIVE_VALUES = frozenset(s.value for s in ACTIVE_STATES)
DONE_VALUES = frozenset(s.value for s in DONE_STATES)
