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
from collections.abc import Sequence
from typing import Any

from ..errors import clip_error
from ..logging import scrub
from ..states import AttemptOutcome, BundleState, JobState
from .base import OnDatabase
from .queue import (
    _JOBS,
    BUNDLE,
    DEFER,
    DEFER_ATTEMPTS,
    END_LEASES_AT_NDIF,
    HELD_AT_REMOTE,
    BundleRow,
    JobRow,
    now,
)
from .retry import call_stamped_with_retry, retried

_SUBMITTED = HELD_AT_REMOTE
HISTORY = "SELECT status_history FROM bundles WHERE id = ?"
SET_HISTORY = "UPDATE bundles SET status_history = ? WHERE id = ?"
MARK_BUNDLE_SUBMITTED = (
    f"UPDATE bundles SET state = '{BundleState.SUBMITTED}', remote_job_id = ?, submitted_at = ?, deadline = ?,"
    " payload_bytes = ?, status_history = ? WHERE id = ?"
)
MARK_JOBS_SUBMITTED = (
    f"UPDATE jobs SET state = '{JobState.SUBMITTED}', bundle_id = ?, updated_at = ? WHERE id {{ids}}"
    " AND lease_owner = ?"
)
SET_RESULT_BYTES = "UPDATE bundles SET result_bytes = ? WHERE id = ?"
ABANDON = (
    f"UPDATE bundles SET state = '{BundleState.ABANDONED}', finished_at = ?, error = ?, status_history = ?"
    " WHERE id = ?"
)
# Bundles at the remote backend whose worker stopped renewing its leases (a range probe of the
# lease index, as few rows as jobs held).
ORPHANED = f"SELECT bundle_id FROM jobs WHERE {_SUBMITTED} AND lease_expires_at < ? GROUP BY bundle_id LIMIT ?"
TAKE_BUNDLE_JOBS = (
    f"UPDATE jobs SET lease_owner = ?, lease_expires_at = ?, updated_at = ? WHERE bundle_id = ? AND {_SUBMITTED}"
    f" RETURNING {_JOBS}"
)
# The dead worker's attempts end here; this worker's wait for the same request is a new attempt
# with the same number (no new work is sent, so none is spent).
LOSE_ATTEMPTS = (
    f"UPDATE attempts SET finished_at = ?, outcome = '{AttemptOutcome.LEASE_EXPIRED}',"
    " error = 'its worker stopped renewing the lease; the next worker re-attached'"
    " WHERE job_id {ids} AND finished_at IS NULL"
)
INSERT_ATTEMPT = "INSERT INTO attempts (job_id, bundle_id, number, worker, started_at) VALUES (?, ?, ?, ?, ?)"
SET_BUNDLE_WORKER = "UPDATE bundles SET worker = ? WHERE id = ?"
# What an earlier run of `take_over` leased to this worker unseen (nothing else gives its jobs
# that `updated_at`), on a fresh lease.
ADOPT_TAKEN = (
    f"UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE {_SUBMITTED} AND lease_owner = ?"
    f" AND updated_at {{times}} RETURNING {_JOBS}"
)
REBIND = 'UPDATE jobs SET backend = ?, model = ?, model_key = ?, "key" = ?, updated_at = ? WHERE id = ?'
# A completed request whose result link expired: its jobs back to the queue at once, the attempt
# given back (the request ran; nothing was wrong with the jobs).
RESEND_JOBS = (
    f"UPDATE jobs SET state = '{JobState.QUEUED}', not_before = ?, error = ?, updated_at = ?, lease_owner = NULL,"
    f" lease_expires_at = NULL, attempts = {{max}}(attempts - 1, 0) WHERE id {{ids}} AND lease_owner = ?"
    f" AND {_SUBMITTED}"
)
# The open attempt of a claim undone because NDIF does not run the model yet (the jobs go back
# through the queue's DEFER): nothing was tried, so no attempt is recorded.
DROP_OPEN_ATTEMPTS = "DELETE FROM attempts WHERE job_id {ids} AND worker = ? AND finished_at IS NULL"
# Every queued job of a model NDIF refused (the same answer awaits each of them).
FAIL_QUEUED_OF_MODEL = (
    f"UPDATE jobs SET state = '{JobState.FAILED}', error = ?, finished_at = ?, updated_at = ?"
    f" WHERE state = '{JobState.QUEUED}' AND backend = ? AND model_key = ?"
)
# Queued jobs waiting for NDIF to run their model, per model, with what they say.
MODEL_WAITS = (
    f"SELECT model, count(*), MAX(error) FROM jobs WHERE state = '{JobState.QUEUED}' AND error LIKE ?"
    " GROUP BY model ORDER BY model"
)


