"""A job as the application sees it: built once from its database row, with its facts parsed.

The queue stores params as JSON text and tags as `,a,b,`; `Job.from_row` turns a row into typed
fields once, so the CLI, the Python API, the service and the worker read `job.params` and
`job.tags` instead of each parsing the row again. What depends on more than the row (the model
it resolves to, the key of running it now, the stand-in that runs it locally) is worked out on
first use and kept on the object.

Standard library only: the CLI's read path builds these without importing the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .states import DONE_STATES, FINAL_STATES, JobState

if TYPE_CHECKING:
    from .model_refs import ModelRef


def parse_tags(stored: str) -> tuple[str, ...]:
    """Tags as the queue stores them (`,a,b,`, so that one matches with LIKE '%,a,%')."""
    return tuple(t for t in stored.strip(",").split(",") if t)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job, its row's fields typed: `params` a dict, `tags` a tuple, `state` a `JobState`."""

    id: str
    key: str
    experiment: str
    model: str
    model_key: str
    backend: str
    params: dict[str, Any]
    state: JobState
    priority: int
    tags: tuple[str, ...]
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    lease_owner: str | None
    lease_expires_at: float | None
    attempts: int
    max_attempts: int
    error: str | None
    bundle_id: str | None
    result_key: str | None
    result_bytes: int | None
    estimated_bytes: int | None
    sweep: str | None = None
    sweep_row: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        """A job from a queue row (`JobRow`, or anything with `_mapping`); columns the job has no
        field for are left out, so a newer schema's row still builds one."""
        data = dict(row._mapping)
        data["params"] = json.loads(data["params"]) if isinstance(data["params"], str) else dict(data["params"])
        data["tags"] = parse_tags(data["tags"]) if isinstance(data["tags"], str) else tuple(data["tags"])
        data["state"] = JobState(data["state"])
        return cls(**{name: data[name] for name in _FIELDS if name in data})

    @classmethod
    def of(cls, job: Any) -> Job:
        """`job` as a `Job`: itself if it is one, else built from its row."""
        return job if isinstance(job, Job) else cls.from_row(job)

    def replace(self, **changes: Any) -> Job:
        """This job with some fields changed (a re-keyed job, say): a new object, facts recomputed."""
        return dataclasses.replace(self, **changes)

    # -- derived facts, each worked out once ------------------------------------------------

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def is_done(self) -> bool:
        """Its result is stored (completed, or served from the store)."""
        return self.state in DONE_STATES

    @cached_property
    def model_ref(self) -> ModelRef:
        """The model this job names, resolved (reads package metadata or the model's files once)."""
        from .model_refs import resolve_model

        return resolve_model(self.model)

    def standin(self, standins: Mapping[str, str]) -> str | None:
        """The local model that runs this job in place of its own (NDIF_JOBS_LOCAL_STANDINS), if any."""
        return standins.get(self.model)

    def computation_keys(self, ref: ModelRef | None = None) -> tuple[str, tuple[str, ...]]:
        """The cache key of running this job's experiment, as its code stands now, on `ref`
        (default: its own model), and the key forms earlier versions used for the same run.
        Raises `UnknownExperiment` when this process has not loaded the experiment."""
        from . import experiments
        from .keys import computation_keys

        exp = experiments.get(self.experiment)
        return computation_keys(ref or self.model_ref, exp.name, exp.source_hash, self.params)

    # -- views ---------------------------------------------------------------------------

    def summary(self, with_params: bool = False) -> dict[str, Any]:
        """The job as `list --json` and `status --json` print it."""
        doc: dict[str, Any] = {
            "id": self.id,
            "state": str(self.state),
            "experiment": self.experiment,
            "model": self.model,
            "backend": self.backend,
            "priority": self.priority,
            "tags": list(self.tags),
            "attempts": self.attempts,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }
        if self.sweep is not None:
            doc["sweep"] = self.sweep
            doc["sweep_row"] = self.sweep_row
        if with_params:
            doc["params"] = self.params
        return doc

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain values (`Result.job`)."""
        data = dataclasses.asdict(self)
        data["state"] = str(self.state)
        data["tags"] = list(self.tags)
        return data


_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
