"""A third backend is one class and one registry line: a fake one, defined here, drives the real
worker on a real SQLite queue through claim, send, wait, store and finish (in this process)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from ndif_jobs import backends
from ndif_jobs.backends import Handle, JobOutcome, JobSpec
from ndif_jobs.db.engine import dispose_engines
from ndif_jobs.db.queue import NewJob
from ndif_jobs.keys import computation_keys
from ndif_jobs.model_refs import ModelRef, resolve_model
from ndif_jobs.service import Service
from ndif_jobs.settings import Settings
from ndif_jobs.worker import Worker

MODEL = "fake-org/fake-model"
EXPERIMENT = "logit-lens"  # a registered experiment: the worker claims only those; the fake ignores its code


class FakeBackend:
    """Doubles `x`; a negative `x` is that job's own error; `broken` makes the whole send fail."""

    name = "fake"
    title = "Fake"
    reattaches = False
    standin_for: str | None = None
    broken = False
    calls: list[tuple[str, Any]] = []

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self, model: ModelRef) -> None:
        FakeBackend.calls.append(("load", model.spec))

    def send(self, model: ModelRef, jobs: list[JobSpec]) -> Handle:
        FakeBackend.calls.append(("send", sorted(job.params["x"] for job in jobs)))
        if FakeBackend.broken:
            raise RuntimeError("the fake backend is down")
        outcomes = {
            job.job_id: JobOutcome(result={"double": job.params["x"] * 2}) if job.params["x"] >= 0
            else JobOutcome(error="ValueError: x must not be negative")
            for job in jobs
        }
        return Handle(job_ids=[job.job_id for job in jobs], outcomes=outcomes)

    def wait(self, handle: Handle, stop: threading.Event, on_status: Any = None) -> dict[str, JobOutcome] | None:
        FakeBackend.calls.append(("wait", len(handle.job_ids)))
        return handle.outcomes


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeBackend]:
    monkeypatch.setitem(backends.REGISTRY, "fake", FakeBackend)  # the one registry line
    monkeypatch.setattr(FakeBackend, "calls", [])
    monkeypatch.setattr(FakeBackend, "broken", False)
    return FakeBackend


@pytest.fixture
def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield Service(Settings(home=tmp_path / "home", poll_s=0.05, retry_backoff_s=0.01, log_format="json"))
    dispose_engines()


def enqueue(service: Service, *xs: int, max_attempts: int = 3) -> list[str]:
    """Fake jobs into the queue as submit queues them, past its checks (they know only the shipped backends)."""
    from ndif_jobs import experiments

    ref, exp = resolve_model(MODEL), experiments.get(EXPERIMENT)
    new = []
    for x in xs:
        key, _ = computation_keys(ref, exp.name, exp.source_hash, {"x": x})
        new.append(NewJob(key=key, experiment=exp.name, model=ref.spec, model_key=ref.model_key, backend="fake",
                          params={"x": x}, max_attempts=max_attempts))
    return [e.id for e in service.enqueue(new)]


def test_a_registered_backend_runs_its_jobs_through_the_real_worker(fake, service) -> None:  # type: ignore[no-untyped-def]
    good, bad = enqueue(service, 21, -1)

    stats = Worker(service).run(until_empty=True)  # no --backend: each job goes to its own backend

    assert fake.calls == [("load", MODEL), ("send", [-1, 21]), ("wait", 2)]  # one bundle, both jobs
    assert service.load_result(good)["double"] == 42  # stored, then marked completed
    done, failed = service.job(good), service.job(bad)
    assert (done.state, done.attempts) == ("completed", 1)
    assert (failed.state, failed.attempts, failed.error) == ("failed", 1, "ValueError: x must not be negative")
    bundle = service.queue.bundle(done.bundle_id)
    assert bundle is not None and (bundle.backend, bundle.state, bundle.job_count) == ("fake", "completed", 2)
    assert (stats.bundles, stats.completed, stats.failed) == (1, 1, 1)


def test_a_bundle_its_backend_cannot_run_is_retried_until_its_attempts_run_out(fake, service) -> None:  # type: ignore[no-untyped-def]
    fake.broken = True
    (job,) = enqueue(service, 5, max_attempts=2)

    Worker(service, backend="fake").run(until_empty=True)

    assert [c for c in fake.calls if c[0] == "send"] == [("send", [5]), ("send", [5])]
    row = service.job(job)
    assert (row.state, row.attempts) == ("failed", 2)
    assert row.error == "RuntimeError: the fake backend is down"
    assert [a.outcome for a in service.queue.attempts_of(job)] == ["failed", "failed"]  # each try spent an attempt
