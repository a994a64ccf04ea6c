"""Planning and queueing a sweep: every row validated before any is queued, nothing queued twice.

`plan` reads the sweep file's rows and validates each exactly as `submit` does
(`Service._prepare`: params, model, pre-flight, cache key); the first bad row is a `BadInput`
naming the file, the row and the field, and nothing is written. It then compares the rows with
the jobs the sweep already holds: a row whose job is there under the same cache key is left
alone, so submitting the same file again queues nothing, and lines added to a dataset queue only
their rows. `submit` queues the rest in one transaction (`Queue.enqueue`).

A row's job is always the sweep's own: a row whose computation is queued elsewhere (another
sweep, a `submit`, a duplicate row) gets its own queued job rather than joining that one, so the
sweep's table holds every row; the worker still runs each key once for all its jobs.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..db.sweeps import RowJob, Sweeps, refused_message
from ..errors import BadInput
from ..preflight import PreflightWarning
from ..service import Prepared, Service, Submission
from .spec import Row, Sweep, expand, max_sweep_jobs

if TYPE_CHECKING:
    from pydantic import BaseModel


@dataclass
class Plan:
    """What submitting a sweep would do, row by row."""

    sweep: Sweep
    rows: list[Row]
    prepared: list[Prepared]
    #: Rows whose job the sweep holds already (same cache key): left as they are.
    present: list[int]
    #: Rows to queue whose result is stored already: they become `cached` jobs at once.
    stored: list[int]
    #: Rows to queue that will run.
    to_run: list[int]
    #: Requests the rows to run take, per model (jobs are bundled as the worker bundles them).
    requests: dict[str, int]
    #: The experiment's estimate of the result bytes of the rows to run (each key once).
    estimated_bytes: int
    warnings: list[str] = field(default_factory=list)
    #: Whether the sweep's name is recorded already (under this file, or `force` given).
    known: bool = False

    @property
    def new_rows(self) -> list[int]:
        return sorted(self.stored + self.to_run)


@dataclass(frozen=True)
class Submitted:
    queued: int
    cached: int
    present: int
    total: int


def plan(service: Service, sweep: Sweep, *, force: bool = False) -> Plan:
    """Validate every row and compare with what the sweep holds. Writes nothing."""
    sweeps = Sweeps(service.queue)
    record = sweeps.get(sweep.name)
    if record is not None and record.digest != sweep.digest and not force:
        raise BadInput(f"{sweep.where('name')}: {refused_message(sweep.name)}")
    from .. import experiments

    try:
        exp = experiments.get(sweep.experiment)
    except BadInput as exc:
        raise BadInput(f"{sweep.where('experiment')}: {exc}") from None
    rows = expand(sweep, limit=max_sweep_jobs(service.settings), typed=functools.partial(_typed, exp.params))
    resolve = _model_resolver(service, sweep)
    settings = service.settings
    backend = sweep.backend or settings.default_backend
    for model in sweep.models:  # a model that does not resolve is the file's fault, not a row's
        spec = model or settings.default_model
        resolve(settings.local_standins.get(spec, spec) if backend == "local" else spec)
    prepared: list[Prepared] = []
    notes: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PreflightWarning)
        for row in rows:
            sub = Submission(sweep.experiment, row.params, model=row.model, backend=sweep.backend,
                             priority=sweep.priority, tags=sweep.tags)
            try:
                p = service._prepare(sub, resolve)
            except BadInput as exc:
                raise BadInput(f"{sweep.path}: row {row.index} ({row.origin or 'the only row'}): {exc}") from None
            prepared.append(p)
    for w in caught:
        if issubclass(w.category, PreflightWarning):
            notes[str(w.message)] += 1
    existing = sweeps.rows(sweep.name)
    present, new = _split_present(prepared, existing)
    done = sweeps.done_keys(prepared[i].new_job.key for i in new)
    stored = [i for i in new if prepared[i].new_job.key in done]
    to_run = [i for i in new if prepared[i].new_job.key not in done]
    requests, size = _requests(service, [prepared[i] for i in to_run])
    shown = [f"{message} ({n} rows)" if n > 1 else message for message, n in notes.items()]
    return Plan(sweep, rows, prepared, present, stored, to_run, requests, size, shown, known=record is not None)


def submit(service: Service, planned: Plan, *, force: bool = False) -> Submitted:
    """Record the sweep and queue its new rows in one transaction."""
    sweep = planned.sweep
    jobs = []
    to_run = set(planned.to_run)
    for i in planned.new_rows:
        p = planned.prepared[i]
        # Not stored: the row's own queued job, even where its key is queued elsewhere.
        jobs.append(replace(p.new_job, sweep=sweep.name, sweep_row=planned.rows[i].index, force=i in to_run))
        service.require_buildable(p)
    Sweeps(service.queue).save(sweep.name, sweep.digest, sweep.source, sweep.as_json(), force=force)
    out = service.enqueue(jobs)
    cached = sum(1 for e in out if e.state == "cached")
    return Submitted(queued=len(out) - cached, cached=cached, present=len(planned.present), total=len(planned.rows))


def _split_present(prepared: list[Prepared], existing: dict[int, RowJob]) -> tuple[list[int], list[int]]:
    present, new = [], []
    for i, p in enumerate(prepared):
        held = existing.get(i)
        if held is not None and held.key in (p.new_job.key, *p.new_job.aliases):
            present.append(i)
        else:
            new.append(i)
    return present, new


def _model_resolver(service: Service, sweep: Sweep) -> Any:
    """`resolve_model`, once per model, with a model that does not resolve named at the file's
    `models` line."""
    from ..model_refs import resolve_model

    @functools.cache
    def resolve(spec: str) -> Any:
        try:
            return resolve_model(spec)
        except BadInput as exc:
            raise BadInput(f"{sweep.where('models') if 'models' in sweep.lines else sweep.where('model')}:"
                           f" {exc}") from None

    return resolve


def _typed(params: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """A CSV line's texts as `-p NAME=VALUE` reads them: JSON where the parameter is not text."""
    from ..params_input import _is_text, _loads

    out: dict[str, Any] = {}
    for name, text in values.items():
        if not isinstance(text, str) or _is_text(params, name):
            out[name] = text
            continue
        try:
            out[name] = _loads(text, f"column for {name}")
        except ValueError:
            out[name] = text
    return out


def _requests(service: Service, prepared: list[Prepared]) -> tuple[dict[str, int], int]:
    """Requests per model and the estimated result bytes, packed as the worker packs: each key
    once, at most `max_bundle` jobs and `max_result_bytes` per request."""
    settings = service.settings
    per_model: dict[str, int] = {}
    total = 0
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for p in prepared:
        job = p.new_job
        keys = groups.setdefault((job.backend, job.model), {})
        if job.key not in keys:
            keys[job.key] = job.estimated_bytes or 0
    for (_backend, model), keys in groups.items():
        bundles, jobs_in, size = 1, 0, 0
        for estimate in keys.values():
            if jobs_in and (jobs_in >= settings.max_bundle or size + estimate > settings.max_result_bytes):
                bundles, jobs_in, size = bundles + 1, 0, 0
            jobs_in += 1
            size += estimate
            total += estimate
        per_model[model] = per_model.get(model, 0) + bundles
    return per_model, total
