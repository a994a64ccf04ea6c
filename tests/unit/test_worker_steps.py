"""The worker's own decisions, in this process on a real SQLite queue: how it packs a claim into
bundles, how long it waits before a retry, how it splits a bundle its backend failed as a
whole, and how it stops sending to a backend that is down. A small backend defined here (one
registry line, as a third backend would be) answers as each test needs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ndif_jobs import backends, experiments
from ndif_jobs.backends import Handle, JobOutcome, JobSpec
from ndif_jobs.db.engine import dispose_engines
from ndif_jobs.db.queue import NewJob
from ndif_jobs.errors import RemoteJobError, Unavailable
from ndif_jobs.keys import computation_keys
from ndif_jobs.model_refs import ModelRef, resolve_model
from ndif_jobs.service import Service
from ndif_jobs.settings import Settings
from ndif_jobs.worker import Worker

EXPERIMENT = "logit-lens"  # registered, so the worker claims it; the backend below ignores its code


class Scripted:
    """Doubles each job's `x`. `wait` fails the whole bundle while it holds a job with x == `poison`;
    `send` raises `Unavailable` the first `outages` times."""

    name = "scripted"
    title = "Scripted"
    reattaches = False
    standin_for: str | None = None
    poison: int | None = None
    outages = 0
    sent: list[list[int]] = []

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self, model: ModelRef) -> None:
        pass

    def send(self, model: ModelRef, jobs: list[JobSpec]) -> Handle:
        Scripted.sent.append(sorted(job.params["x"] for job in jobs))
        if Scripted.outages > 0:
            Scripted.outages -= 1
            raise Unavailable("Scripted cannot be reached: connection refused")
        return Handle(job_ids=[job.job_id for job in jobs],
                      outcomes={job.job_id: JobOutcome(result={"double": job.params["x"] * 2}) for job in jobs})

    def wait(self, handle: Handle, stop: threading.Event, on_status: Any = None) -> dict[str, JobOutcome] | None:
        assert handle.outcomes is not None
        poisoned = {"double": 2 * Scripted.poison} if Scripted.poison is not None else None
        if any(outcome.result == poisoned for outcome in handle.outcomes.values()):
            raise RemoteJobError("Traceback (most recent call last):\n"
                                 "RuntimeError: CUDA error: an illegal memory access")
        return handle.outcomes


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[Scripted]:
    monkeypatch.setitem(backends.REGISTRY, "scripted", Scripted)
    monkeypatch.setattr(Scripted, "sent", [])
    return Scripted


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    settings = Settings(home=tmp_path / "home", poll_s=0.02, retry_backoff_s=0.2, retry_backoff_max_s=0.4,
                        log_format="json", max_result_bytes=100)
    yield Service(settings)
    dispose_engines()


def enqueue(service: Service, *xs: int, model: str = "fake-org/model-a", estimate: int | None = None,
            key: str | None = None) -> list[str]:
    ref, exp = resolve_model(model), experiments.get(EXPERIMENT)
    new = []
    for x in xs:
        computed, _ = computation_keys(ref, exp.name, exp.source_hash, {"x": x})
        new.append(NewJob(key=key or computed, experiment=exp.name, model=ref.spec, model_key=ref.model_key,
                          backend="scripted", params={"x": x}, estimated_bytes=estimate, force=True))
    return [e.id for e in service.queue.enqueue(new)]


# -- packing and backoff ---------------------------------------------------------------------------


def test_a_claim_is_packed_into_bundles_under_max_result_bytes(service: Service) -> None:
    a, b = enqueue(service, 1, 2, estimate=40)
    c, d = enqueue(service, 3, 4, estimate=40, key="c" * 64)  # one computation: counted once
    (e,) = enqueue(service, 5, estimate=40)
    (f,) = enqueue(service, 6, estimate=None)  # no estimate: counted as nothing
    (g,) = enqueue(service, 7, estimate=150)  # alone past the limit: still sent, in a bundle of its own
    jobs = service.queue.claim("w", limit=10, lease_s=60)
    packed = Worker(service)._pack(jobs)
    assert [[j.id for j in bundle] for bundle in packed] == [[a, b], [c, d, e, f], [g]]


def test_the_retry_delay_doubles_with_jitter_up_to_the_longest(service: Service) -> None:
    worker = Worker(service)  # retry_backoff_s=0.2, retry_backoff_max_s=0.4
    for attempts, (low, high) in {0: (0.1, 0.2), 1: (0.1, 0.2), 2: (0.2, 0.4), 3: (0.2, 0.4), 9: (0.2, 0.4)}.items():
        delays = [worker.retry_delay(attempts) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high
        assert len(set(delays)) > 100  # jittered: workers that failed together do not retry together


# -- a bundle that failed as a whole -------------------------------------------------------------


def test_a_bundle_error_is_split_until_the_job_at_fault_fails_alone(scripted: type[Scripted], service: Service,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Scripted, "poison", 3)
    ids = dict(zip([1, 2, 3, 4], enqueue(service, 1, 2, 3, 4), strict=True))

    Worker(service).run(until_empty=True)

    assert scripted.sent == [[1, 2, 3, 4], [1, 2], [3, 4], [3], [4]]
    culprit = service.job(ids[3])
    assert (culprit.state, culprit.error) == ("failed", "Scripted: RuntimeError: CUDA error: an illegal memory access")
    assert culprit.attempts == 1  # found by splitting, not by spending attempts
    for x in (1, 2, 4):
        assert service.job(ids[x]).state == "completed" and service.load_result(ids[x])["double"] == 2 * x
    failed = [(b.job_count, b.error) for b in service.queue.bundles_in_state("failed")]
    assert failed == [(4, "split after Scripted error: RuntimeError: CUDA error: an illegal memory access"),
                      (2, "split after Scripted error: RuntimeError: CUDA error: an illegal memory access"),
                      (1, "RuntimeError: CUDA error: an illegal memory access")]


# -- a backend that is down ---------------------------------------------------------------------


def test_while_a_backend_is_down_the_rest_of_the_claim_waits_without_spending_attempts(
    scripted: type[Scripted], service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Scripted, "outages", 1)
    (a,) = enqueue(service, 1, model="fake-org/model-a")
    (b,) = enqueue(service, 2, model="fake-org/model-b")  # another model: another bundle of the same claim

    Worker(service).run(until_empty=True)

    assert scripted.sent[0] == [1]  # refused; model-b's bundle was then not sent during the outage
    assert sorted(map(tuple, scripted.sent[1:])) == [(1,), (2,)]
    for job_id in (a, b):
        row = service.job(job_id)
        assert (row.state, row.attempts) == ("completed", 1)
        assert [x.outcome for x in service.queue.attempts_of(job_id)] == ["deferred", "completed"]
    assert "waiting for Scripted: Scripted cannot be reached" in service.queue.attempts_of(a)[0].error
