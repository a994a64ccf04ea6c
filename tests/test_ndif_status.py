"""Reading NDIF's `/status` (model readiness) and a result link's age, from answers the real
NDIF 0.1.2 server gave (scripts/ndif-local: the model deployed, then evicted)."""

from __future__ import annotations

import calendar
import time

from ndif_jobs.backends.ndif import link_times
from ndif_jobs.backends.ndif_status import ModelStatus, readiness
from ndif_jobs.errors import Unavailable

KEY = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "local/smollm2", "revision": null, "task": "text-generation"}'
RUNNING = {f"f4301:ModelActor:{KEY}": {"application_state": "RUNNING", "deployment_level": "HOT", "model_key": KEY,
                                        "replica_id": "f4301", "repo_id": "local/smollm2"}}
COLD = {"local/smollm2": {"deployment_level": "COLD", "repo_id": "local/smollm2"}}


def test_a_model_is_ready_only_when_ndif_lists_its_exact_key_deployed_on_a_gpu() -> None:
    assert readiness(RUNNING, KEY, "local/smollm2").ready
    cold = readiness(COLD, KEY, "local/smollm2")
    assert not cold.ready and "COLD" in cold.why
    other_revision = KEY.replace('"revision": null', '"revision": "main"')
    assert not readiness(RUNNING, other_revision, "local/smollm2").ready  # NDIF compares keys as strings
    deploying = {k: {**v, "application_state": "DEPLOYING"} for k, v in RUNNING.items()}
    assert readiness(deploying, KEY, "local/smollm2").ready  # coming up already: a request starts nothing
    parked = {k: {"deployment_level": "WARM", "model_key": KEY, "repo_id": "local/smollm2"} for k in RUNNING}
    assert "WARM" in readiness(parked, KEY, "local/smollm2").why
    assert "does not list" in readiness({}, KEY, "local/smollm2").why


def test_an_unreadable_status_does_not_hold_bundles_back_and_is_read_again_later() -> None:
    answers: list[object] = [Unavailable("cannot reach NDIF"), COLD]

    def fetch() -> dict:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    status = ModelStatus(fetch, cache_s=0.0)
    assert status.readiness(KEY, "local/smollm2").ready
    assert not status.readiness(KEY, "local/smollm2").ready


def test_a_presigned_links_age_is_read_even_through_a_proxy() -> None:
    made = "20261130T081339Z"
    link = ("http://127.0.0.1:21002/ndif/abc.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=testing"
            f"&X-Amz-Date={made}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=00")
    expected = calendar.timegm(time.strptime(made, "%Y%m%dT%H%M%SZ"))
    assert link_times(link) == (expected, 3600.0)
    from urllib.parse import quote

    assert link_times(f"http://127.0.0.1:4000/_download?u={quote(link, safe='')}") == (expected, 3600.0)
    assert link_times("https://example.org/result") == (None, 3600.0)
