"""Backends run a bundle of jobs for one model: `local` on this machine, `ndif` on NDIF."""

from __future__ import annotations

from ..errors import BadInput
from .base import Backend, JobSpec, JobOutcome

BACKENDS = ("local", "ndif")


def get_backend(name: str, settings) -> Backend:  # type: ignore[no-untyped-def]
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(settings)
    if name == "ndif":
        from .ndif import NdifBackend

        return NdifBackend(settings)
    raise BadInput(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")


__all__ = ["Backend", "JobSpec", "JobOutcome", "BACKENDS", "get_backend"]
