"""The local backend: experiments on a model loaded on this machine (GPU when there is one).

It runs the same experiment functions NDIF runs, packing the forward passes of a bundle's
staged experiments into invokes of shared traces (see `experiments.runtime`). `send` runs the
whole bundle, under `bundle_time_limit_s`, and returns a finished handle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import experiments
from ..errors import BundleTimeout
from ..model_refs import ModelRef, load_local_model
from ..settings import Settings
from .base import Handle, JobOutcome, JobSpec, OnStatus

T = TypeVar("T")


class LocalBackend:
    name = "local"
    title = "local"
    reattaches = False
    standin_for: str | None = "ndif"

    def __init__(self, settings: Settings, pack: bool = True) -> None:
        self.settings = settings
        self.pack = pack

    def load(self, model: ModelRef) -> None:
        self._model(model)

    def _model(self, model: ModelRef) -> Any:
        return load_local_model(model, self.settings.models_dir, device=self.settings.device)

    def send(self, model: ModelRef, jobs: list[JobSpec]) -> Handle:
        started = time.monotonic()
        outcomes = run_with_time_limit(lambda: self.run_bundle(model, jobs), self.settings.bundle_time_limit_s)
        return Handle(job_ids=[job.job_id for job in jobs], outcomes=outcomes, run_s=time.monotonic() - started)

    def provenance(self, model: ModelRef) -> dict[str, Any]:
        """Where this backend ran the model: its device and dtype (for each result's manifest)."""
        loaded = self._model(model)
        module = getattr(loaded, "_model", loaded)
        first = next(iter(module.parameters()), None)
        return {
            "device": str(first.device) if first is not None else self.settings.device,
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        }

    def wait(
        self, handle: Handle, stop: threading.Event, on_status: OnStatus | None = None
    ) -> dict[str, JobOutcome] | None:
        return handle.outcomes

    def run_bundle(self, model: ModelRef, jobs: list[JobSpec]) -> dict[str, JobOutcome]:
        """Run the bundle here and now, with no time limit."""
        import torch

        from ..experiments.runtime import Failure, run_jobs

        nn_model = self._model(model)
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


def run_with_time_limit(run: Callable[[], T], limit_s: float) -> T:
    """`run()` on a thread, waiting at most `limit_s`.

    Python cannot stop a thread: an experiment that never returns leaves it running. So past
    the limit this raises `BundleTimeout` (the bundle's jobs fail with what to do, and the
    worker stops, exit 3) rather than let more work run beside a thread that still holds the model.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="bundle")
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        raise BundleTimeout(
            f"the bundle ran past its time limit ({limit_s:g} s, "
            "NDIF_JOBS_BUNDLE_TIME_LIMIT_S): an experiment never returned; run these jobs alone "
            "(ndif-jobs retry JOB..., then ndif-jobs worker --max-bundle 1) to find it"
        )
    if "error" in box:
        raise box["error"]
    out: T = box["out"]
    return out