class RemoteBundles(OnDatabase):
    """The queue's operations on bundles at a remote backend, on the queue's own database."""

    @retried
    def mark_submitted(
        self, worker: str, bundle_id: str, remote_job_id: str, job_ids: Sequence[str], deadline: float | None,
        payload_bytes: int | None = None,
    ) -> None:
        t = now()
        sql = self._sql
        with self.db.cursor(write=True, durable=True) as cur:
            history = self._history(cur, bundle_id)
            _append_once(history, {"status": "SUBMITTED", "at": t, "description": f"NDIF job {remote_job_id}"})
            cur.execute(
                sql(MARK_BUNDLE_SUBMITTED),
                (remote_job_id, t, deadline, payload_bytes, json.dumps(history), bundle_id),
            )
            for chunk in sql.chunks(list(job_ids)):
                in_sql, ids = sql.in_(chunk)
                cur.execute(sql(MARK_JOBS_SUBMITTED, ids=in_sql), [bundle_id, t, *ids, worker])

    @retried
    def record_status(self, bundle_id: str, status: str, description: str = "") -> bool:
        """Append a status to the bundle's history when it differs from the last one.

        The description is NDIF's text, which may repeat a secret (NDIF echoes a malformed API
        key): it is scrubbed before it is stored, as it is before it is logged."""
        t = now()
        description = scrub(description)[:500]  # as stored, so that a repeat compares equal
        with self.db.cursor(write=True) as cur:
            history = self._history(cur, bundle_id)
            if not _append_once(history, {"status": status, "at": t, "description": description}):
                return False
            cur.execute(self._sql(SET_HISTORY), (json.dumps(history[-200:]), bundle_id))
        return True

    @retried
    def set_result_bytes(self, bundle_id: str, size: int) -> None:
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(SET_RESULT_BYTES), (size, bundle_id))

    @retried
    def abandon(self, bundle_id: str, reason: str) -> None:
        """Give up on a request (deadline passed): a late answer for it is ignored."""
        t = now()
        with self.db.cursor(write=True) as cur:
            history = self._history(cur, bundle_id)
            _append_once(history, {"status": "ABANDONED", "at": t, "description": reason})
            cur.execute(self._sql(ABANDON), (t, reason, json.dumps(history), bundle_id))

    @retried
    def resend_expired(self, worker: str, bundle_id: str, job_ids: Sequence[str], reason: str,
                       finished_at: float | None) -> int:
        """A completed request whose result link expired before it was downloaded: the bundle is
        given up (EXPIRED in its history, with the time lost since NDIF finished it) and its jobs
        go back to the queue at once, no attempt spent. Returns how many jobs went back."""
        t = now()
        sql = self._sql
        entry: dict[str, Any] = {"status": "EXPIRED", "at": t, "description": reason}
        if finished_at is not None:
            entry.update(finished_at=finished_at, lost_s=max(t - finished_at, 0.0))
        resent = 0
        with self.db.cursor(write=True) as cur:
            history = self._history(cur, bundle_id)
            _append_once(history, entry)
            cur.execute(sql(ABANDON), (t, reason, json.dumps(history), bundle_id))
            for chunk in sql.chunks(list(job_ids)):
                in_sql, ids = sql.in_(chunk)
                cur.execute(sql(RESEND_JOBS, max=sql.max, ids=in_sql), [t, reason, t, *ids, worker])
                resent += max(cur.rowcount, 0)
                cur.execute(sql(DEFER_ATTEMPTS, ids=in_sql), [t, reason, *ids, worker])
        return resent

    @retried
    def hold_for_model(self, worker: str, job_ids: Sequence[str], reason: str, delay_s: float) -> int:
        """Claimed jobs whose model the backend does not run yet: back to the queue for `delay_s`,
        the claim undone (no attempt spent, none recorded), `reason` on each job."""
        t = now()
        sql = self._sql
        reason = clip_error(reason)
        held = 0
        with self.db.cursor(write=True) as cur:
            for chunk in sql.chunks(list(job_ids)):
                in_sql, ids = sql.in_(chunk)
                cur.execute(sql(DEFER, max=sql.max, ids=in_sql), [t + delay_s, reason, t, *ids, worker])
                held += max(cur.rowcount, 0)
                cur.execute(sql(DROP_OPEN_ATTEMPTS, ids=in_sql), [*ids, worker])
        return held

    @retried
    def fail_queued_of_model(self, backend: str, model_key: str, error: str) -> int:
        """Fail every queued job of `model_key` on `backend` with one error (the backend refused
        the model); returns how many."""
        t = now()
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(FAIL_QUEUED_OF_MODEL), (clip_error(error), t, t, backend, model_key))
            return max(cur.rowcount, 0)

    @retried
    def model_waits(self, prefix: str) -> list[tuple[str, int, str]]:
        """Queued jobs whose error starts with `prefix` (waiting for their model), as (model, jobs, reason)."""
        with self.db.cursor() as cur:
            cur.execute(self._sql(MODEL_WAITS), (prefix + "%",))
            return [(m, int(n), str(e)) for m, n, e in cur.fetchall()]

    def take_over(self, worker: str, lease_s: float, limit: int = 16) -> list[tuple[BundleRow, list[JobRow]]]:
        """Submitted bundles whose worker stopped renewing its leases, now leased to `worker`."""
        return call_stamped_with_retry(
            lambda t, earlier: self._take_over(worker, lease_s, limit, t, earlier),
            window_s=self.db_retry_s, database=self.engine, name="take_over",
        )

    def _take_over(
        self, worker: str, lease_s: float, limit: int, t: float, earlier: Sequence[float]
    ) -> list[tuple[BundleRow, list[JobRow]]]:
        """`take_over`'s transaction at time `t`; `earlier`: the times of this call's failed runs.

        A failed run may have committed unseen: the bundles whose jobs it leased to `worker`
        (at one of those times) are returned, on a fresh lease, instead of taking more."""
        sql = self._sql
        out: list[tuple[BundleRow, list[JobRow]]] = []
        with self.db.cursor(write=True) as cur:
            if earlier:
                taken = self._adopt_taken(cur, worker, earlier, t, lease_s)
                if taken:
                    return taken
            cur.execute(sql(ORPHANED), (t, limit))
            for (bundle_id,) in cur.fetchall():
                bundle = self._bundle(cur, bundle_id)
                if bundle is None or bundle.remote_job_id is None:
                    continue
                cur.execute(sql(TAKE_BUNDLE_JOBS), (worker, t + lease_s, t, bundle_id))
                held = [JobRow._make(r) for r in cur.fetchall()]
                for chunk in sql.chunks([j.id for j in held]):
                    in_sql, ids = sql.in_(chunk)
                    cur.execute(sql(LOSE_ATTEMPTS, ids=in_sql), [t, *ids])
                if held:
                    cur.executemany(sql(INSERT_ATTEMPT), [(j.id, bundle_id, j.attempts, worker, t) for j in held])
                cur.execute(sql(SET_BUNDLE_WORKER), (worker, bundle_id))
                out.append((bundle, held))
        return out

    def _adopt_taken(
        self, cur: Any, worker: str, earlier: Sequence[float], t: float, lease_s: float
    ) -> list[tuple[BundleRow, list[JobRow]]]:
        """The bundles whose submitted jobs were leased to `worker` at one of the `earlier` times,
        with those jobs, now on a fresh lease."""
        in_sql, times = self._sql.in_(earlier)
        cur.execute(self._sql(ADOPT_TAKEN, times=in_sql), [t + lease_s, t, worker, *times])
        by_bundle: dict[str, list[JobRow]] = {}
        for row in cur.fetchall():
            job = JobRow._make(row)
            by_bundle.setdefault(job.bundle_id or "", []).append(job)
        out = []
        for bundle_id, bundle_jobs in by_bundle.items():
            bundle = self._bundle(cur, bundle_id)
            if bundle is not None:
                out.append((bundle, bundle_jobs))
        return out

    @retried
    def hand_back(self, worker: str) -> int:
        """A stopping worker's `submitted` jobs: leases ended now, so the next worker re-attaches at once."""
        t = now()
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(END_LEASES_AT_NDIF), (t, t, worker))
            return max(cur.rowcount, 0)

    @retried
    def rebind(self, job_id: str, *, backend: str, model: str, model_key: str, key: str) -> None:
        """Point a held job at another backend/model (and so another cache key)."""
        with self.db.cursor(write=True) as cur:
            cur.execute(self._sql(REBIND), (backend, model, model_key, key, now(), job_id))

    def _bundle(self, cur: Any, bundle_id: str) -> BundleRow | None:
        cur.execute(self._sql(BUNDLE), (bundle_id,))
        row = cur.fetchone()
        return BundleRow._make(row) if row is not None else None

    def _history(self, cur: Any, bundle_id: str) -> list[dict[str, Any]]:
        cur.execute(self._sql(HISTORY), (bundle_id,))
        row = cur.fetchone()
        try:
            history = json.loads((row[0] if row else None) or "[]")
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
