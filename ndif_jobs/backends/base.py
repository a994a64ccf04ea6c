"""The seam between the worker and whatever runs experiments: one interface, in two phases.

* `load(model)`: make the model ready, outside the bundle's time limit (NDIF: nothing to do).
* `send(model, jobs) -> Handle`: start one bundle (jobs for one model). The local backend runs
  it and returns a finished handle; NDIF returns once the request is accepted, with its job id,
  which the worker commits before it waits (a worker that dies then never sends it twice).
* `wait(handle, stop, on_status)`: one outcome per job (its result, or its experiment's own
  error, which fails that job alone), or None past the handle's deadline. Setting `stop` ends
  the wait at once (`Transient`): the bundle stays where it is for the next worker.

An exception from `send` or `wait` concerns the whole bundle: `errors.Rejected`,
`RemoteJobError`, `Transient`, `Unavailable`, `BundleTimeout`, or any other (retried later).
What the worker loop must know of a backend before making one, it reads from its class:
`reattaches` and `standin_for`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..model_refs import ModelRef
    from ..settings import Settings


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


@dataclass
class Status:
    """A remote bundle's status as its backend reports it (QUEUED, RUNNING, COMPLETED, ...)."""

    status: str
    description: str = ""
    data: Any = None
    meta: dict[str, Any] | None = None


@dataclass
class Handle:
    """A sent bundle: finished (`outcomes` set) or waiting at a remote backend under `remote_id`."""

    job_ids: list[str]
    remote_id: str | None = None
    deadline: float | None = None
    payload_bytes: int | None = None
    outcomes: dict[str, JobOutcome] | None = field(default=None, repr=False)
    #: What the backend measured while it ran or fetched the bundle (recorded in each result's
    #: provenance): the experiments' own time here, the result's download from a remote backend.
    run_s: float | None = None
    download_s: float | None = None
    downloaded_bytes: int | None = None


OnStatus = Callable[[Status], None]


class Backend(Protocol):
    #: Class attributes, read by the worker before it makes a backend.
    name: str
    #: How the backend is named in what a user reads ("waiting for NDIF: ...").
    title: str
    #: Whether a sent bundle outlives its worker: its id is committed, and a later worker
    #: re-attaches to it instead of sending it again.
    reattaches: bool
    #: The backend whose jobs this one runs through their local stand-ins (NDIF_JOBS_LOCAL_STANDINS).
    standin_for: str | None

    def __init__(self, settings: Settings) -> None: ...

    def load(self, model: ModelRef) -> None: ...

    def send(self, model: ModelRef, jobs: list[JobSpec]) -> Handle: ...

    def wait(
        self, handle: Handle, stop: threading.Event, on_status: OnStatus | None = None
    ) -> dict[str, JobOutcome] | None: ...
