"""The Python API: `submit`, `run`, `load_result` and `jobs`.

Each call uses the process's settings (environment and `.env`) unless given a `settings=`.
`run` is the replay entry point for analysis scripts: the same call returns the stored result
instantly once it exists, and with `NDIF_JOBS_OFFLINE=1` never touches the network or a model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .domain import Job as JobInfo
from .errors import NdifJobsError, ResultMissing
from .service import Result, Service, Submission
from .settings import Settings
from .states import DONE_STATES, JobState


@dataclass(frozen=True)
class Job:
    """A submitted job as `submit` and `run` return it: its id, its state then, and whether it
    joined a job already queued for the same computation."""

    id: str
    state: str
    joined: bool = False

    def _repr_html_(self) -> str:
        """In Jupyter: the job's state now and, while it is unfinished, how to wait for it."""
        from .web.notebook import job_html

        return job_html(self)


def _service(settings: Settings | None) -> Service:
    return Service(settings)


def submit(
    experiment: str,
    model: str | None = None,
    *,
    backend: str | None = None,
    priority: int = 0,
    tags: Sequence[str] = (),
    force: bool = False,
    settings: Settings | None = None,
    **params: Any,
) -> Job:
    """Queue one experiment (or get a `cached` job when its result is already stored)."""
    out = _service(settings).submit(
        Submission(experiment, params, model=model, backend=backend, priority=priority, tags=tags, force=force)
    )
    return Job(out.id, out.state, out.joined)


def load_result(job_id_or_key: str, *, verify: bool = False, settings: Settings | None = None) -> Result:
    """A finished job's result: a read-only mapping of its values, with `.tensors`, `.manifest`, `.job`."""
    return _service(settings).load_result(job_id_or_key, verify=verify)


def run(
    experiment: str,
    model: str | None = None,
    *,
    wait: bool = False,
    timeout: float | None = None,
    backend: str | None = None,
    offline: bool | None = None,
    force: bool = False,
    settings: Settings | None = None,
    **params: Any,
) -> Result | Job:
    """The stored result of this experiment if there is one; otherwise queue it.

    With `wait=True` it runs a worker in this process until the job is done and returns the
    result. Offline (`offline=True` or `NDIF_JOBS_OFFLINE=1`) a missing result raises
    `OfflineMiss`, naming the command that would queue it.
    """
    service = _service(settings)
    sub = Submission(experiment, params, model=model, backend=backend, force=force)
    prepared, done = service.lookup(sub)
    is_offline = service.settings.offline if offline is None else offline
    if done is not None and not force:
        return service.load_result(done.id)
    if is_offline:
        raise service.offline_miss(prepared)
    job = service.queue_prepared(prepared)
    if not wait:
        return Job(job.id, job.state, job.joined)
    from .worker import Worker

    deadline = None if timeout is None else time.time() + timeout
    while True:
        found = service.job(job.id)
        if found.state in DONE_STATES:
            return service.load_result(found.id)
        if found.state in (JobState.FAILED, JobState.CANCELLED):
            raise NdifJobsError(f"job {found.id} {found.state}: {found.error or 'no error recorded'}")
        if deadline is not None and time.time() > deadline:
            raise ResultMissing(f"job {found.id} did not finish within {timeout} s (it is {found.state})")
        Worker(service).run(until_empty=True)
        if service.job(job.id).state in (JobState.QUEUED, JobState.RUNNING, JobState.CLAIMED):
            time.sleep(service.settings.poll_s)


def jobs(
    *,
    state: str | None = None,
    tag: str | None = None,
    experiment: str | None = None,
    sweep: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    settings: Settings | None = None,
) -> list[JobInfo]:
    """Jobs matching every filter given, newest first (`ndif-jobs list`'s filters): all of them
    unless `limit` says how many. Each a `domain.Job`: `.params` a dict, `.state`, `.error`, ..."""
    page = _service(settings).list_jobs(state=state, tag=tag, experiment=experiment, sweep=sweep, limit=limit,
                                        offset=offset)
    return page.jobs
