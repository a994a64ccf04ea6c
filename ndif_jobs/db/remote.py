"""Bundles sent to NDIF: their NDIF job ids, status history, and re-attaching after a crash.

NDIF has no idempotency (a second POST is a second job), so the NDIF job id is committed on the
bundle row, and its jobs moved to `submitted`, right after the POST and before the worker waits.
A worker that dies leaves `submitted` jobs whose leases run out; the next worker (or the same
one restarted) takes them over here and polls NDIF by that id instead of sending them again.

Like the queue's, every method rides out a database that is briefly unreachable by running its
transaction again (`retry.py`); each is safe to re-run after a COMMIT that went through unseen.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, and_, select, update

from ..logging import scrub
from .engine import write_transaction
from .queue import LEASE_EXPIRED
from .retry import DEFAULT_RETRY_S, call_stamped_with_retry, retried
from .tables import BundleState, JobState, attempts, bundles, jobs, now


class RemoteBundles:
    def __init__(self, engine: Engine, db_retry_s: float = DEFAULT_RETRY_S) -> None:
        #: A `Database` (the queue's) or an Engine: SQLAlchemy statements run on either.
        self.engine = engine
        #: How long each operation retries while the database is unreachable (0: not at all).
        self.db_retry_s = db_retry_s

    @retried
    def mark_submitted(
        self, worker: str, bundle_id: str, remote_job_id: str, job_ids: list[str], deadline: float | None,
        payload_bytes: int | None = None,
    ) -> None:
        t = now()
        with write_transaction(self.engine) as conn:
            history = self._history(conn, bundle_id)
            _append_once(history, {"status": "SUBMITTED", "at": t, "description": f"NDIF job {remote_job_id}"})
            conn.execute(
                update(bundles)
                .where(bundles.c.id == bundle_id)
                .values(
                    state=BundleState.SUBMITTED.value,
                    remote_job_id=remote_job_id,
                    submitted_at=t,
                    deadline=deadline,
                    payload_bytes=payload_bytes,
                    status_history=json.dumps(history),
                )
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(job_ids), jobs.c.lease_owner == worker)
                .values(state=JobState.SUBMITTED.value, bundle_id=bundle_id, updated_at=t)
            )

    @retried
    def record_status(self, bundle_id: str, status: str, description: str = "") -> bool:
        """Append a status to the bundle's history when it differs from the last one.

        The description is NDIF's text, which may repeat a secret (NDIF echoes a malformed API
        key): it is scrubbed before it is stored, as before it is logged."""
        t = now()
        description = scrub(description)[:500]  # as stored, so that a repeat compares equal
        with write_transaction(self.engine) as conn:
            history = self._history(conn, bundle_id)
            if not _append_once(history, {"status": status, "at": t, "description": description}):
                return False
            conn.execute(
                update(bundles).where(bundles.c.id == bundle_id).values(status_history=json.dumps(history[-200:]))
            )
        return True

    @retried
    def set_result_bytes(self, bundle_id: str, size: int) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(update(bundles).where(bundles.c.id == bundle_id).values(result_bytes=size))

    @retried
    def abandon(self, bundle_id: str, reason: str) -> None:
        """Give up on a request (deadline passed): a late answer for it is ignored."""
        t = now()
        with write_transaction(self.engine) as conn:
            history = self._history(conn, bundle_id)
            _append_once(history, {"status": "ABANDONED", "at": t, "description": reason})
            conn.execute(
                update(bundles)
                .where(bundles.c.id == bundle_id)
                .values(state=BundleState.ABANDONED.value, finished_at=t, error=reason,
                        status_history=json.dumps(history))
            )

    def take_over(self, worker: str, lease_s: float, limit: int = 16) -> list[tuple[Any, list[Any]]]:
        """Submitted bundles whose worker stopped renewing its leases, now leased to `worker`."""
        return call_stamped_with_retry(
            lambda t, earlier: self._take_over(worker, lease_s, limit, t, earlier),
            window_s=self.db_retry_s, database=self.engine, name="take_over",
        )

    def _take_over(
        self, worker: str, lease_s: float, limit: int, t: float, earlier: list[float]
    ) -> list[tuple[Any, list[Any]]]:
        """`take_over`'s transaction at time `t`; `earlier`: the times of this call's failed runs.

        A failed run may have committed unseen: the bundles whose jobs it leased to `worker`
        (at one of those times) are returned, on a fresh lease, instead of taking more."""
        out = []
        with write_transaction(self.engine) as conn:
            if earlier:
                taken = self._adopt_taken(conn, worker, earlier, t, lease_s)
                if taken:
                    return taken
            orphaned = conn.execute(
                select(jobs.c.bundle_id)
                .where(jobs.c.state == JobState.SUBMITTED.value, jobs.c.lease_expires_at < t)
                .group_by(jobs.c.bundle_id)
                .limit(limit)
            ).scalars().all()
            for bundle_id in orphaned:
                bundle = conn.execute(select(bundles).where(bundles.c.id == bundle_id)).first()
                if bundle is None or bundle.remote_job_id is None:
                    continue
                conn.execute(
                    update(jobs)
                    .where(and_(jobs.c.bundle_id == bundle_id, jobs.c.state == JobState.SUBMITTED.value))
                    .values(lease_owner=worker, lease_expires_at=t + lease_s, updated_at=t)
                )
                held = conn.execute(
                    select(jobs).where(jobs.c.bundle_id == bundle_id, jobs.c.state == JobState.SUBMITTED.value)
                ).all()
                # The dead worker's attempts end here; this worker's wait for the same request is a
                # new attempt with the same number (no new work is sent, so none is spent).
                held_ids = [j.id for j in held]
                conn.execute(
                    update(attempts)
                    .where(attempts.c.job_id.in_(held_ids), attempts.c.finished_at.is_(None))
                    .values(finished_at=t, outcome=LEASE_EXPIRED,
                            error="its worker stopped renewing the lease; the next worker re-attached")
                )
                if held:
                    conn.execute(attempts.insert(), [
                        {"job_id": j.id, "bundle_id": bundle_id, "number": j.attempts, "worker": worker,
                         "started_at": t}
                        for j in held
                    ])
                conn.execute(update(bundles).where(bundles.c.id == bundle_id).values(worker=worker))
                out.append((bundle, held))
        return out

    @staticmethod
    def _adopt_taken(
        conn: Any, worker: str, earlier: list[float], t: float, lease_s: float
    ) -> list[tuple[Any, list[Any]]]:
        """The bundles whose submitted jobs were leased to `worker` at one of the `earlier` times
        (nothing else gives them that `updated_at`), with those jobs, now on a fresh lease."""
        mine = (jobs.c.state == JobState.SUBMITTED.value, jobs.c.lease_owner == worker)
        conn.execute(
            update(jobs).where(*mine, jobs.c.updated_at.in_(earlier)).values(lease_expires_at=t + lease_s, updated_at=t)
        )
        held = conn.execute(select(jobs).where(*mine, jobs.c.updated_at == t)).all()
        by_bundle: dict[str, list[Any]] = {}
        for job in held:
            by_bundle.setdefault(job.bundle_id, []).append(job)
        out = []
        for bundle_id, bundle_jobs in by_bundle.items():
            bundle = conn.execute(select(bundles).where(bundles.c.id == bundle_id)).first()
            if bundle is not None:
                out.append((bundle, bundle_jobs))
        return out

    @retried
    def hand_back(self, worker: str) -> int:
        """A stopping worker's `submitted` jobs: leases ended now, so the next worker re-attaches at once."""
        t = now()
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.lease_owner == worker, jobs.c.state == JobState.SUBMITTED.value)
                .values(lease_expires_at=t, updated_at=t)
            )
        return result.rowcount or 0

    @retried
    def rebind(self, job_id: str, **values: Any) -> None:
        """Point a held job at another backend/model (and so another cache key)."""
        with write_transaction(self.engine) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=now(), **values))

    @staticmethod
    def _history(conn: Any, bundle_id: str) -> list[dict[str, Any]]:
        raw = conn.execute(select(bundles.c.status_history).where(bundles.c.id == bundle_id)).scalar()
        try:
            history = json.loads(raw or "[]")
        except ValueError:
            history = []
        return history if isinstance(history, list) else []


def _append_once(history: list[dict[str, Any]], entry: dict[str, Any]) -> bool:
    """Append `entry` unless the history already ends with the same status and description (a
    repeated poll, or a re-run after a lost COMMIT); returns whether it was appended."""
    last = history[-1] if history else {}
    if last.get("status") == entry["status"] and last.get("description", "") == entry.get("description", ""):
        return False
    history.append(entry)
    return True
