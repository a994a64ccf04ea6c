"""Every error ndif-jobs raises on purpose, each with the exit code the CLI gives it.

They form one tree, so a script can catch everything ndif-jobs means to say with one
`except NdifJobsError`, and anything else is a bug worth a traceback::

    NdifJobsError            exit 1
    ├── BadInput             exit 2: asked for what cannot be done as asked; nothing was written
    │   ├── UnknownExperiment
    │   ├── UnknownModel
    │   ├── InvalidParams
    │   ├── JobNotFound
    │   └── PlotError        (also a ValueError)
    ├── StoreError           the database or the result folder cannot be used
    │   ├── ResultCorrupt
    │   └── ResultMissing
    ├── OfflineMiss
    ├── ExperimentError
    ├── BundleTimeout        exit 3: a local bundle ran past its time limit
    ├── Rejected             a backend refused the bundle: no retry can help
    ├── RemoteJobError       a backend ran the bundle and answered that it failed as a whole
    └── Transient            worth another try: the network, the server's load, a broken download
        └── Unavailable      the backend cannot be reached or take requests now

`Rejected`, `RemoteJobError`, `Transient` and `Unavailable` are what a backend tells the worker
about a bundle; the worker decides by these classes alone (fail, split, retry, or wait without
spending an attempt), whichever backend raised them.
"""

from __future__ import annotations

ERROR_CHARS = 4000


def clip_error(text: str, limit: int = ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left off: an error message (an
    exception that quotes its input, say) is stored and printed, and must not run to megabytes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class NdifJobsError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInput(NdifJobsError):
    """The user asked for something that cannot be done as asked (exit 2). Nothing was written."""

    exit_code = 2


class UnknownExperiment(BadInput):
    pass


class UnknownModel(BadInput):
    pass


class InvalidParams(BadInput):
    pass


class JobNotFound(BadInput):
    pass


class PlotError(BadInput, ValueError):
    """The results cannot be drawn as asked (mixed experiments, unknown experiment, no results)."""


class StoreError(NdifJobsError):
    """The database or result folder cannot be used (missing, read-only, corrupt, too new)."""


class ResultCorrupt(StoreError):
    """A stored result failed its checksum or cannot be parsed; it is never served."""


class ResultMissing(StoreError):
    """A job has no stored result (not finished, failed, or removed by `gc`)."""


class OfflineMiss(NdifJobsError):
    """Offline, and the asked-for experiment is not in the store."""


class ExperimentError(NdifJobsError):
    """An experiment raised while running. Its job is failed; the rest of its bundle is not."""


class BundleTimeout(NdifJobsError):
    """A local bundle ran past its time limit; its thread cannot be stopped, so the worker stops."""

    exit_code = 3


class Rejected(NdifJobsError):
    """No retry can fix it: the message says what the user must do. The bundle's jobs fail."""


class RemoteJobError(NdifJobsError):
    """The backend ran the bundle and answered that it failed as a whole (the description is the
    backend's). The worker splits the bundle to find the job at fault."""


class Transient(NdifJobsError):
    """Worth another try: the network, the server's load, a broken download."""


class Unavailable(Transient):
    """The backend cannot be reached or cannot take requests now (connection failures, 429, 502-504).

    Not the bundle's fault: a worker keeps waiting for a bundle already sent, and puts a bundle
    it could not send back in the queue without spending an attempt (NDIF down for an hour must
    not fail a night's jobs)."""
