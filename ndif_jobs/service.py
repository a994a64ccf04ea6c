"""The application layer: submit, look up, cancel, retry and read results.

The CLI and the Python API are thin shells over `Service`: they reach the queue and the store
through its methods alone, and get jobs as `domain.Job`s. It owns the settings, the queue
database and the result store, and opens each only when first needed (so `status` never
touches the result store and `results` never migrates twice).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .db.engine import open_database
from .db.queue import Enqueued, NewJob, Queue
from .domain import Job
from .errors import BadInput, OfflineMiss, ResultMissing, StoreError
from .states import BundleState, JobState

if TYPE_CHECKING:
    from .db.queue import AttemptRow, BundleRow
    from .model_refs import ModelRef
    from .settings import Settings
    from .store import StoreBackend
    from .store.backend import StoreQueue
    from .store.safetensors_io import Arrays


@dataclass
class Submission:
    """One experiment to submit, before validation."""

    experiment: str
    params: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    backend: str | None = None
    priority: int = 0
    tags: Sequence[str] = ()
    force: bool = False


@dataclass(frozen=True)
class JobPage:
    """One page of a job listing: the jobs shown, and how many matched in all."""

    jobs: list[Job]
    total: int
    offset: int = 0

    @property
    def left_out(self) -> int:
        """Matching jobs not on this page (before or after it)."""
        return self.total - len(self.jobs)


@dataclass(frozen=True)
class StatusReport:
    """What `status` shows: counts per state, what waits on what, and the latest jobs."""

    counts: dict[str, int]
    latest: list[Job]
    store_bytes: int
    lease_expired: dict[str, int]
    retry_waiting: int
    next_retry_at: float | None
    waiting_for_worker: dict[str, int]
    held_by_gone_workers: list[dict[str, Any]]
    at_ndif: list[dict[str, Any]]
    #: Queued jobs waiting for NDIF to run their model: {model, jobs, reason} per model.
    waiting_for_model: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """A validated submission with its cache key, ready to be queued."""

    new_job: NewJob
    ref: ModelRef


class Service:
    def __init__(self, settings: Settings | None = None, *, wait_for_database: bool = False) -> None:
        """`wait_for_database`: opening the queue database rides out an outage of up to
        `db_retry_s` (the worker), instead of failing at once (commands a person types)."""
        if settings is None:
            from .settings import get_settings

            settings = get_settings()
        self.settings = settings
        self.wait_for_database = wait_for_database
        self._recorded_in_store = False
        if self.settings.import_modules:
            from . import experiments

            experiments.import_user_modules(self.settings.import_modules)

    @cached_property
    def queue(self) -> Queue:
        from .read_settings import ensure_private_dir

        if self.settings.database_url is None:
            ensure_private_dir(self.settings.home)
        retry_s = self.settings.db_retry_s if self.wait_for_database else 0.0
        return Queue(open_database(self.settings.db_url, retry_s=retry_s), db_retry_s=self.settings.db_retry_s,
                     result_exists=lambda key: self.store.exists(key))

    @cached_property
    def store(self) -> StoreBackend:
        """The data folder's store, or an object store every machine of a shared queue reads
        (`NDIF_JOBS_STORE_URL`), behind one interface."""
        from .store.config import open_store

        return open_store(self.settings)

    def record_queue_in_store(self, best_effort: bool = False) -> None:
        """Name this queue in the result store (once per process) before it stores a result
        there or is served one: `gc` against another queue on the same store then knows that
        not every result there is its own to judge. `best_effort`: a store that cannot be
        reached or written is a warning, not an error (the queue's own errors still raise)."""
        if self._recorded_in_store:
            return
        import socket

        from .store.backend import StoreQueue

        queue = StoreQueue.new(self.queue_id, f"{self.queue.db.display_url()} on {socket.gethostname()}")
        try:
            self.store.record_queue(queue)
        except StoreError as exc:
            if not best_effort:
                raise
            from .logging import get_logger

            get_logger(__name__).warning("this queue could not be named in the result store", error=str(exc))
            return
        self._recorded_in_store = True

    @cached_property
    def queue_id(self) -> str:
        """This queue's id (`Queue.identity`): it never changes, so it is read once."""
        return self.queue.identity()

    def other_queues_in_store(self) -> list[StoreQueue]:
        """The queues besides this one that keep results in its store."""
        return [q for q in self.store.queues() if q.id != self.queue_id]

    # -- submitting --------------------------------------------------------------------

    def enqueue(self, new_jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Queue jobs (`Queue.enqueue`), this queue named in the store first: a job may be
        served a result stored there at once. A store that cannot be reached does not stop a
        submission (the worker names the queue before it stores anything)."""
        self.record_queue_in_store(best_effort=True)
        return self.queue.enqueue(new_jobs)

    def prepare(self, sub: Submission) -> Prepared:
        """Validate one submission completely (no database write). Raises `BadInput`."""
        from .model_refs import resolve_model

        return self._prepare(sub, resolve_model)

    def _prepare(self, sub: Submission, resolve_model: Any) -> Prepared:
        from . import experiments, preflight
        from .backends import REGISTRY
        from .keys import computation_keys

        exp = experiments.get(sub.experiment)
        if not isinstance(sub.params, Mapping):
            raise BadInput("params must be a JSON object of name: value")
        params = exp.validate(dict(sub.params))
        backend = sub.backend or self.settings.default_backend
        if backend not in REGISTRY:
            raise BadInput(f"unknown backend {backend!r} (choose from: {', '.join(REGISTRY)})")
        spec = sub.model or self.settings.default_model
        if backend == "local":
            # Trying an NDIF queue locally first: a remote model runs as its local stand-in.
            spec = self.settings.local_standins.get(spec, spec)
        ref = resolve_model(spec)
        if backend == "ndif" and ref.kind != "hub":
            raise BadInput(f"model {ref.spec!r} is not on NDIF: the ndif backend takes a Hugging Face repo id")
        if not -1_000_000 <= sub.priority <= 1_000_000:
            raise BadInput("priority must be between -1000000 and 1000000")
        params, estimated = preflight.check(exp, params, ref, self.settings.models_dir,
                                            fetch=backend == "ndif" and spec not in self.settings.local_standins,
                                            offline=self.settings.offline)
        key, older_keys = computation_keys(ref, exp.name, exp.source_hash, params)
        job = NewJob(
            key=key,
            experiment=exp.name,
            model=ref.spec,
            model_key=ref.model_key,
            backend=backend,
            params=params,
            priority=sub.priority,
            tags=list(sub.tags),
            max_attempts=self.settings.max_attempts,
            estimated_bytes=estimated,
            force=sub.force,
            aliases=older_keys,
        )
        return Prepared(new_job=job, ref=ref)

    def submit_many(self, subs: Sequence[Submission]) -> list[Enqueued]:
        """Validate every submission first, then queue them all in one transaction."""
        from .model_refs import resolve_model

        # Each model is resolved once per call: resolving reads package metadata (about 0.3 ms).
        resolve = functools.lru_cache(maxsize=None)(resolve_model)
        prepared = [self._prepare(s, resolve) for s in subs]
        for p in prepared:
            self.require_buildable(p)
        return self.enqueue([p.new_job for p in prepared])

    def require_buildable(self, prepared: Prepared) -> None:
        """Refuse an NDIF job whose worker could not build the request (`preflight.require_buildable`).
        Exempt: one whose result is stored already (served from the store), and one whose model
        has a local stand-in (a local worker runs it: the queue is being tried out first)."""
        job = prepared.new_job
        if job.backend != "ndif" or prepared.ref.spec in self.settings.local_standins:
            return
        if job.force or self.queue.done_by_key(job.key) is None:
            from .preflight import require_buildable

            require_buildable(prepared.ref, job.backend, self.settings.offline)

    def submit(self, sub: Submission) -> Enqueued:
        return self.submit_many([sub])[0]

    def queue_prepared(self, prepared: Prepared) -> Enqueued:
        """Queue one submission that `lookup` prepared (refused as `submit_many` would refuse it)."""
        self.require_buildable(prepared)
        return self.enqueue([prepared.new_job])[0]

    # -- reading -----------------------------------------------------------------------

    def job(self, ref: str) -> Job:
        """A job by id, unique id prefix, or cache key. Raises `JobNotFound`."""
        return Job.from_row(self.queue.get(ref))

    def list_jobs(
        self,
        *,
        state: str | None = None,
        tag: str | None = None,
        experiment: str | None = None,
        sweep: str | None = None,
        limit: int | None = 50,
        offset: int = 0,
    ) -> JobPage:
        """Jobs matching every filter given, newest first: `limit` of them (None: all) after
        skipping `offset`, with how many matched in all."""
        if state is not None and state not in tuple(JobState):
            raise BadInput(f"unknown state {state!r} (choose from: {', '.join(JobState)})")
        if limit is not None and limit < 0 or offset < 0:
            raise BadInput("limit and offset cannot be negative")
        rows = self.queue.list_jobs(state=state, tag=tag, experiment=experiment, sweep=sweep,
                                    limit=None if limit is None else limit + 1, offset=offset)
        page = [Job.from_row(r) for r in rows[:limit]]
        # No row past the page, and the page not past the end: every matching one is counted here.
        if (limit is None or len(rows) <= limit) and (rows or not offset):
            total = offset + len(rows)
        else:
            total = self._count(state, tag, experiment, sweep)
        return JobPage(jobs=page, total=total, offset=offset)

    def _count(self, state: str | None, tag: str | None, experiment: str | None, sweep: str | None) -> int:
        """How many jobs match, counted by the database."""
        return self.queue.count_jobs(state=state, tag=tag, experiment=experiment, sweep=sweep)

    def done_job_ids(self, *, tag: str | None = None, sweep: str | None = None) -> list[str]:
        """The ids of the jobs with stored results, oldest first, one per cache key (the same
        computation submitted again is served `cached` under the same key: counted once)."""
        seen: dict[str, str] = {}
        for row in self.queue.list_jobs(tag=tag, sweep=sweep, limit=None, newest_first=False):
            if row.state in (JobState.COMPLETED, JobState.CACHED) and row.result_key is not None:
                seen.setdefault(row.key, row.id)
        return list(seen.values())

    def attempts(self, job_id: str) -> list[AttemptRow]:
        return self.queue.attempts_of(job_id)

    def bundle(self, bundle_id: str) -> BundleRow | None:
        return self.queue.bundle(bundle_id)

    def result_location(self, job: Job) -> str | None:
        """Where a job's result lies: its folder, or its s3:// address ("(cached here)" when this
        machine holds a copy). Never touches the network."""
        if job.result_key is None:
            return None
        from .store.config import where

        return where(self.store, job.result_key)

    def queued_count(self, sweep: str | None = None) -> int:
        return self.queue.counts(sweep=sweep)[JobState.QUEUED]

    def status(self, sweep: str | None = None, latest: int = 10) -> StatusReport:
        """Counts per state (of one sweep, given its name), what waits and why, the latest jobs."""
        queue = self.queue
        counts = queue.counts(sweep=sweep)
        retrying, next_retry = queue.retry_waiting()
        return StatusReport(
            counts=counts,
            latest=self.list_jobs(sweep=sweep, limit=latest).jobs,
            store_bytes=queue.stored_bytes(),
            lease_expired=queue.lease_expired_counts(),
            retry_waiting=retrying,
            next_retry_at=next_retry,
            waiting_for_worker=queue.needs_worker_counts(),
            held_by_gone_workers=self.held_by_gone_workers(),
            at_ndif=self.queue_remote_waiting(),
            waiting_for_model=self.waiting_for_model(),
        )

    def waiting_for_model(self) -> list[dict[str, Any]]:
        """Queued jobs that the worker holds back while NDIF does not run their model, per model."""
        from .db.remote import RemoteBundles
        from .states import MODEL_WAIT_PREFIX

        waits = RemoteBundles(self.queue.engine, db_retry_s=self.queue.db_retry_s).model_waits(MODEL_WAIT_PREFIX)
        return [{"model": model, "jobs": n, "reason": reason} for model, n, reason in waits]

    def time_lost(self, attempts: Sequence[Any]) -> float | None:
        """Seconds between NDIF finishing a request and its jobs being sent again because the
        result link had expired, summed over the job's attempts (None: no result was lost so)."""
        lost = None
        for bundle_id in {a.bundle_id for a in attempts if a.bundle_id}:
            row = self.queue.bundle(bundle_id)
            for entry in json.loads(row.status_history or "[]") if row is not None else []:
                if entry.get("status") == "EXPIRED":
                    lost = (lost or 0.0) + float(entry.get("lost_s") or 0.0)
        return lost

    def held_by_gone_workers(self) -> list[dict[str, Any]]:
        """Workers of this host that hold jobs though their process is gone (killed, crashed)."""
        from . import owners

        return [{"worker": owner, "where": owners.describe(owner), "jobs": held}
                for owner, held, _until in self.queue.holders() if owners.is_gone(owner)]

    def queue_remote_waiting(self) -> list[dict[str, Any]]:
        """Bundles waiting at NDIF with their latest status (DEPLOYING, QUEUED, RUNNING, ...)."""
        out = []
        for row in self.queue.bundles_in_state(BundleState.SUBMITTED):
            history = json.loads(row.status_history or "[]") or [{}]
            last = history[-1]
            out.append({"id": row.id, "jobs": row.job_count, "remote_job_id": row.remote_job_id,
                        "status": last.get("status", "SUBMITTED"), "description": last.get("description", "")})
        return out

    # -- changing jobs -------------------------------------------------------------------

    def cancel(self, refs: Sequence[str]) -> dict[str, str]:
        """Cancel the jobs named (ids, prefixes or keys) that have not finished: each id with its state."""
        return self.queue.cancel([self.queue.get(ref).id for ref in refs])

    def retry(self, refs: Sequence[str]) -> dict[str, str]:
        """Queue the jobs named again (finished, failed or cancelled): each id with its state."""
        return self.queue.retry([self.queue.get(ref).id for ref in refs])

    def load_result(self, ref: str, verify: bool = False, arrays: Arrays = "torch") -> Result:
        """The job's stored result, its tensors as torch tensors or (`arrays="numpy"`, for a
        reader that only prints them, without importing torch) numpy arrays."""
        job = self.job(ref)
        if job.result_key is None:
            why = f" ({job.error})" if job.error else ""
            raise ResultMissing(f"job {job.id} has no result: it is {job.state}{why}")
        stored = self.store.get(job.result_key, verify=verify, arrays=arrays)
        return Result(job=job.to_dict(), stored=stored)

    def lookup(self, sub: Submission) -> tuple[Prepared, Any | None]:
        """The prepared submission and the done job that already holds its result, if any."""
        prepared = self.prepare(sub)
        for key in (prepared.new_job.key, *prepared.new_job.aliases):  # older key forms too
            done = self.queue.done_by_key(key)
            if done is not None and done.result_key is not None and self.store.exists(done.result_key):
                return prepared, done
        # A result gone from disk is not served: queueing the job again detaches that job.
        return prepared, None

    def offline_miss(self, prepared: Prepared) -> OfflineMiss:
        job = prepared.new_job
        args = " ".join(f"-p {_shell(f'{k}={v if isinstance(v, str) else json.dumps(v)}')}"
                        for k, v in job.params.items() if v is not None)
        from .experiments import get

        own = not get(job.experiment).builtin
        imports = "".join(f"--import {_shell(m)} " for m in self.settings.import_modules) if own else ""
        return OfflineMiss(
            f"offline and not in the store: {job.experiment} on {job.model} with "
            f"{json.dumps(job.params, sort_keys=True)}; "
            f"queue it with: ndif-jobs {imports}submit {job.experiment} --model {_shell(job.model)} "
            f"--backend {job.backend} {args}".rstrip()
        )


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(text)


class Result(Mapping[str, Any]):
    """A stored result: the experiment's values (a read-only mapping), tensors, manifest, job.

    Tensors are memory-mapped from the result file: reading them costs no copy.
    """

    def __init__(self, job: dict[str, Any], stored: Any) -> None:
        self.job = job
        self.manifest = stored.manifest
        self.tensors = stored.tensors
        self.path = stored.path
        self._values = stored.values

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"<Result {self.job['experiment']} job={self.job['id']} keys={list(self._values)}>"

    def _repr_html_(self) -> str:
        """In Jupyter: the one-glance summary, the figure and the names with their shapes."""
        from .web.notebook import result_html

        return result_html(self)
