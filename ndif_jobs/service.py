"""The application layer: submit, look up, cancel, retry and read results.

The CLI and the Python API are thin shells over `Service`; it owns the settings, the queue
database and the result store, and opens each only when first needed (so `status` never
touches the result store and `results` never migrates twice).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .db.engine import open_database
from .db.queue import Enqueued, NewJob, Queue
from .errors import BadInput, OfflineMiss, ResultMissing
from .settings import Settings, ensure_private_dir, get_settings

if TYPE_CHECKING:
    from .models import ModelRef
    from .store import ResultStore


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
class Prepared:
    """A validated submission with its cache key, ready to be queued."""

    new_job: NewJob
    ref: ModelRef


class Service:
    def __init__(self, settings: Settings | None = None, *, wait_for_database: bool = False) -> None:
        """`wait_for_database`: opening the queue database rides out an outage of up to
        `db_retry_s` (the worker), instead of failing at once (commands a person types)."""
        self.settings = settings or get_settings()
        self.wait_for_database = wait_for_database
        if self.settings.import_modules:
            from . import experiments

            experiments.import_user_modules(self.settings.import_modules)

    @cached_property
    def queue(self) -> Queue:
        if self.settings.database_url is None:
            ensure_private_dir(self.settings.home)
        retry_s = self.settings.db_retry_s if self.wait_for_database else 0.0
        return Queue(open_database(self.settings.db_url, retry_s=retry_s), db_retry_s=self.settings.db_retry_s,
                     result_exists=lambda key: self.store.exists(key))

    @cached_property
    def store(self) -> ResultStore:
        from .store import ResultStore

        return ResultStore(ensure_private_dir(self.settings.results_dir))

    # -- submitting --------------------------------------------------------------------

    def prepare(self, sub: Submission) -> Prepared:
        """Validate one submission completely (no database write). Raises `BadInput`."""
        from .models import resolve_model

        return self._prepare(sub, resolve_model)

    def _prepare(self, sub: Submission, resolve_model: Any) -> Prepared:
        from . import experiments, preflight
        from .keys import computation_keys

        exp = experiments.get(sub.experiment)
        if not isinstance(sub.params, Mapping):
            raise BadInput("params must be a JSON object of name: value")
        params = exp.validate(dict(sub.params))
        backend = sub.backend or self.settings.default_backend
        if backend not in ("local", "ndif"):
            raise BadInput(f"unknown backend {backend!r} (choose from: local, ndif)")
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
        from .models import resolve_model

        # Each model is resolved once per call: resolving reads package metadata (about 0.3 ms).
        resolve = functools.lru_cache(maxsize=None)(resolve_model)
        prepared = [self._prepare(s, resolve) for s in subs]
        for p in prepared:
            self.require_buildable(p)
        return self.queue.enqueue([p.new_job for p in prepared])

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

    # -- reading -----------------------------------------------------------------------

    def queue_remote_waiting(self) -> list[dict[str, Any]]:
        """Bundles waiting at NDIF with their latest status (DEPLOYING, QUEUED, RUNNING, ...)."""
        out = []
        for row in self.queue.bundles_in_state("submitted"):
            history = json.loads(row.status_history or "[]") or [{}]
            last = history[-1]
            out.append({"id": row.id, "jobs": row.job_count, "remote_job_id": row.remote_job_id,
                        "status": last.get("status", "SUBMITTED"), "description": last.get("description", "")})
        return out

    def job(self, ref: str) -> Any:
        return self.queue.get(ref)

    def load_result(self, ref: str, verify: bool = False) -> Result:
        job = self.queue.get(ref)
        if job.result_key is None:
            why = f" ({job.error})" if job.error else ""
            raise ResultMissing(f"job {job.id} has no result: it is {job.state}{why}")
        stored = self.store.get(job.result_key, verify=verify)
        return Result(job=_job_dict(job), stored=stored)

    def lookup(self, sub: Submission) -> tuple[Prepared, Any | None]:
        """The prepared submission and the done job that already holds its result, if any."""
        prepared = self.prepare(sub)
        for key in (prepared.new_job.key, *prepared.new_job.aliases):  # older key forms too
            done = self.queue.done_by_key(key)
            if done is not None and self.store.exists(done.result_key):
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


def _job_dict(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data["params"] = json.loads(data["params"])
    data["tags"] = [t for t in data["tags"].strip(",").split(",") if t]
    return data


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

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"<Result {self.job['experiment']} job={self.job['id']} keys={list(self._values)}>"
