"""What each page shows, gathered from the service as plain values for the templates.

Kept apart from the routes (`app.py`) so that the HTML report (`report.py`) and the notebook
views (`notebook.py`) draw the same job and result as the job page does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..states import ACTIVE_STATES, JobState
from . import present
from .queries import STATES, JobFilter, Progress, Reads, Snapshot

if TYPE_CHECKING:
    from ..service import Result, Service

class Counts:
    """The overview's counts that take a pass over the whole jobs table (per tag, bytes stored),
    kept as `Snapshot`s by the app so that polling the overview does not rescan the table."""

    def __init__(self, service: Service) -> None:
        self.tags = Snapshot(lambda: Reads(service.queue).tag_progress())
        self.stored_bytes = Snapshot(service.queue.stored_bytes)

    def invalidate(self) -> None:
        self.tags.invalidate()

    def prime(self) -> None:
        """Count now, in a background thread: the first overview then finds the counts made."""
        import threading

        def count() -> None:
            self.tags.get()
            self.stored_bytes.get()

        threading.Thread(target=count, daemon=True, name="ndif-jobs-ui-first-count").start()


def overview(service: Service, counts: Counts | None = None) -> dict[str, Any]:
    """Everything the overview shows, in a handful of statements whatever the queue's size."""
    queue = service.queue
    reads = Reads(queue)
    counts = counts or Counts(service)
    overall = Progress("all jobs", {str(k): int(v) for k, v in queue.counts().items()})
    rate = reads.recent_rate()
    retrying, next_retry = queue.retry_waiting()
    tags, tags_at = counts.tags.get()
    stored, _ = counts.stored_bytes.get()
    return {
        "overall": overall,
        "rate": rate,
        "eta_s": overall.remaining / rate if rate else (0.0 if overall.remaining == 0 else None),
        "states": STATES,
        "tags": tags,
        "tags_age_s": time.time() - tags_at,
        "sweeps": sweep_progress(service),
        "workers": reads.workers(service.settings.lease_s),
        "at_ndif": [_clean_bundle(b) for b in reads.bundles_at_ndif()],
        "stored_bytes": stored,
        "lease_expired": queue.lease_expired_counts(),
        "retrying": retrying,
        "next_retry": next_retry,
        "waiting_for_model": service.waiting_for_model(),
    }


def _clean_bundle(bundle: Any) -> Any:
    from dataclasses import replace

    return replace(bundle, description=present.redact(bundle.description))


def sweep_progress(service: Service) -> list[Progress]:
    from ..db.sweeps import Sweeps

    sweeps = Sweeps(service.queue)
    out = []
    for record in sweeps.all():
        p = sweeps.progress(record.name)
        out.append(Progress(p.name, dict(p.counts), p.first_finished, p.last_finished))
    return out


def jobs(service: Service, f: JobFilter) -> dict[str, Any]:
    reads = Reads(service.queue)
    rows, total = reads.page(f)
    from .queries import PAGE_SIZE, SORTS

    return {
        "rows": [{"id": r.id, "state": r.state, "experiment": r.experiment, "model": r.model,
                  "tags": present.tags(r.tags), "sweep": r.sweep, "created_at": r.created_at,
                  "finished_at": r.finished_at, "params": _short_params(r.params),
                  "error": present.redact((r.error or "").splitlines()[0][:120] if r.error else "")} for r in rows],
        "total": total,
        "filter": f,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "states": STATES,
        "sorts": list(SORTS),
        "experiments": _experiment_names(),
    }


def _experiment_names() -> list[str]:
    from .. import experiments

    return sorted(e.name for e in experiments.all_experiments())


def _short_params(params_json: str) -> str:
    params = json.loads(params_json)
    text = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items() if v is not None)
    return text if len(text) <= 140 else text[:140] + "…"


@dataclass
class ResultView:
    """A result as a page shows it: its names with kind and shape, its summary lines."""

    names: list[tuple[str, str, str]]
    summary: list[str]
    has_plot: bool
    bytes: int | None = None
    error: str | None = None
    #: How the result was made (`provenance.lines`), NDIF's job id left out: the page shows it
    #: only behind the token.
    provenance: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class JobView:
    job: dict[str, Any]
    attempts: list[dict[str, Any]]
    bundle: dict[str, Any] | None
    timeline: list[dict[str, Any]]
    result: ResultView | None
    final: bool
    retryable: bool
    cancellable: bool
    remote_job_id: str | None = None
    export_formats: tuple[str, ...] = field(default_factory=tuple)


