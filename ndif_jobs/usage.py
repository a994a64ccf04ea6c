"""What this queue has asked of NDIF: requests, bytes each way, time queued and running there.

Every request sent to NDIF is a bundle row with NDIF's job id; the row keeps the payload's size,
the result's downloaded size and the statuses NDIF reported, with times (`db/remote.py`). The
jobs a request carried are its attempts' jobs. So usage is derived from what the queue already
records, for quotas NDIF plans: nothing is counted twice, a split or resent bundle is one more
request, a request still at NDIF counts up to its latest status.

Grouped (`--by tag|sweep|model`), a request counts in full for each group whose jobs it carried;
the total counts it once. Reads the database only (no torch).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .domain import parse_tags
from .errors import BadInput
from .provenance import parse_history, remote_times

#: What `--by` groups by, and the job column each reads.
GROUPINGS = ("tag", "sweep", "model")
#: A group's name for jobs that have none (no tag, not in a sweep).
NONE = "(none)"

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """`--since` as epoch seconds: a date (`2026-11-29`, local midnight), a date and time
    (`2026-11-29T18:00`, ISO 8601, local unless it names a zone), or an age (`90m`, `12h`, `7d`,
    `2w`). None for none given. Raises `BadInput` with what it takes."""
    if text is None:
        return None
    now = time.time() if now is None else now
    age = _AGE.match(text)
    if age:
        return now - float(age.group(1)) * _UNIT_S[age.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise BadInput(f"--since takes a date (2026-11-29), a date and time (2026-11-29T18:00) or an age (90m, 12h,"
                       f" 7d, 2w), not {text!r}") from None


def check_by(by: str | None) -> str | None:
    if by is not None and by not in GROUPINGS:
        raise BadInput(f"--by takes {', '.join(GROUPINGS)}, not {by!r}")
    return by


@dataclass(frozen=True)
class Member:
    """A job a request carried, with what it may be grouped by."""

    job_id: str
    model: str
    tags: tuple[str, ...]
    sweep: str | None

    def groups(self, by: str) -> tuple[str, ...]:
        if by == "tag":
            return self.tags or (NONE,)
        if by == "sweep":
            return (self.sweep or NONE,)
        return (self.model,)


@dataclass(frozen=True)
class Request:
    """One request sent to NDIF (a bundle row with NDIF's job id) and the jobs it carried."""

    bundle_id: str
    submitted_at: float
    bytes_up: int
    bytes_down: int
    queued_s: float
    running_s: float
    members: tuple[Member, ...] = ()


@dataclass
class Usage:
    requests: int = 0
    jobs: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    queued_s: float = 0.0
    running_s: float = 0.0

    def add(self, request: Request, jobs: int) -> None:
        self.requests += 1
        self.jobs += jobs
        self.bytes_up += request.bytes_up
        self.bytes_down += request.bytes_down
        self.queued_s += request.queued_s
        self.running_s += request.running_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["queued_s"], out["running_s"] = round(self.queued_s, 3), round(self.running_s, 3)
        return out


@dataclass
class Report:
    by: str | None
    since: float | None
    total: Usage = field(default_factory=Usage)
    groups: dict[str, Usage] = field(default_factory=dict)
    #: Whether some request carried jobs of more than one group (so the groups add up to more).
    overlapping: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "since": self.since, "total": self.total.as_dict(),
                "groups": [{"group": name, **u.as_dict()} for name, u in self.groups.items()]}


def tally(requests: Iterable[Request], by: str | None = None, since: float | None = None) -> Report:
    """Sum the requests: in total (each once) and, with `by`, per group (a request counted in
    each group whose jobs it carried, with those jobs)."""
    report = Report(by=by, since=since)
    for request in requests:
        report.total.add(request, len({m.job_id for m in request.members}))
        if by is None:
            continue
        per_group: dict[str, set[str]] = {}
        for member in request.members:
            for name in member.groups(by):
                per_group.setdefault(name, set()).add(member.job_id)
        if not per_group:
            per_group[NONE] = set()
        report.overlapping = report.overlapping or len(per_group) > 1
        for name, jobs in per_group.items():
            report.groups.setdefault(name, Usage()).add(request, len(jobs))
    report.groups = dict(sorted(report.groups.items(), key=lambda kv: (-kv[1].requests, kv[0])))
    return report


# -- reading the queue ------------------------------------------------------------------------

_SENT = "remote_job_id IS NOT NULL AND submitted_at >= ?"
REQUESTS = (
    "SELECT id, submitted_at, payload_bytes, result_bytes, status_history FROM bundles"
    f" WHERE {_SENT} ORDER BY submitted_at"
)
MEMBERS = (
    "SELECT DISTINCT a.bundle_id, j.id, j.model, j.tags, j.sweep FROM attempts a JOIN jobs j ON j.id = a.job_id"
    f" WHERE a.bundle_id IN (SELECT id FROM bundles WHERE {_SENT})"
)


def read_requests(queue: Any, since: float | None = None) -> list[Request]:
    """The requests sent to NDIF since `since` (all without it), from the queue's database."""
    from .db.retry import call_with_retry

    start = since if since is not None else float("-inf")
    sql = queue._sql

    def read(_rerun: bool) -> tuple[list[Any], list[Any]]:
        with queue.db.cursor() as cur:
            cur.execute(sql(REQUESTS), (start,))
            bundles = cur.fetchall()
            cur.execute(sql(MEMBERS), (start,))
            return bundles, cur.fetchall()

    bundles, members = call_with_retry(read, window_s=queue.db_retry_s, database=queue.engine, name="usage")
    return build_requests(bundles, members)


def build_requests(bundles: Sequence[Sequence[Any]], members: Sequence[Sequence[Any]]) -> list[Request]:
    """Requests from the rows `REQUESTS` and `MEMBERS` read."""
    carried: dict[str, list[Member]] = {}
    for bundle_id, job_id, model, tags, sweep in members:
        carried.setdefault(bundle_id, []).append(Member(job_id, model, parse_tags(tags or ""), sweep))
    out = []
    for bundle_id, submitted_at, payload_bytes, result_bytes, history in bundles:
        times = remote_times(parse_history(history), submitted_at)
        out.append(Request(
            bundle_id=bundle_id, submitted_at=submitted_at, bytes_up=int(payload_bytes or 0),
            bytes_down=int(result_bytes or 0), queued_s=times.queued_s if times else 0.0,
            running_s=times.running_s if times else 0.0,
            members=tuple(sorted(carried.get(bundle_id, []), key=lambda m: m.job_id)),
        ))
    return out
