"""ndif-jobs: queue nnsight experiments, run them in bundles on NDIF or locally, keep every tensor.

Python API::

    import ndif_jobs
    job = ndif_jobs.submit("logit-lens", model="smollm2-135m", prompt="The capital of France is")
    result = ndif_jobs.load_result(job.id)      # after `ndif-jobs worker --until-empty`
    result = ndif_jobs.run("activations", prompt="The capital of France is", wait=True)

Importing this package is cheap: the heavy parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BadInput,
    ExperimentError,
    InvalidParams,
    JobNotFound,
    NdifJobsError,
    OfflineMiss,
    ResultCorrupt,
    ResultMissing,
    StoreError,
    UnknownExperiment,
    UnknownModel,
)

if TYPE_CHECKING:
    from .api import Job, load_result, run, submit
    from .experiments import Params, experiment
    from .service import Result

__version__ = "0.1.0"

_LAZY = {
    "submit": "api",
    "run": "api",
    "load_result": "api",
    "Job": "api",
    "Result": "service",
    "experiment": "experiments",
    "Params": "experiments",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ndif_jobs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "submit", "run", "load_result", "Job", "Result", "experiment", "Params",
    "NdifJobsError", "BadInput", "InvalidParams", "UnknownExperiment", "UnknownModel", "JobNotFound",
    "StoreError", "ResultCorrupt", "ResultMissing", "OfflineMiss", "ExperimentError",
]
