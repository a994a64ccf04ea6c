"""Bundles at a remote backend (a backend whose `reattaches` is true: NDIF).

A remote backend has no idempotency (a second POST is a second job), so its job id is committed
on the bundle row, and the bundle's jobs moved to `submitted`, right after the POST and before
the worker waits (`commit`). A worker that dies leaves `submitted` jobs whose leases run out; the
next worker takes them over and waits by that id instead of sending them again (`reattach`).

Also here: splitting a bundle the backend failed as a whole, halving it until the job at fault
is alone (`split`), giving up on a bundle past its deadline (`abandon`), and the outage breaker:
while a backend is unavailable the worker sends it nothing and puts bundles back in the queue
with no attempt spent (`deferring`, `trip`).

A result is never wasted for a link that expired: NDIF's result link lives an hour, and a
worker that slept (or was dead) through it finds a 403; the request ran, so its jobs go back to
the queue at once, no attempt spent, the time lost in their history (`resend_expired`). A model
NDIF does not run is not sent to (`deferring`: its jobs wait in the queue, saying why), and a
model NDIF refuses fails all its queued jobs once (`refused`), not each in its own request.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .. import crashpoints
from ..backends import Backend, Handle, Status, backend_class
from ..backends.ndif import ModelRefused, ResultExpired
from ..backends.ndif_status import waiting_reason
from ..db.remote import RemoteBundles
from ..logging import get_logger, scrub
from ..model_refs import resolve_model
from ..units import duration_text

if TYPE_CHECKING:
    from ..backends.base import OnStatus
    from .loop import Worker

log = get_logger("ndif_jobs.worker")


class RemoteExecution:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        queue = worker.service.queue
        self.bundles = RemoteBundles(queue.engine, db_retry_s=queue.db_retry_s)
        #: Per backend: outages in a row, and until when this worker sends it nothing more.
        self._outages: dict[str, int] = defaultdict(int)
        self._unavailable_until: dict[str, float] = {}
        #: Per (backend, model key): what the backend said refusing the model, and until when it stands.
        self._refused: dict[tuple[str, str], tuple[str, float]] = {}
        #: Per (backend, model key): the reason its jobs wait, as last logged (said once per change).
        self._waiting: dict[tuple[str, str], str] = {}

    # -- the outage breaker --------------------------------------------------------------

    def deferring(self, backend: str, jobs: list[Any]) -> bool:
        """While `backend` is unavailable, the rest of a claim made before it went away goes back
        to the queue (True); otherwise False."""
        until = self._unavailable_until.get(backend, 0.0)
        if time.time() >= until:
            return self._model_not_ready(backend, jobs)
        title = backend_class(backend).title
        self._defer(title, [j.id for j in jobs], None, until - time.time(), f"{title} is unavailable", log)
        return True

    # -- models the backend does not run (yet), or refuses ---------------------------------

    def _model_not_ready(self, name: str, jobs: list[Any]) -> bool:
        """True when the jobs were not sent: their model was refused moments ago (they fail with
        it), or the backend does not run it now (they wait in the queue, no attempt spent)."""
        worker = self.worker
        model_key = jobs[0].model_key
        refused = self._refused.get((name, model_key))
        if refused is not None and time.time() < refused[1]:
            worker.count(worker.service.queue.in_transaction(
                lambda tx: tx.fail(worker.id, [(j.id, refused[0]) for j in jobs]), name="fail refused model"))
            return True
        backend = worker.backend(name)
        not_ready = getattr(backend, "not_ready", None)
        if not_ready is None:
            return False
        ref = resolve_model(jobs[0].model)
        why = not_ready(ref)
        if why is None:
            if self._waiting.pop((name, model_key), None) is not None:
                log.info(f"{backend.title} runs the model now: sending its jobs", model=jobs[0].model)
            return False
        reason = waiting_reason(jobs[0].model, why)
        if self._waiting.get((name, model_key)) != reason:
            self._waiting[(name, model_key)] = reason
            log.warning(f"not sending to a model {backend.title} does not run: its jobs wait in the queue, no"
                        " attempt spent", model=jobs[0].model, why=why, hint="NDIF_JOBS_ALLOW_COLD=1 sends anyway")
        self.bundles.hold_for_model(worker.id, [j.id for j in jobs], reason, worker.settings.model_wait_s)
        return True

    def refused(self, backend: Backend, jobs: list[Any], error: Exception, blog: Any) -> None:
        """After the backend refused a bundle: if it refused the model itself, every queued job of
        the model fails with the same answer now, instead of each going to the backend to get it."""
        if not isinstance(error, ModelRefused) or not jobs:
            return
        model_key = jobs[0].model_key
        message = str(error)
        self._refused[(backend.name, model_key)] = (message, time.time() + self.worker.settings.model_wait_s)
        failed = self.bundles.fail_queued_of_model(backend.name, model_key, message)
        blog.error(f"{backend.title} refused the model: its queued jobs failed with it", model=jobs[0].model,
                   queued_failed=failed)
        self.worker.stats.failed += failed

    # -- a completed result whose link expired -------------------------------------------

    def resend_expired(self, backend: Backend, bundle_id: str, handle: Handle, jobs: list[Any],
                       error: ResultExpired, blog: Any) -> None:
        """The request completed but its result link expired before the download: its jobs go
        back to the queue at once, no attempt spent, with the time lost since it completed."""
        t = time.time()
        life_min = round(error.life_s / 60)
        if error.made_at is not None:
            lost = f"{duration_text(t - error.made_at)} lost since {backend.title} finished it"
        else:
            lost = f"at least {life_min} min lost"
        reason = f"result link expired after {life_min} min: sent again ({lost}, no attempt spent)"
        blog.warning(f"the {backend.title} result link expired before the download: sending the jobs again",
                     remote_job=handle.remote_id, reason=reason)
        resent = self.bundles.resend_expired(self.worker.id, bundle_id, [j.id for j in jobs], reason, error.made_at)
        self.worker.count({"retried": resent})

    def trip(self, backend: Backend, job_ids: list[str], bundle_id: str, reason: str, blog: Any) -> None:
        """The backend could not take the bundle: back off, longer with each outage in a row."""
        self._outages[backend.name] += 1
        delay = self.worker.retry_delay(self._outages[backend.name])
        self._unavailable_until[backend.name] = time.time() + delay
        self._defer(backend.title, job_ids, bundle_id, delay, reason, blog)

    def _defer(self, title: str, job_ids: list[str], bundle_id: str | None, delay_s: float, reason: str,
               blog: Any) -> None:
        """Back to the queue for `delay_s`, no attempt spent."""
        reason = scrub(reason.splitlines()[0] if reason else f"{title} is unavailable")
        blog.warning(f"{title} unavailable: the jobs wait in the queue, no attempt spent", retry_in_s=round(delay_s, 1),
                     error=reason)
        self.worker.service.queue.defer(self.worker.id, job_ids, f"waiting for {title}: {reason}", delay_s,
                                        bundle_id=bundle_id)

    # -- sending and waiting -------------------------------------------------------------

    def commit(self, backend: Backend, bundle_id: str, handle: Handle, jobs: list[Any], blog: Any) -> Any:
        """Record the remote job id on the bundle row (jobs `submitted`) before anything waits on
        it; returns the logger bound to it."""
        crashpoints.reached("posted")
        self._outages[backend.name] = 0
        remote_id = str(handle.remote_id)
        self.bundles.mark_submitted(self.worker.id, bundle_id, remote_id, [j.id for j in jobs], handle.deadline,
                                    handle.payload_bytes)
        crashpoints.reached("submitted")
        blog.info(f"bundle submitted to {backend.title}", remote_job=remote_id, payload_bytes=handle.payload_bytes,
                  jobs=len(jobs), computations=len(handle.job_ids))
        return log.bind(bundle=bundle_id, remote_job=remote_id, jobs=len(jobs), backend=backend.name)

    def status_recorder(self, backend: Backend, bundle_id: str, blog: Any) -> OnStatus:
        """Each new status of a remote bundle, into its history and the log."""

        def record(status: Status) -> None:
            self.bundles.record_status(bundle_id, status.status, status.description)
            blog.info(f"{backend.title} status", status=status.status, description=status.description[:200])

        return record

    def reattach(self) -> None:
        """Take over bundles already at a remote backend whose worker died, and wait for them by id."""
        worker = self.worker
        for bundle, held in self.bundles.take_over(worker.id, worker.settings.lease_s):
            log.info("re-attaching to a remote request", bundle=bundle.id, remote_job=bundle.remote_job_id,
                     jobs=len(held), backend=bundle.backend)
            self.bundles.record_status(bundle.id, "REATTACHED", f"worker {worker.id}")
            backend = worker.backend(bundle.backend)
            handle = Handle(job_ids=[j.id for j in held], remote_id=bundle.remote_job_id, deadline=bundle.deadline)
            blog = log.bind(bundle=bundle.id, remote_job=bundle.remote_job_id, jobs=len(held), backend=backend.name)
            worker.wait_and_store(backend, bundle.id, handle, list(held), {}, blog, None)

    def abandon(self, backend: Backend, bundle_id: str, handle: Handle, job_ids: list[str], blog: Any) -> None:
        """No answer by the deadline: give the request up (a late answer is ignored) and send the
        jobs again, at once."""
        reason = f"no answer from {backend.title} job {handle.remote_id} by the deadline: sent again"
        blog.warning(reason)
        self.bundles.abandon(bundle_id, reason)
        self.worker.count(self.worker.service.queue.fail(self.worker.id, [(j, reason) for j in job_ids],
                                                         retry_in_s=0.0))

    # -- splitting -----------------------------------------------------------------------

    def split(self, backend: Backend, bundle_id: str, jobs: list[Any], message: str, blog: Any) -> None:
        """The backend answered ERROR for the whole request: halve the bundle until the culprit is alone."""
        worker = self.worker
        short = message.strip().splitlines()[-1][:500] if message.strip() else f"{backend.title} reported an error"
        if len(jobs) == 1:
            blog.warning("remote error isolated to one job", job=jobs[0].id, error=short)
            worker.handle_failure(bundle_id, [jobs[0].id], f"{backend.title}: {short}", bundle_error=short)
            return
        blog.warning("remote error for the bundle: splitting it to find the job at fault", error=short)
        worker.service.queue.close_bundle(bundle_id, f"split after {backend.title} error: {short}")
        half = len(jobs) // 2
        for part in (jobs[:half], jobs[half:]):
            worker.run_bundle(backend.name, jobs[0].model, part)
