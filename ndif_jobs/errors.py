"""The errors ndif-jobs raises on purpose, each with the exit code the CLI gives it.

Like httpx's, they form one tree under `NdifJobsError`, so a script can catch everything
ndif-jobs means to say with one `except`, and anything else is a bug worth a traceback.
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
