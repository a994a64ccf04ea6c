"""ndif-jobs: queue nnsight experiments, run them in bundles on NDIF or locally, keep every tensor.

Python API::

    import ndif_jobs
    job = ndif_jobs.submit("logit-lens", model="smollm2-135m", prompt="The capital of France is")
    result = ndif_jobs.load_result(job.id)      # after `ndif-jobs worker --until-empty`
    result = ndif_jobs.run("activations", prompt="The capital of France is", wait=True)
    failed = ndif_jobs.jobs(state="failed", tag="night-1")   # `ndif-jobs list`'s filters
    table = ndif_jobs.collect(sweep="landmarks-patching")     # .frame (pandas), .stack(name)

Your own experiments: `experiment`, `Params` with the typed parameters `Layer`, `Layers`,
`Position`, `Prompt`, `Token` (checked against the model at submit), and the staged API
(`Pass`, `Window`) that packs their forward passes with other jobs'.

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
    from .api import Job, jobs, load_result, run, submit
    from .collection import Collection, collect
    from .experiments import Params, experiment
    from .experiments.params import Layer, Layers, Position, Prompt, Token
    from .experiments.stages import Pass, Window
    from .preflight import PreflightWarning
    from .service import Result

__version__ = "0.1.0"

_LAZY = {
    "submit": "api",
    "run": "api",
    "load_result": "api",
    "jobs": "api",
    "Job": "api",
    "Result": "service",
    # One table out of many jobs (a sweep, a tag): pandas loads on first use.
    "collect": "collection",
    "Collection": "collection",
    "experiment": "experiments",
    "Params": "experiments",
    # Typed parameters that pre-flight checks against the model (see experiments.params).
    "Layer": "experiments.params",
    "Layers": "experiments.params",
    "Position": "experiments.params",
    "Prompt": "experiments.params",
    "Token": "experiments.params",
    # The staged API: yield Passes, and the runner packs them with other jobs' (torch-free import).
    "Pass": "experiments.stages",
    "Window": "experiments.stages",
    "PreflightWarning": "preflight",
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
    "submit", "run", "load_result", "jobs", "Job", "Result", "collect", "Collection", "experiment", "Params",
    "Layer", "Layers", "Position", "Prompt", "Token", "Pass", "Window", "PreflightWarning",
    "NdifJobsError", "BadInput", "InvalidParams", "UnknownExperiment", "UnknownModel", "JobNotFound",
    "StoreError", "ResultCorrupt", "ResultMissing", "OfflineMiss", "ExperimentError",
]
