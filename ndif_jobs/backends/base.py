"""The seam between the worker and whatever runs experiments.

A backend receives one bundle (jobs for one model) and returns one outcome per job: the
result dict, or the job's own error. An exception raised by `run_bundle` itself means the
whole bundle could not run (model failed to load, connection lost) and is retried by the
worker; a per-job error is the experiment's and fails that job alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..models import ModelRef


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    experiment: str
    params: dict[str, Any]


@dataclass
class JobOutcome:
    result: dict[str, Any] | None = None
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Backend(Protocol):
    name: str

    def run_bundle(self, model: ModelRef, jobs: list[JobSpec]) -> dict[str, JobOutcome]: ...
