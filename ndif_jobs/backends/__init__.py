"""Backends run a bundle of jobs for one model: `local` on this machine, `ndif` on NDIF.

`REGISTRY` names each backend's class (`module:Class`, imported on first use, so naming the
backends imports neither torch nor httpx). A new backend is one module that implements
`base.Backend` plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from .base import Backend, Handle, JobOutcome, JobSpec, Status

if TYPE_CHECKING:
    from ..settings import Settings

REGISTRY: dict[str, Any] = {
    "local": "ndif_jobs.backends.local:LocalBackend",
    "ndif": "ndif_jobs.backends.ndif:NdifBackend",
}

BACKENDS = tuple(REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name` (a class, or `module:Class` imported now)."""
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise BadInput(f"unknown backend {name!r} (choose from: {', '.join(REGISTRY)})") from None
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
    found: type[Backend] = entry
    return found


def get_backend(name: str, settings: Settings) -> Backend:
    return backend_class(name)(settings)


__all__ = ["Backend", "Handle", "JobSpec", "JobOutcome", "Status", "REGISTRY", "BACKENDS", "backend_class",
           "get_backend"]
