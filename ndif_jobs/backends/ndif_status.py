"""Whether NDIF runs a model now, from its `GET /status` (read before a bundle is sent).

NDIF deploys a model that is not running when a request for it arrives; that deploy can take
minutes and evict the models of others. So, unless NDIF_JOBS_ALLOW_COLD is set, a bundle goes
only to a model that NDIF has deployed on a GPU (HOT: running, or already coming up or back, which
a request does not start); the jobs of a model that is absent, COLD (downloaded only) or WARM
(parked in CPU memory) wait in the queue (no attempt spent) and go as soon as NDIF lists it.

`/status` answers `{"deployments": {name: {...}}}`. A deployed replica's entry carries its exact
`model_key`, `deployment_level` (HOT: on a GPU, WARM: parked in CPU memory) and
`application_state` (RUNNING, DEPLOYING, UNHEALTHY); a model NDIF has only downloaded is an entry
`{"deployment_level": "COLD", "repo_id": ...}`; a model it does not know is absent. Keys are
compared as exact strings, as NDIF does.

The answer is kept `NDIF_JOBS_STATUS_CACHE_S` seconds (NDIF itself refreshes it every 60 s). If
`/status` cannot be read, sending is not blocked: the request then waits at NDIF as it always could.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import NdifJobsError
from ..logging import get_logger
from ..states import MODEL_WAIT_PREFIX

log = get_logger("ndif_jobs.ndif")

@dataclass(frozen=True)
class Readiness:
    """NDIF's view of one model: `ready` to send to, else `why` not (one line)."""

    ready: bool
    why: str = ""


def readiness(deployments: dict[str, Any], model_key: str, repo_id: str) -> Readiness:
    """Whether `/status`'s `deployments` list `model_key` as running, and if not, what they say."""
    entries = [e for e in deployments.values() if isinstance(e, dict)]
    mine = [e for e in entries if e.get("model_key") == model_key]
    if any(e.get("deployment_level", "HOT") == "HOT" for e in mine):
        return Readiness(True)
    levels = sorted({str(e.get("deployment_level")) for e in mine})
    if levels:
        return Readiness(False, f"NDIF lists it {', '.join(levels)} (not on a GPU)")
    if any(e.get("repo_id") == repo_id for e in entries):
        return Readiness(False, "NDIF lists it COLD (not deployed)")
    return Readiness(False, "NDIF does not list it as deployed")


class ModelStatus:
    """`/status`, read at most once per `cache_s`, and each model's readiness from it."""

    def __init__(self, fetch: Callable[[], dict[str, Any]], cache_s: float) -> None:
        self._fetch = fetch
        self.cache_s = cache_s
        self._deployments: dict[str, Any] | None = None
        self._read_at = float("-inf")
        self._failing = False

    def deployments(self) -> dict[str, Any] | None:
        """The latest `deployments` (None when `/status` could not be read)."""
        if time.monotonic() - self._read_at < self.cache_s:
            return self._deployments
        try:
            self._deployments = self._fetch()
            if self._failing:
                log.info("NDIF's /status answers again: models are checked before sending")
            self._failing = False
        except NdifJobsError as exc:
            if not self._failing:
                log.warning("NDIF's /status cannot be read: bundles are sent without checking that their model "
                            "runs", error=str(exc))
            self._failing = True
            self._deployments = None
        self._read_at = time.monotonic()
        return self._deployments

    def readiness(self, model_key: str, repo_id: str) -> Readiness:
        deployments = self.deployments()
        if deployments is None:
            return Readiness(True)
        return readiness(deployments, model_key, repo_id)


def waiting_reason(model: str, why: str) -> str:
    """What a job waiting for its model says (in `status`, `show` and the pages)."""
    return (f"{MODEL_WAIT_PREFIX}{model}: {why}; the jobs go as soon as NDIF lists it running "
            "(NDIF_JOBS_ALLOW_COLD=1 sends them anyway, and NDIF deploys it, which can take the slot of others)")


#: Phrases of an NDIF ERROR that refuse the model itself, whatever the request.
MODEL_REFUSALS = ("could not deploy", "not available for your")


def refuses_model(message: str) -> bool:
    """Whether NDIF's ERROR text refuses the model (cannot deploy it, or not for this key)."""
    lowered = message.lower()
    return any(phrase in lowered for phrase in MODEL_REFUSALS)
