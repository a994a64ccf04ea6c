"""The reads behind the pages: a few aggregate statements over the queue's own connections.

Each page needs a handful of numbers over the whole queue (counts per state, per tag, per
sweep; the workers holding jobs; the bundles at NDIF) and one page of jobs. They are plain SQL
run on `Queue.db` through the queue's `_Sql` (placeholders, dialect), like `db/sweeps.py`, so
that they read SQLite and PostgreSQL alike and stay within the 300 ms budget on 100,000 jobs:
every aggregate is one pass over an index or the table, never one query per job.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import owners
from ..db.base import OnDatabase
from ..db.queue import JOB_COLUMNS, JobRow, Queue, _like_literal
from ..db.retry import retried
from ..db.sweeps import Progress
from ..runner.registry import why_stale
from ..states import HELD_STATES, JobState

#: Sorts a jobs page offers, each an ORDER BY an index serves (or a short sort of one page).
#: Every state as its stored text, in `JobState`'s order.
STATES = tuple(str(s) for s in JobState)
COMPLETED, CACHED, FAILED = str(JobState.COMPLETED), str(JobState.CACHED), str(JobState.FAILED)

SORTS = {
    "newest": "created_at DESC",
    "oldest": "created_at",
    "updated": "updated_at DESC",
    "priority": "priority DESC, created_at",
}
PAGE_SIZE = 50

_JOBS = ", ".join(f'"{c}"' if c == "key" else c for c in JOB_COLUMNS)
TAG_STATS = (
    "SELECT tags, state, count(*), MIN(finished_at), MAX(finished_at) FROM jobs WHERE tags <> ''"
    " GROUP BY tags, state"
)
HELD_BY = (
    "SELECT lease_owner, bundle_id, count(*), MAX(lease_expires_at) FROM jobs"
    " WHERE state IN ({states}) AND lease_owner IS NOT NULL GROUP BY lease_owner, bundle_id"
)
WORKER_ROWS = "SELECT id, host, pid, last_beat, jobs_done, stop_requested FROM workers ORDER BY started_at, id"
AT_NDIF = (
    "SELECT id, job_count, status_history, submitted_at FROM bundles WHERE state = 'submitted'"
    " ORDER BY created_at"
)
#: The jobs a filter matches, as just what sorting needs: one pass, then one page fetched by id.
MATCHING = "SELECT id, created_at, updated_at, priority FROM jobs{where}"
JOBS_BY_IDS = f"SELECT {_JOBS} FROM jobs WHERE id {{ids}}"
#: Jobs finished per second lately, from the bundles that finished in the last `window` seconds
#: (a few hundred rows for 100,000 jobs, where the jobs' own finish times would need a table scan).
RECENT_BUNDLES = "SELECT SUM(job_count), MIN(finished_at), MAX(finished_at) FROM bundles WHERE finished_at > ?"
SNAPSHOT_TTL_S = 15.0
FAILED_IDS_OF_TAG = (
    f"SELECT id FROM jobs WHERE state IN ('{JobState.FAILED}', '{JobState.CANCELLED}')"
    " AND tags LIKE ? ESCAPE '\\'"
)


@dataclass(frozen=True)
class WorkerSeen:
    """A worker: from its row in the `workers` table, where every worker beats whether it holds
    jobs or not (what `ndif-jobs workers` lists), with the jobs its leases hold; or, with no row
    (a worker whose row was forgotten while it held jobs), from its leases alone."""

    worker: str
    host: str
    pid: int | None
    jobs: int
    bundles: tuple[str, ...]
    last_beat: float
    #: Why it looks dead ("process gone", "no beat"), or None: it beats.
    gone: str | None
    #: Jobs it finished since it started (None: it has no row to say).
    jobs_done: int | None = None
    #: Asked to stop (`ndif-jobs workers stop`), not gone yet.
    stopping: bool = False


@dataclass(frozen=True)
class BundleAtNdif:
    """A bundle waiting at NDIF: its latest status and since when. Its NDIF job id stays out."""

    id: str
    jobs: int
    status: str
    description: str
    since: float | None


@dataclass
class JobFilter:
    """What a jobs page shows: every field optional, `text` matched inside the params JSON."""

    state: str = ""
    experiment: str = ""
    tag: str = ""
    sweep: str = ""
    model: str = ""
    text: str = ""
    sort: str = "newest"
    page: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    def where(self) -> tuple[str, list[Any]]:
        parts: list[str] = []
        bound: list[Any] = []
        for column in ("state", "experiment", "sweep", "model"):
            value = getattr(self, column)
            if value:
                parts.append(f"{column} = ?")
                bound.append(value)
        if self.tag:
            parts.append("tags LIKE ? ESCAPE '\\'")
            bound.append(f"%,{_like_literal(self.tag)},%")
        if self.text:
            parts.append("params LIKE ? ESCAPE '\\'")
            bound.append(f"%{_like_literal(self.text)}%")
        return (" WHERE " + " AND ".join(parts)) if parts else "", bound

    def state_only(self) -> bool:
        """Whether nothing but the state is filtered on (what an index answers)."""
        return not (self.experiment or self.tag or self.sweep or self.model or self.text)


_SORT_KEYS: dict[str, Any] = {
    "newest": lambda m: (-m[1], m[0]),
    "oldest": lambda m: (m[1], m[0]),
    "updated": lambda m: (-m[2], m[0]),
    "priority": lambda m: (-m[3], m[1], m[0]),
}


class Snapshot:
    """A value that costs a pass over the whole jobs table, recomputed at most every `ttl_s`.

    The first read computes it; later reads get the last value at once, and one that finds it
    older than `ttl_s` starts a recount in a background thread (the page says how old it is).
    The overview polls every few seconds: it must not scan 100,000 rows each time."""

    def __init__(self, compute: Any, ttl_s: float = SNAPSHOT_TTL_S) -> None:
        self.compute, self.ttl_s = compute, ttl_s
        self._value: Any = None
        self._at = 0.0
        self._lock = threading.Lock()
        self._first = threading.Lock()  # one count at a time while there is no value to give
        self._refreshing = False

    def get(self) -> tuple[Any, float]:
        """The value and when it was computed."""
        with self._lock:
            have, fresh = self._at > 0, time.time() - self._at < self.ttl_s
            start = have and not fresh and not self._refreshing
            if start:
                self._refreshing = True
        if not have:
            with self._first:
                if self._at == 0:
                    self._store(self.compute())
        elif start:
            threading.Thread(target=self._refresh, daemon=True, name="ndif-jobs-ui-recount").start()
        return self._value, self._at

    def invalidate(self) -> None:
        """Count again on the next read (after an action changed the jobs)."""
        with self._lock:
            self._at = 0.0

    def _store(self, value: Any) -> None:
        with self._lock:
            self._value, self._at = value, time.time()

    def _refresh(self) -> None:
        try:
            self._store(self.compute())
        finally:
            with self._lock:
                self._refreshing = False


class Reads(OnDatabase):
    """The page reads over one queue (its connections and retry window, as `Queue`'s own)."""

    def __init__(self, queue: Queue) -> None:
        super().__init__(queue.engine, queue.db_retry_s, queue._sql)
        self.queue = queue

    @retried
    def tag_progress(self) -> list[Progress]:
        """Every tag with its jobs per state, from one pass grouping by the stored tag list."""
        found: dict[str, Progress] = {}
        for tags, state, n, first, last in self._all(self._sql(TAG_STATS)):
            for tag in (t for t in tags.strip(",").split(",") if t):
                group = found.setdefault(tag, Progress(tag, {s: 0 for s in STATES}))
                group.counts[state] = group.counts.get(state, 0) + int(n)
                if state in (COMPLETED, FAILED) and first is not None:
                    group.first_finished = min(filter(None, (group.first_finished, float(first))))
                    group.last_finished = max(filter(None, (group.last_finished, float(last))))
        return sorted(found.values(), key=lambda g: g.name)

    @retried
    def workers(self, lease_s: float) -> list[WorkerSeen]:
        """Every registered worker, busy or idle, with the jobs it holds; then any worker that
        holds jobs without a row. Without a row, a worker's last beat is read off its leases: it
        renews them every third of `lease_s`, so it beat at its latest lease end less `lease_s`."""
        states = ", ".join(f"'{s}'" for s in HELD_STATES)
        held: dict[str, dict[str, Any]] = {}
        for owner, bundle, n, until in self._all(self._sql(HELD_BY.format(states=states))):
            entry = held.setdefault(owner, {"jobs": 0, "bundles": [], "until": 0.0})
            entry["jobs"] += int(n)
            if bundle:
                entry["bundles"].append(bundle)
            entry["until"] = max(entry["until"], float(until or 0.0))
        t = time.time()
        out = []
        for worker_id, host, pid, last_beat, jobs_done, stop in self._all(self._sql(WORKER_ROWS)):
            entry = held.pop(worker_id, {"jobs": 0, "bundles": []})
            out.append(WorkerSeen(
                worker=worker_id, host=host, pid=int(pid), jobs=entry["jobs"], bundles=tuple(sorted(entry["bundles"])),
                last_beat=float(last_beat), gone=why_stale(worker_id, host, float(last_beat), t),
                jobs_done=int(jobs_done), stopping=bool(stop),
            ))
        for owner, entry in sorted(held.items()):
            parsed = owners.parse(owner)
            out.append(WorkerSeen(
                worker=owner, host=parsed.host if parsed else "?", pid=parsed.pid if parsed else None,
                jobs=entry["jobs"], bundles=tuple(sorted(entry["bundles"])), last_beat=entry["until"] - lease_s,
                gone="process gone" if owners.is_gone(owner) else None,
            ))
        return out

    @retried
    def bundles_at_ndif(self) -> list[BundleAtNdif]:
        out = []
        for bundle_id, jobs, history_json, submitted_at in self._all(self._sql(AT_NDIF)):
            history = json.loads(history_json or "[]")
            last = history[-1] if history else {}
            out.append(BundleAtNdif(bundle_id, int(jobs), str(last.get("status", "SUBMITTED")),
                                    str(last.get("description", "")), last.get("at") or submitted_at))
        return out

    @retried
    def page(self, f: JobFilter) -> tuple[list[JobRow], int]:
        """One page of the jobs `f` selects, and how many it selects in all.

        With no filter but the state, an index gives both the count and the page. Any other
        filter (a tag, text in params, an unindexed column) needs a pass over the table: it is
        made once, fetching only each match's id and sort keys, and the page is then read by id."""
        where, bound = f.where()
        offset = (max(f.page, 1) - 1) * PAGE_SIZE
        if f.state_only():
            total = int(self._all(self._sql(f"SELECT count(*) FROM jobs{where}"), bound)[0][0])
            order = SORTS.get(f.sort, SORTS["newest"])
            sql = self._sql(f"SELECT {_JOBS} FROM jobs{where} ORDER BY {order} LIMIT ? OFFSET ?")
            return [JobRow._make(r) for r in self._all(sql, [*bound, PAGE_SIZE, offset])], total
        matches = self._all(self._sql(MATCHING.format(where=where)), bound)
        matches.sort(key=_SORT_KEYS.get(f.sort, _SORT_KEYS["newest"]))
        ids = [m[0] for m in matches[offset : offset + PAGE_SIZE]]
        if not ids:
            return [], len(matches)
        in_sql, values = self._sql.in_(ids)
        rows = {r[0]: JobRow._make(r) for r in self._all(self._sql(JOBS_BY_IDS.format(ids=in_sql)), values)}
        return [rows[i] for i in ids if i in rows], len(matches)

    @retried
    def recent_rate(self, window_s: float = 3600.0) -> float | None:
        """Jobs run per second over the bundles finished in the last `window_s` (None: too few)."""
        jobs, first, last = self._all(self._sql(RECENT_BUNDLES), (time.time() - window_s,))[0]
        if not jobs or first is None or last is None or last - first <= 0:
            return None
        return float(jobs) / (float(last) - float(first))

    @retried
    def failed_of_tag(self, tag: str) -> list[str]:
        return [r[0] for r in self._all(self._sql(FAILED_IDS_OF_TAG), (f"%,{_like_literal(tag)},%",))]


def age(t: float | None) -> float | None:
    return None if t is None else max(0.0, time.time() - float(t))