def result_view(result: Result) -> ResultView:
    from ..provenance import lines, of_manifest
    from ..summaries import summarize

    names = [(name, *present.describe(value)) for name, value in result.items()]
    return ResultView(names=names, summary=summarize(str(result.job["experiment"]), result),
                      has_plot=has_plot(str(result.job["experiment"])),
                      provenance=lines(of_manifest(result.manifest), show_job_id=False))


def has_plot(experiment: str) -> bool:
    from .. import experiments
    from ..errors import UnknownExperiment

    try:
        return experiments.get(experiment).hook("plot") is not None
    except UnknownExperiment:
        return False


def job(service: Service, ref: str) -> JobView:
    """One job as its page shows it. Raises `JobNotFound`."""
    queue = service.queue
    row = queue.get(ref)
    bundle_row = queue.bundle(row.bundle_id) if row.bundle_id else None
    remote = bundle_row.remote_job_id if bundle_row is not None else None
    hide = [remote]
    attempts = [{"number": a.number, "worker": a.worker, "bundle": a.bundle_id, "started_at": a.started_at,
                 "finished_at": a.finished_at, "outcome": a.outcome, "error": present.redact(a.error, hide)}
                for a in queue.attempts_of(row.id)]
    bundle = timeline = None
    if bundle_row is not None:
        bundle = {"id": bundle_row.id, "backend": bundle_row.backend, "state": bundle_row.state,
                  "jobs": bundle_row.job_count, "error": present.redact(bundle_row.error, hide)}
        history = json.loads(bundle_row.status_history or "[]")
        timeline = [{"status": str(e.get("status", "")), "at": e.get("at"),
                     "description": present.redact(str(e.get("description", "")), hide)} for e in history]
        for i, entry in enumerate(timeline):
            following = timeline[i + 1] if i + 1 < len(timeline) else None
            end = following["at"] if following else (bundle_row.finished_at or time.time())
            entry["lasted"] = (end - entry["at"]) if end and entry["at"] else None
    data = dict(row._mapping)
    data["params"] = json.loads(row.params)
    data["tags"] = present.tags(row.tags)
    data["error"] = present.redact(row.error, hide)
    result = None
    if row.result_key is not None:
        result = _load(service, row.id)
        result.bytes = row.result_bytes
    from ..store.housekeeping import EXPORT_FORMATS

    return JobView(job=data, attempts=attempts, bundle=bundle, timeline=timeline or [], result=result,
                   final=row.state not in ACTIVE_STATES, retryable=row.state not in ACTIVE_STATES,
                   cancellable=row.state in ACTIVE_STATES, remote_job_id=remote,
                   export_formats=tuple(EXPORT_FORMATS))


def _load(service: Service, job_id: str) -> ResultView:
    from ..errors import NdifJobsError

    try:
        return result_view(service.load_result(job_id))
    except NdifJobsError as exc:
        return ResultView(names=[], summary=[], has_plot=False, error=str(exc))


def failed_ids(service: Service, sweep: str | None, tag: str | None) -> list[str]:
    """The failed and cancelled jobs of a sweep or a tag: what "retry all failed" queues again."""
    if sweep:
        from ..db.sweeps import Sweeps

        return Sweeps(service.queue).failed_jobs(sweep)
    if tag:
        return Reads(service.queue).failed_of_tag(tag)
    return [r.id for r in service.queue.list_jobs(state=JobState.FAILED, limit=None)]


def sweep(service: Service, name: str) -> dict[str, Any]:
    """A sweep's progress, its latest jobs and, where `ndif_jobs.collect` exists, its table."""
    from ..db.sweeps import Sweeps

    record = Sweeps(service.queue).require(name)
    p = Sweeps(service.queue).progress(name)
    progress = Progress(p.name, dict(p.counts), p.first_finished, p.last_finished)
    listed = jobs(service, JobFilter(sweep=name, sort="oldest"))
    return {"name": record.name, "progress": progress, "created_at": record.created_at, "listed": listed,
            "states": STATES}


def sweep_figure(service: Service, name: str) -> bytes:
    """The sweep's figure (`sweeps.figures.draw_sweep` over its `collect` table), drawn now: it
    changes as its jobs finish. Raises `PlotError` when its experiment draws none."""
    import tempfile
    from pathlib import Path

    from ..collection import collect
    from ..sweeps.figures import draw_sweep

    with tempfile.TemporaryDirectory(prefix="ndif-jobs-ui-") as folder:
        path = draw_sweep(collect(name, settings=service.settings), Path(folder) / "sweep.png", title=name)
        return Path(path).read_bytes()
