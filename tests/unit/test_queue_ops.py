"""The queue's operations on a temporary SQLite file, one by one.

The operations the worker and the CLI rely on beyond claim and finish (covered with
PostgreSQL too in tests/test_queue.py): renewing a lease, taking back a gone worker's jobs,
re-keying, joining a bundle, cancelling, retrying, failing for good, closing a bundle, and the
claim's choice of what a worker can run. Each is a real transaction on a real database file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ndif_jobs.db.engine import dispose_engines, open_database
from ndif_jobs.db.queue import NewJob, Outcomes, Queue, Runnable
from ndif_jobs.errors import JobNotFound


def job(n: int, key: str | None = None, **kw: Any) -> NewJob:
    values: dict[str, Any] = dict(key=key or f"{n:064x}", experiment="activations", model="m", model_key="local:m",
                                  backend="local", params={"n": n})
    values.update(kw)
    return NewJob(**values)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    yield Queue(open_database(f"sqlite:///{tmp_path / 'queue.db'}"))
    dispose_engines()


def outcomes(queue: Queue, job_id: str) -> list[str | None]:
    return [a.outcome for a in queue.attempts_of(job_id)]


def test_a_renewed_lease_keeps_the_job_from_other_workers(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1)])
    queue.claim("w1", limit=1, lease_s=0.2)
    assert queue.renew_leases("w1", [a.id], lease_s=60) == 1
    assert queue.renew_leases("w2", [a.id], lease_s=60) == 0  # not its job
    time.sleep(0.3)  # past the first lease, not the renewed one
    assert queue.claim("w2", limit=1, lease_s=60) == []
    assert queue.get(a.id).lease_owner == "w1"


def test_an_expired_lease_cannot_be_renewed_once_another_worker_has_the_job(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1)])
    queue.claim("w1", limit=1, lease_s=0.01)
    time.sleep(0.05)
    queue.claim("w2", limit=1, lease_s=60)
    assert queue.renew_leases("w1", [a.id], lease_s=60) == 0
    assert queue.get(a.id).lease_owner == "w2"


def test_a_gone_workers_jobs_come_back_at_once_with_no_attempt_spent(queue: Queue) -> None:
    a, b = queue.enqueue([job(1), job(2)])
    queue.claim("gone", limit=2, lease_s=600)
    bundle = queue.start_bundle("gone", "local", "local:m", [a.id])
    assert queue.take_back("gone", "its worker is gone") == {"requeued": 2, "failed": 0, "at_ndif": 0}
    for row in queue.get_many([a.id, b.id]):
        assert (row.state, row.attempts, row.lease_owner) == ("queued", 0, None)
    assert outcomes(queue, a.id) == ["worker gone"]
    assert queue.attempts_of(a.id)[0].error == "its worker is gone"
    assert queue.bundle(bundle).state == "abandoned"
    assert queue.take_back("gone", "again") == {"requeued": 0, "failed": 0, "at_ndif": 0}  # a second call: no-op
    assert len(queue.claim("w", limit=2, lease_s=60)) == 2  # at once, not after 600 s


def test_a_job_that_killed_its_worker_every_attempt_fails_instead_of_coming_back(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1, max_attempts=2)])
    for worker in ("gone-1", "gone-2"):
        queue.claim(worker, limit=1, lease_s=600)
        counts = queue.take_back(worker, "its worker is gone")
    assert counts == {"requeued": 0, "failed": 1, "at_ndif": 0}
    row = queue.get(a.id)
    assert row.state == "failed" and "died every time it ran this job" in row.error
    assert outcomes(queue, a.id) == ["worker gone", "worker gone"]


def test_take_back_touches_only_the_gone_workers_jobs(queue: Queue) -> None:
    a, b = queue.enqueue([job(1), job(2)])
    queue.claim("alive", limit=1, lease_s=600)
    queue.claim("gone", limit=1, lease_s=600)
    queue.take_back("gone", "its worker is gone")
    assert queue.get(a.id).lease_owner == "alive" and queue.get(b.id).state == "queued"


def test_rekey_moves_a_held_job_once_and_notes_why(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1)])
    queue.claim("w", limit=1, lease_s=60)
    new_key = "e" * 64
    assert queue.rekey("other", [(a.id, new_key, "local:m2", "not its job")]) == 0
    assert queue.rekey("w", [(a.id, new_key, "local:m2", "the source changed")]) == 1
    assert queue.rekey("w", [(a.id, new_key, "local:m2", "the source changed")]) == 0  # a re-run: already moved
    row = queue.get(a.id)
    assert (row.key, row.model_key, row.state) == (new_key, "local:m2", "claimed")
    notes = [(x.outcome, x.error) for x in queue.attempts_of(a.id) if x.outcome == "re-keyed"]
    assert notes == [("re-keyed", "the source changed")]


def test_queued_jobs_of_a_bundles_key_join_it(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1, key="a" * 64)])
    queue.claim("w", limit=1, lease_s=60)
    bundle = queue.start_bundle("w", "local", "local:m", [a.id])
    (b,) = queue.enqueue([job(2, key="a" * 64, force=True)])  # a forced resubmit of the same computation
    (c,) = queue.enqueue([job(3, key="c" * 64)])
    (d,) = queue.enqueue([job(4, key="a" * 64, backend="ndif", model_key="ndif:m", force=True)])
    held = queue.join_bundle("w", bundle, "local", ["a" * 64], lease_s=60)
    assert sorted(j.id for j in held) == sorted([a.id, b.id])
    assert queue.get(b.id).state == "running" and queue.get(b.id).bundle_id == bundle
    assert queue.get(c.id).state == "queued" and queue.get(d.id).state == "queued"  # other key, other backend
    assert queue.bundle(bundle).job_count == 2
    assert queue.complete("w", [(j.id, "a" * 64, 1) for j in held]) == 2


def test_cancel_stops_active_jobs_and_leaves_finished_ones(queue: Queue) -> None:
    a, b, c = queue.enqueue([job(1), job(2), job(3)])
    queue.claim("w", limit=2, lease_s=60)
    queue.complete("w", [(a.id, "k" * 64, 1)])
    assert queue.cancel([a.id, b.id, c.id]) == {a.id: "completed", b.id: "cancelled", c.id: "cancelled"}
    assert queue.complete("w", [(b.id, "k" * 64, 1)]) == 0  # its worker lost it
    assert queue.claim("w", limit=5, lease_s=60) == []
    with pytest.raises(JobNotFound):
        queue.cancel(["0123456789ab"])


def test_retry_requeues_finished_jobs_with_a_fresh_budget_and_leaves_active_ones(queue: Queue) -> None:
    a, b = queue.enqueue([job(1, max_attempts=1), job(2)])
    queue.claim("w", limit=1, lease_s=60)
    assert queue.fail("w", [(a.id, "boom")], retry_in_s=0)["failed"] == 1
    assert queue.retry([a.id, b.id]) == {a.id: "queued", b.id: "queued"}
    row = queue.get(a.id)
    assert (row.state, row.attempts, row.error, row.finished_at) == ("queued", 0, None, None)
    assert queue.get(b.id).attempts == 0  # was queued: untouched
    with pytest.raises(JobNotFound):
        queue.retry(["0123456789ab"])


def test_failing_for_good_spends_no_more_attempts(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1, max_attempts=5)])
    queue.claim("w", limit=1, lease_s=60)
    assert queue.fail("other", [(a.id, "not its job")])["failed"] == 0
    assert queue.fail("w", [(a.id, "InvalidParams: bad layer")])["failed"] == 1
    row = queue.get(a.id)
    assert (row.state, row.error, row.attempts) == ("failed", "InvalidParams: bad layer", 1)
    assert outcomes(queue, a.id) == ["failed"]


def test_closing_a_bundle_marks_it_completed_or_failed(queue: Queue) -> None:
    a, b = queue.enqueue([job(1), job(2)])
    queue.claim("w", limit=2, lease_s=60)
    good = queue.start_bundle("w", "local", "local:m", [a.id])
    bad = queue.start_bundle("w", "local", "local:m", [b.id])
    assert queue.get(a.id).state == "running" and queue.get(a.id).bundle_id == good
    queue.complete("w", [(a.id, "k" * 64, 3)])
    queue.close_bundle(good)

    def fail_bad(tx: Outcomes) -> None:
        tx.fail("w", [(b.id, "OSError: disk")], retry_in_s=0)
        tx.close_bundle(bad, "OSError: disk")

    queue.in_transaction(fail_bad)
    assert (queue.bundle(good).state, queue.bundle(good).error) == ("completed", None)
    assert (queue.bundle(bad).state, queue.bundle(bad).error) == ("failed", "OSError: disk")
    assert queue.get(b.id).state == "queued"  # attempts left: back in the queue


def test_a_long_error_is_stored_clipped(queue: Queue) -> None:
    (a,) = queue.enqueue([job(1, max_attempts=1)])
    queue.claim("w", limit=1, lease_s=60)
    queue.fail("w", [(a.id, "x" * 100_000)], retry_in_s=0)
    error = queue.get(a.id).error
    assert len(error) < 5000 and error.endswith("more characters)")


def test_the_claim_takes_only_what_the_worker_can_run(queue: Queue) -> None:
    local_act, local_patch, remote_big, remote_small = queue.enqueue([
        job(1), job(2, experiment="patching"),
        job(3, backend="ndif", model="big", model_key="ndif:big"),
        job(4, backend="ndif", model="small", model_key="ndif:small"),
    ])
    only_act = Runnable(backend="local", standins=("small",), experiments=("activations",))
    taken = queue.claim("w", limit=10, lease_s=60, runnable=only_act)
    assert sorted(j.id for j in taken) == sorted([local_act.id, remote_small.id])
    assert queue.waiting_count(runnable=only_act) == 2  # what it holds; the rest is not its to wait for
    ndif = queue.claim("n", limit=10, lease_s=60, runnable=Runnable(backend="ndif"))
    assert [j.id for j in ndif] == [remote_big.id]
    assert queue.get(local_patch.id).state == "queued"


def test_the_claim_takes_the_highest_priority_first_and_skips_jobs_not_yet_due(queue: Queue) -> None:
    low, high = queue.enqueue([job(1), job(2, priority=9)])
    queue.claim("w", limit=1, lease_s=60)
    queue.fail("w", [(high.id, "later")], retry_in_s=60)
    (taken,) = queue.claim("w", limit=5, lease_s=60)
    assert taken.id == low.id  # the high one waits out its retry delay


def test_a_sweeps_jobs_carry_its_name_and_row_and_are_listed_and_counted_alone(queue: Queue) -> None:
    queue.enqueue([job(1, sweep="grid", sweep_row=0), job(2, sweep="grid", sweep_row=1), job(3)])
    rows = queue.list_jobs(sweep="grid", newest_first=False)
    assert [(r.sweep, r.sweep_row) for r in rows] == [("grid", 0), ("grid", 1)]
    assert queue.counts(sweep="grid")["queued"] == 2
    assert queue.counts()["queued"] == 3
    assert queue.list_jobs(sweep="other") == []


def test_outcomes_recorded_together_are_all_or_nothing(queue: Queue) -> None:
    a, b = queue.enqueue([job(1), job(2)])
    queue.claim("w", limit=2, lease_s=60)
    bundle = queue.start_bundle("w", "local", "local:m", [a.id, b.id])

    def record_then_fail(tx: Outcomes) -> None:
        tx.complete("w", [(a.id, "k" * 64, 1)])
        tx.fail("w", [(b.id, "boom")])
        tx.close_bundle(bundle)
        raise RuntimeError("the worker's own error, after the writes")

    with pytest.raises(RuntimeError):
        queue.in_transaction(record_then_fail)
    assert [queue.get(j.id).state for j in (a, b)] == ["running", "running"]
    assert queue.bundle(bundle).state == "running"
