"""The worker loop: claim -> bundle -> send/wait -> store -> finish, until told to stop.

Each loop claims up to `max_bundle` jobs this worker can run (one transaction, with a lease;
jobs of experiments it has not loaded, or jobs of a backend it runs only through stand-ins
whose model has none, stay queued for a worker that can), groups them by (backend, model), and
hands each group to its backend as one bundle. While a bundle runs, a heartbeat renews the
leases so no other worker takes the jobs. If this process dies, a worker on the same host sees
its process is gone and takes the jobs back at once, no attempt spent (`owners.py`); a worker
elsewhere waits for the leases to run out, and says so.

A bundle's steps (`run_bundle`): start it, settle its jobs' keys, load the model, send, commit
a remote job id (`remote.py`), wait, then store. Its outcomes go through three handlers:
`handle_success` stores each result (atomically, keyed by cache key) before its job is marked
completed, so a completed job always has its result, and fails a job whose experiment raised,
with no retry (it would fail again the same way); `handle_failure` fails a bundle's jobs for
good (the backend refused it); `handle_retry` sends a bundle that failed as a whole back to the
queue with exponential backoff until its jobs' attempts run out.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import crashpoints, experiments, owners
from ..backends import Backend, Handle, JobOutcome, JobSpec, backend_class, get_backend
from ..db.queue import Outcomes, Runnable
from ..domain import Job
from ..errors import BundleTimeout, NdifJobsError, Rejected, RemoteJobError, Transient, Unavailable, clip_error
from ..logging import ensure_logging, get_logger, register_secret, scrub
from ..model_refs import ModelRef, resolve_model
from ..notify import LoopNotices
from ..runner.registry import WorkerRecord
from ..service import Service
from .heartbeat import Heartbeat
from .remote import RemoteExecution, ResultExpired

log = get_logger("ndif_jobs.worker")

#: Every how many polls a worker looks again for queued jobs it cannot run (to say so, once).
UNRUNNABLE_CHECK_POLLS = 5

#: The notes a re-keyed job's history gets (`show` lists them with its attempts).
SOURCE_CHANGED_NOTE = (
    "key {old} -> {new}: the experiment's source (or the model, or nnsight) changed after submit, and the"
    " result is filed under the code that ran; to run the submitted version, restore it and submit again"
)
KEY_FORM_NOTE = "key {old} -> {new}: the model is keyed by what it is, not where it lies"


def worker_id() -> str:
    """`HOST:PID:START:RANDOM`: enough for a worker on the same host to tell this one is gone."""
    return owners.new_worker_id()


@dataclass
class WorkerStats:
    bundles: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    started_at: float = field(default_factory=time.time)


def _one_per_key(jobs: list[Any]) -> list[Any]:
    """The job that runs for each key: the one with the smallest id (on every worker, so that one
    re-attaching to a remote request knows which job's answer stands for the others)."""
    first: dict[str, Any] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        first.setdefault(job.key, job)
    return list(first.values())


def _specs(jobs: list[Any], outcomes: dict[str, JobOutcome]) -> list[JobSpec]:
    """One spec per key; a job whose experiment this worker does not know gets that error."""
    specs = []
    for job in _one_per_key(jobs):
        try:
            experiments.get(job.experiment)
            specs.append(JobSpec(job.id, job.experiment, job.params))
        except NdifJobsError as exc:
            outcomes[job.id] = JobOutcome(error=str(exc))
    return specs


def _share_outcomes(jobs: list[Any], outcomes: dict[str, JobOutcome]) -> dict[str, JobOutcome]:
    """Each job's outcome is that of the computation of its key: a success if any job of the key
    has one (a remote backend answers only for the job that ran), or else the error of the one that ran."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for job in sorted(jobs, key=lambda j: j.id):
        groups[job.key].append(job)
    shared: dict[str, JobOutcome] = {}
    for group in groups.values():
        found = [outcomes[j.id] for j in group if j.id in outcomes]
        if found:
            source = next((o for o in found if o.ok), found[0])
            shared.update((j.id, source) for j in group)
    return shared


class Worker:
    def __init__(
        self,
        service: Service,
        backend: str | None = None,
        max_bundle: int | None = None,
        on_progress: Callable[[WorkerStats], None] | None = None,
    ) -> None:
        self.service = service
        self.settings = service.settings
        ensure_logging(self.settings.log_level, self.settings.log_format)
        if self.settings.ndif_api_key is not None:
            register_secret(self.settings.ndif_api_key.get_secret_value())
        self.backend_filter = backend
        kind = backend_class(backend) if backend is not None else None
        #: The backend whose jobs this worker runs through local stand-ins (None: no stand-ins).
        self.standin_for = kind.standin_for if kind is not None else None
        #: Whether this worker waits on bundles sent by workers that died (any backend that can).
        self.reattaches = kind.reattaches if kind is not None else True
        #: What this worker claims, chosen in the claim's SQL: `--backend local` takes local jobs
        #: and the NDIF jobs whose model has a stand-in (NDIF_JOBS_LOCAL_STANDINS); `--backend
        #: ndif` only NDIF jobs; no flag, each job on its own backend. Only loaded experiments.
        self.runnable = Runnable(
            backend=backend,
            standins=tuple(sorted(self.settings.local_standins)) if self.standin_for else (),
            experiments=tuple(e.name for e in experiments.all_experiments()),
        )
        self.max_bundle = max_bundle or self.settings.max_bundle
        self.id = worker_id()
        #: What this worker has said it leaves (experiments, models) or waits on (workers): once each.
        self._said: set[tuple[str, str]] = set()
        self._next_unrunnable_check = 0.0
        self.stats = WorkerStats()
        self.on_progress = on_progress
        self._stopping = threading.Event()
        self._backends: dict[str, Backend] = {}
        self.remote = RemoteExecution(self)

    # -- signals -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: finish the bundle in hand, then exit. Second: exit now."""

        def handle(signum: int, _frame: Any) -> None:
            if self._stopping.is_set():
                log.warning("second signal: releasing held jobs and exiting now")
                # Release from a thread with a bound: the main thread may hold the database's
                # write lock right now. Whatever is not released comes back when its lease ends.
                releaser = threading.Thread(target=self._release_quietly, daemon=True)
                releaser.start()
                releaser.join(2.0)
                os._exit(130)
            log.info("stopping after the current bundle", signal=signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

    def _release_quietly(self) -> None:
        try:
            self.service.queue.release(self.id)
            self.remote.bundles.hand_back(self.id)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def stop(self) -> None:
        self._stopping.set()

    # -- the loop ------------------------------------------------------------------------

    def run(self, until_empty: bool = False) -> WorkerStats:
        log.info("worker started", worker=self.id, backend=self.backend_filter or "any", max_bundle=self.max_bundle)
        # Service hooks: the `workers` table row (`ndif-jobs workers`), and notifications (None
        # without NDIF_JOBS_NOTIFY).
        record = WorkerRecord.start(self)
        notices = LoopNotices.for_worker(self)
        error: BaseException | None = None
        try:
            while not self._stopping.is_set():
                self._look_around()
                jobs = self._claim()
                if notices is not None:
                    notices.tick(claimed=len(jobs))
                if not jobs:
                    if until_empty and self._drained():
                        break
                    self._report_lease_waits()
                    self._stopping.wait(self.settings.poll_s)
                    continue
                for backend, model, bundle in self._bundles(jobs):
                    if self._stopping.is_set():
                        break  # what is left of the claim is released below, untouched
                    self.run_bundle(backend, model, bundle)
        except Exception as exc:
            error = exc
            raise
        finally:
            self._give_back()
            record.close()
            if notices is not None:
                notices.close(error)
        log.info("worker finished", worker=self.id, bundles=self.stats.bundles, completed=self.stats.completed,
                 failed=self.stats.failed, retried=self.stats.retried)
        return self.stats

    def _look_around(self) -> None:
        """Before each claim: jobs of dead workers back, remote bundles of dead workers waited
        on, and what this worker leaves to others said."""
        self._take_back_from_gone_workers()
        if self.reattaches:
            self.remote.reattach()
        self._report_unrunnable()

    def _claim(self) -> list[Any]:
        jobs = self.service.queue.claim(self.id, self.max_bundle, self.settings.lease_s, runnable=self.runnable)
        if not jobs:
            return []
        crashpoints.reached("claimed")
        if self.standin_for is not None:
            jobs = [self._to_standin(job) for job in jobs]
        return jobs

    def _drained(self) -> bool:
        """Nothing left this worker may run. Jobs another worker holds count: if it dies, they
        come back here. Jobs this worker cannot run do not: they wait for a worker that can."""
        return self.service.queue.waiting_count(runnable=self.runnable) == 0

    def _bundles(self, jobs: list[Any]) -> Iterator[tuple[str, str, list[Any]]]:
        """(backend, model, jobs) of each bundle: the claim grouped by backend and model, packed."""
        groups: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
        for job in jobs:
            groups[(job.backend, job.model, job.model_key)].append(job)
        for (backend, model, _model_key), group in groups.items():
            for bundle in self._pack(group):
                yield backend, model, bundle

    def _give_back(self) -> None:
        """On the way out: unstarted jobs back to the queue, remote bundles to the next worker.

        Each step on its own: if the database is gone (the reason we may be leaving), what is
        not given back here comes back when its lease runs out."""
        try:
            released = self.service.queue.release(self.id)
            if released:
                log.info("released unstarted jobs", count=released)
        except Exception as exc:  # noqa: BLE001 - must not hide the error we are leaving with
            log.warning("could not release held jobs; they return when their leases run out", error=str(exc))
        try:
            handed = self.remote.bundles.hand_back(self.id)
            if handed:
                log.info("left jobs at their remote backend for the next worker to re-attach", count=handed)
        except Exception as exc:  # noqa: BLE001 - handing back is best effort: the leases bring the jobs back anyway
            log.warning("could not hand back jobs at a remote backend; they are re-attached when their leases run out",
                        error=str(exc))

    def _pack(self, jobs: list[Any]) -> list[list[Any]]:
        """Split a model's jobs so no bundle asks for more than `max_result_bytes` back. Jobs of
        one key stay together and count once: their computation runs once (`_one_per_key`)."""
        limit = self.settings.max_result_bytes
        by_key: dict[str, list[Any]] = {}
        for job in jobs:
            by_key.setdefault(job.key, []).append(job)
        bundles: list[list[Any]] = [[]]
        size = 0
        for group in by_key.values():
            estimate = group[0].estimated_bytes or 0
            if bundles[-1] and size + estimate > limit:
                bundles.append([])
                size = 0
            bundles[-1].extend(group)
            size += estimate
        return bundles

    def _to_standin(self, job: Any) -> Any:
        """A job of the stand-in backend re-bound to run here: its stand-in model, its own cache
        key. The claim gives this worker such a job only when its model has a stand-in."""
        job = Job.of(job)
        if job.backend != self.standin_for:
            return job
        spec = job.standin(self.settings.local_standins)
        assert spec is not None  # the claim's SQL took only jobs whose model has one
        ref = resolve_model(spec)
        key, _older = job.computation_keys(ref)
        self.remote.bundles.rebind(job.id, backend=self.backend_filter or job.backend, model=ref.spec,
                                   model_key=ref.model_key, key=key)
        log.info(f"running an {backend_class(job.backend).title} job locally", job=job.id, model=job.model,
                 standin=ref.spec)
        return Job.from_row(self.service.queue.get(job.id))

    # -- what this worker leaves to others, and what it waits for ---------------------------

    def _take_back_from_gone_workers(self) -> None:
        """Jobs held by a worker of this host whose process is gone come back now, not when its
        lease runs out, and with no attempt spent: the job did not stop that worker."""
        queue = self.service.queue
        for owner, _held, _until in queue.holders():
            if owner == self.id or not owners.is_gone(owner):
                continue
            where = owners.describe(owner)
            counts = queue.take_back(owner, f"its worker ({where}) is gone: taken back by {self.id}, no attempt spent")
            log.warning("took back the jobs of a worker that is gone", worker=owner, where=where,
                        requeued=counts["requeued"], at_ndif_reattached=counts["at_ndif"], attempt_spent=False)

    def _report_unrunnable(self) -> None:
        """Say once which queued jobs this worker leaves and why, and note on the jobs of an
        experiment it has not loaded that they wait for a worker that can run it (`status`)."""
        if time.monotonic() < self._next_unrunnable_check:
            return
        self._next_unrunnable_check = time.monotonic() + UNRUNNABLE_CHECK_POLLS * self.settings.poll_s
        queue = self.service.queue
        unknown: dict[str, int] = defaultdict(int)
        no_standin: dict[str, int] = defaultdict(int)
        to_note: set[tuple[str, str]] = set()
        for experiment, backend, model, n, noted in queue.unrunnable(self.runnable):
            if not self.runnable.takes_backend(backend, model):
                if backend == self.standin_for:
                    no_standin[model] += n
                continue  # another backend's job: not this worker's to run
            unknown[experiment] += n
            if noted < n:
                to_note.add((experiment, backend))
        for experiment, backend in sorted(to_note):
            queue.note_unrunnable(experiment, backend, f"experiment {experiment!r}: {self._why_unknown()}")
        for experiment, n in unknown.items():
            if self._say_once("experiment", experiment):
                log.warning("leaving jobs of an experiment this worker has not loaded: they stay queued for a worker"
                            " that can run them", experiment=experiment, jobs=n, why=self._why_unknown())
        for model, n in no_standin.items():
            if self._say_once("model", model):
                title = backend_class(str(self.standin_for)).title
                log.info(f"leaving {title} jobs to an {title} worker: their model has no local stand-in", model=model,
                         jobs=n, hint=f"NDIF_JOBS_LOCAL_STANDINS maps an {title} model to one that runs here")

    def _why_unknown(self) -> str:
        modules = self.settings.import_modules
        if not modules:
            return ("this worker imports no experiment modules: start one with --import MODULE or"
                    " NDIF_JOBS_IMPORTS=MODULE naming the module that defines it")
        return (f"the modules this worker imports ({', '.join(modules)}) do not define it: start a worker with"
                " --import or NDIF_JOBS_IMPORTS naming the module that does")

    def _report_lease_waits(self) -> None:
        """With nothing to claim, say once per worker whose jobs this one waits on: what, and until when."""
        t = time.time()
        for owner, held, until in self.service.queue.holders(self.runnable):
            if owner == self.id or until <= t or not self._say_once("worker", owner):
                continue
            log.info("waiting for jobs another worker holds: they come back when its lease runs out, unless it"
                     " renews it (it does while it runs)", worker=owner, where=owners.describe(owner), jobs=held,
                     lease_until=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)),
                     in_s=round(until - t, 1))

    def _say_once(self, kind: str, what: str) -> bool:
        if (kind, what) in self._said:
            return False
        self._said.add((kind, what))
        return True

    def backend(self, name: str) -> Backend:
        """The backend `name`, made once per worker."""
        if name not in self._backends:
            self._backends[name] = get_backend(name, self.settings)
        return self._backends[name]

    def retry_delay(self, attempts: int) -> float:
        """Exponential backoff with jitter: the delay before the `attempts`-th try again."""
        base = self.settings.retry_backoff_s * (2 ** max(attempts - 1, 0))
        return min(base, self.settings.retry_backoff_max_s) * random.uniform(0.5, 1.0)

    # -- one bundle, step by step -----------------------------------------------------------

    def run_bundle(self, name: str, model: str, jobs: list[Any]) -> None:
        """Start the bundle, send it, commit a remote job id, wait, store."""
        jobs = [Job.of(j) for j in jobs]
        if self.remote.deferring(name, jobs):
            return
        bundle_id = self.service.queue.start_bundle(self.id, name, jobs[0].model_key, [j.id for j in jobs])
        crashpoints.reached("running")
        blog = log.bind(bundle=bundle_id, model=model, jobs=len(jobs), backend=name)
        blog.info("bundle started")
        started = time.time()
        backend = self.backend(name)
        outcomes: dict[str, JobOutcome] = {}
        sent = self._send(backend, bundle_id, model, jobs, outcomes, blog)
        if sent is None:
            return
        jobs, handle = sent
        if handle is not None and handle.remote_id is not None:
            blog = self.remote.commit(backend, bundle_id, handle, jobs, blog)
        self.wait_and_store(backend, bundle_id, handle, jobs, outcomes, blog, started)

    def _send(
        self, backend: Backend, bundle_id: str, model: str, jobs: list[Any], outcomes: dict[str, JobOutcome],
        blog: Any,
    ) -> tuple[list[Any], Handle | None] | None:
        """Settle the bundle's keys, load the model, send. Returns the jobs as they now stand and
        the handle (None when no job could be sent: `outcomes` holds why), or None when the
        bundle ended here (refused, deferred, or to be retried)."""
        job_ids = [j.id for j in jobs]
        try:
            with Heartbeat(self.service, self.id, job_ids) as beat:
                ref = resolve_model(model)
                jobs = self._settle_keys(ref, bundle_id, backend.name, jobs, beat, blog)
                job_ids = [j.id for j in jobs]
                specs = _specs(jobs, outcomes)
                if not specs:
                    return jobs, None
                backend.load(ref)  # loading is not the experiments' time: outside the limit
                return jobs, backend.send(ref, specs)
        except BundleTimeout as exc:
            blog.error("bundle ran past its time limit: failing its jobs and stopping", error=str(exc))
            self.handle_failure(bundle_id, job_ids, str(exc))
            raise
        except Rejected as exc:
            blog.error("the backend refused the bundle; fix this, then `ndif-jobs retry` the jobs", error=str(exc))
            self.handle_failure(bundle_id, job_ids, str(exc))
        except Unavailable as exc:
            self.remote.trip(backend, job_ids, bundle_id, str(exc), blog)
        except Exception as exc:  # noqa: BLE001 - the bundle as a whole failed: retry it later
            self.handle_retry(jobs, bundle_id, f"{type(exc).__name__}: {exc}", blog,
                              exc_info=not isinstance(exc, NdifJobsError))
        return None

    def wait_and_store(
        self, backend: Backend, bundle_id: str, handle: Handle | None, jobs: list[Any],
        outcomes: dict[str, JobOutcome], blog: Any, started: float | None,
    ) -> None:
        """Wait for a sent bundle (if any job was sent), then store what it gave."""
        jobs = [Job.of(j) for j in jobs]
        if handle is not None:
            waited = self._wait(backend, bundle_id, handle, jobs, blog)
            if waited is None:
                return
            outcomes.update(waited)
        made = self._provenance(backend, bundle_id, handle, jobs, outcomes, blog)
        self.handle_success(bundle_id, jobs, outcomes, blog, started or time.time(), made)

    def _provenance(
        self, backend: Backend, bundle_id: str, handle: Handle | None, jobs: list[Job],
        outcomes: dict[str, JobOutcome], blog: Any,
    ) -> dict[str, Any] | None:
        """What each result of the bundle records of how it was made (`provenance.py`), and the
        bytes downloaded on the bundle's row (`ndif-jobs usage`). Never a reason to lose a result."""
        if handle is None or not any(o.ok for o in outcomes.values()):
            return None
        from .. import provenance

        try:
            if handle.downloaded_bytes is not None:
                self.remote.bundles.set_result_bytes(bundle_id, handle.downloaded_bytes)
            return provenance.for_bundle(backend, handle, self.service.queue.bundle(bundle_id), jobs[0].model,
                                         jobs[0].model_key)
        except Exception as exc:  # noqa: BLE001 - the results are stored without it
            blog.warning("could not record how the results were made", error=f"{type(exc).__name__}: {exc}")
            return None

    def _wait(
        self, backend: Backend, bundle_id: str, handle: Handle, jobs: list[Any], blog: Any
    ) -> dict[str, JobOutcome] | None:
        """The bundle's outcomes, or None when it ended otherwise (failed, split, retried,
        abandoned, or left at the backend for the next worker)."""
        job_ids = [j.id for j in jobs]
        remote = handle.remote_id is not None
        on_status = self.remote.status_recorder(backend, bundle_id, blog) if remote else None
        try:
            with Heartbeat(self.service, self.id, job_ids):
                outcomes = backend.wait(handle, self._stopping, on_status)
        except ResultExpired as exc:
            self.remote.resend_expired(backend, bundle_id, handle, jobs, exc, blog)
            return None
        except Rejected as exc:
            blog.error("the backend cannot run this bundle; fix this, then `ndif-jobs retry` the jobs", error=str(exc))
            self.handle_failure(bundle_id, job_ids, str(exc))
            self.remote.refused(backend, jobs, exc, blog)
            return None
        except RemoteJobError as exc:
            self.remote.split(backend, bundle_id, jobs, str(exc), blog)
            return None
        except Transient as exc:
            if self._stopping.is_set():
                # Leave the jobs `submitted` with their leases: the next worker re-attaches by id.
                blog.info("stopping: the bundle stays at the backend for the next worker to re-attach")
                return None
            self.handle_retry(jobs, bundle_id, str(exc), blog)
            return None
        if outcomes is None:
            self.remote.abandon(backend, bundle_id, handle, job_ids, blog)
            return None
        if remote:
            crashpoints.reached("downloaded")
        return outcomes

    def _settle_keys(
        self, ref: ModelRef, bundle_id: str, backend_name: str, jobs: list[Any], beat: Heartbeat, blog: Any
    ) -> list[Any]:
        """The bundle's jobs, each under the key of what runs now, with the queued jobs of the
        same keys joined in: each computation runs once, for all of them."""
        jobs = self._rekey(ref, jobs, blog)
        return jobs + self._join_same_keys(bundle_id, backend_name, jobs, beat, blog)

    def _rekey(self, ref: ModelRef, jobs: list[Any], blog: Any) -> list[Any]:
        """Jobs whose key no longer names what runs, moved to the key of what does.

        A job's key was computed at submit. If the experiment's source or the model's files
        changed since, what runs here is another computation: the job is re-keyed to it, and its
        history says so, so that a key always names the code and model that made its result.
        """
        from ..keys import computation_keys

        settled: list[Any] = []
        changes: list[tuple[str, str, str, str]] = []
        for job in jobs:
            try:
                exp = experiments.get(job.experiment)
            except NdifJobsError:
                settled.append(job)  # fails with this error when its spec is built
                continue
            key, older = computation_keys(ref, exp.name, exp.source_hash, job.params)
            if key != job.key:
                moved = job.key in older
                note = (KEY_FORM_NOTE if moved else SOURCE_CHANGED_NOTE).format(old=job.key[:12], new=key[:12])
                changes.append((job.id, key, ref.model_key, note))
                if not moved:
                    blog.warning("re-keyed: the experiment or the model changed since submit", job=job.id,
                                 submitted_key=job.key[:12], key=key[:12])
                job = job.replace(key=key, model_key=ref.model_key)
            settled.append(job)
        if changes:
            self.service.queue.rekey(self.id, changes)
        return settled

    def _join_same_keys(
        self, bundle_id: str, backend_name: str, jobs: list[Any], beat: Heartbeat, blog: Any
    ) -> list[Any]:
        """Queued jobs of the bundle's keys (several jobs retried together, a forced resubmit),
        taken into the bundle as a submit joins a queued job of its key."""
        held = {j.id for j in jobs}
        keys = sorted({j.key for j in jobs})
        now_held = self.service.queue.join_bundle(self.id, bundle_id, backend_name, keys, self.settings.lease_s)
        joined = [Job.from_row(j) for j in now_held if j.id not in held]
        if joined:
            beat.add([j.id for j in joined])
            blog.info("queued jobs of the same computations joined the bundle", joined=len(joined))
        return joined

    # -- outcomes ---------------------------------------------------------------------------

    def handle_success(
        self, bundle_id: str, jobs: list[Any], outcomes: dict[str, JobOutcome], blog: Any, started: float,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        """Store each result, then mark jobs completed, or failed with their experiment's error."""
        queue = self.service.queue
        outcomes = _share_outcomes(jobs, outcomes)
        completed, failed = self._store_results(jobs, outcomes, blog, provenance)
        # Experiment errors are the experiment's: no blind retry. Storage errors are ours: retry.
        experiment_errors = [(j, e) for j, e in failed if not outcomes[j].ok]
        store_errors = [(j, e) for j, e in failed if outcomes[j].ok]

        def record(tx: Outcomes) -> dict[str, int]:
            counts = {"completed": tx.complete(self.id, completed), "retried": 0, "failed": 0}
            counts["failed"] += tx.fail(self.id, experiment_errors)["failed"]
            more = tx.fail(self.id, store_errors, retry_in_s=self.retry_delay(1))
            counts["retried"] += more["retried"]
            counts["failed"] += more["failed"]
            tx.close_bundle(bundle_id)
            return counts

        counts = queue.in_transaction(record, name="finish bundle")
        crashpoints.reached("finished")
        self.count(counts)
        blog.info("bundle finished", seconds=round(time.time() - started, 3), **counts)

    def _store_results(
        self, jobs: list[Any], outcomes: dict[str, JobOutcome], blog: Any, provenance: dict[str, Any] | None = None
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
        """Each successful job's result, stored (once per key: one computation shared by several
        jobs is stored once). Returns (job, key, bytes) of the stored and (job, error) of the rest."""
        completed: list[tuple[str, str, int]] = []
        failed: list[tuple[str, str]] = []
        by_id = {j.id: j for j in jobs}
        stored: dict[str, int] = {}
        for job_id, outcome in outcomes.items():
            job = by_id[job_id]
            jlog = blog.bind(job=job_id, experiment=job.experiment)
            if not outcome.ok:
                jlog.warning("experiment failed", error=clip_error(scrub(outcome.error or "")))
                failed.append((job_id, scrub(outcome.error or "failed")))
                continue
            try:
                size = stored.get(job.key)
                if size is None:
                    info = {"experiment": job.experiment, "model": job.model, "params": job.params, "job": job_id}
                    if provenance is not None:
                        from ..provenance import FIELD, for_job

                        info[FIELD] = for_job(provenance, getattr(job, "created_at", None))
                    self.service.record_queue_in_store()
                    size = stored[job.key] = self.service.store.put(job.key, outcome.result or {}, info=info)
            except NdifJobsError as exc:
                jlog.error("storing the result failed", error=str(exc))
                failed.append((job_id, str(exc)))
                continue
            crashpoints.reached("stored")
            completed.append((job_id, job.key, size))
            jlog.info("job completed", result_bytes=size)
        return completed, failed

    def handle_failure(self, bundle_id: str, job_ids: list[str], error: str, bundle_error: str | None = None) -> None:
        """Fail a bundle's jobs for good (no retry can help) and close the bundle."""

        def record(tx: Outcomes) -> dict[str, int]:
            counts = tx.fail(self.id, [(j, error) for j in job_ids])
            tx.close_bundle(bundle_id, bundle_error or error)
            return counts

        self.count(self.service.queue.in_transaction(record, name="fail bundle"))

    def handle_retry(self, jobs: list[Any], bundle_id: str, message: str, blog: Any, exc_info: bool = False) -> None:
        """The bundle failed as a whole: its jobs back to the queue with backoff, an attempt spent."""
        message = scrub(message.splitlines()[0] if message else "failed")
        blog.error("bundle failed: its jobs will be retried", error=message, exc_info=exc_info)
        retry_in_s = self.retry_delay(max(j.attempts for j in jobs))

        def record(tx: Outcomes) -> dict[str, int]:
            counts = tx.fail(self.id, [(j.id, message) for j in jobs], retry_in_s=retry_in_s)
            tx.close_bundle(bundle_id, message)
            return counts

        self.count(self.service.queue.in_transaction(record, name="retry bundle"))

    def count(self, counts: dict[str, int]) -> None:
        self.stats.bundles += 1
        self.stats.completed += counts.get("completed", 0)
        self.stats.failed += counts.get("failed", 0)
        self.stats.retried += counts.get("retried", 0)
        if self.on_progress is not None:
            self.on_progress(self.stats)
