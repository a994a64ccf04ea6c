"""The local backend: experiments on a model loaded on this machine (GPU when there is one).

It runs the same experiment functions NDIF runs, packing the forward passes of a bundle's
staged experiments into invokes of shared traces (see `experiments.runtime`).
"""

from __future__ import annotations

from typing import Any

from .. import experiments
from ..models import ModelRef, load_local_model
from ..settings import Settings
from .base import JobOutcome, JobSpec


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, pack: bool = True) -> None:
        self.settings = settings
        self.pack = pack

    def load(self, model: ModelRef) -> Any:
        return load_local_model(model, self.settings.models_dir, device=self.settings.device)

    def run_bundle(self, model: ModelRef, jobs: list[JobSpec]) -> dict[str, JobOutcome]:
        import torch

        from ..experiments.runtime import Failure, run_jobs

        nn_model = self.load(model)
        work = [(job.job_id, experiments.get(job.experiment).function(), job.params) for job in jobs]
        with torch.no_grad():
            raw = run_jobs(nn_model, work, max_invokes=self.settings.max_invokes, pack=self.pack)
        out: dict[str, JobOutcome] = {}
        for job_id, value in raw.items():
            if isinstance(value, Failure):
                out[job_id] = JobOutcome(error=value.message, detail=value.detail)
            elif not isinstance(value, dict):
                out[job_id] = JobOutcome(error=f"TypeError: the experiment returned {type(value).__name__}, not a dict")
            else:
                out[job_id] = JobOutcome(result=value)
        return out
