"""Queue operations on a real SQLite file and on the real PostgreSQL server."""

from __future__ import annotations

import time

import pytest

from ndif_jobs.db.engine import dispose_engines, open_database
from ndif_jobs.db.queue import NewJob, Queue


def job(n: int, key: str | None = None, priority: int = 0, **kw) -> NewJob:  # type: ignore[no-untyped-def]
    return NewJob(key=key or f"{n:064x}", experiment="activations", model="m", model_key="local:m", backend="local",
                  params={"n": n}, priority=priority, **kw)


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    yield Queue(open_database(url))
    dispose_engines()


def test_claim_takes_priority_then_age_and_never_twice(queue) -> None:  # type: ignore[no-untyped-def]
    queue.enqueue([job(1), job(2, priority=5), job(3)])
    first = queue.claim("w1", limit=2, lease_s=60)
    assert [r.params for r in first] == ['{"n": 2}', '{"n": 1}']
    assert all(r.state == "claimed" and r.lease_owner == "w1" and r.attempts == 1 for r in first)
    second = queue.claim("w2", limit=5, lease_s=60)
    assert [r.params for r in second] == ['{"n": 3}']
    assert queue.claim("w3", limit=5, lease_s=60) == []


def test_completing_is_idempotent_and_needs_the_lease(queue) -> None:  # type: ignore[no-untyped-def]
    (a,) = queue.enqueue([job(1)])
    queue.claim("w1", limit=1, lease_s=60)
    assert queue.complete("w2", [(a.id, "k" * 64, 10)]) == 0  # not its lease
    assert queue.complete("w1", [(a.id, "k" * 64, 10)]) == 1
    assert queue.complete("w1", [(a.id, "x" * 64, 99)]) == 0  # late duplicate
    row = queue.get(a.id)
    assert (row.state, row.result_key, row.result_bytes) == ("completed", "k" * 64, 10)


def test_failure_retries_with_backoff_then_fails(queue) -> None:  # type: ignore[no-untyped-def]
    (a,) = queue.enqueue([job(1, max_attempts=2)])
    queue.claim("w", limit=1, lease_s=60)
    assert queue.fail("w", [(a.id, "boom")], retry_in_s=30)["retried"] == 1
    row = queue.get(a.id)
    assert row.state == "queued" and row.not_before > time.time() + 20 and row.error == "boom"
    assert queue.claim("w", limit=1, lease_s=60) == []  # not before its time
    queue.fail("w", [], retry_in_s=0)
    with queue.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET not_before = 0")
    queue.claim("w", limit=1, lease_s=60)
    assert queue.fail("w", [(a.id, "boom again")], retry_in_s=0)["failed"] == 1
    assert queue.get(a.id).state == "failed"
    assert [x.outcome for x in queue.attempts_of(a.id)] == ["failed", "failed"]


def test_expired_lease_goes_back_to_the_queue(queue) -> None:  # type: ignore[no-untyped-def]
    (a,) = queue.enqueue([job(1)])
    queue.claim("dead-worker", limit=1, lease_s=0.01)
    time.sleep(0.05)
    (again,) = queue.claim("w2", limit=1, lease_s=60)
    assert again.id == a.id and again.lease_owner == "w2" and again.attempts == 2
    assert queue.lease_expired_counts() == {}
    assert queue.complete("dead-worker", [(a.id, "k" * 64, 1)]) == 0
    assert queue.fail("dead-worker", [(a.id, "late")], retry_in_s=0)["failed"] == 0
    assert queue.fail("dead-worker", [(a.id, "late")])["failed"] == 0
    # The late calls touched neither the job nor w2's attempt; the dead worker's says what happened.
    lost, current = queue.attempts_of(a.id)
    assert (lost.worker, lost.outcome, current.worker, current.outcome) == ("dead-worker", "lease expired", "w2", None)
    assert queue.complete("w2", [(a.id, "k" * 64, 1)]) == 1
    assert queue.attempts_of(a.id)[1].outcome == "completed"


def test_status_sees_expired_leases_and_waiting_retries(queue) -> None:  # type: ignore[no-untyped-def]
    a, b, c = queue.enqueue([job(1), job(2), job(3)])
    queue.claim("dead-worker", limit=2, lease_s=0.01)
    time.sleep(0.05)
    assert queue.lease_expired_counts() == {"claimed": 2}
    assert queue.waiting_count() == 3 and queue.waiting_count(backend="ndif") == 0
    (held,) = queue.claim("w", limit=1, lease_s=60)  # the claim requeues both, then takes one
    assert queue.lease_expired_counts() == {}
    queue.fail("w", [(held.id, "boom")], retry_in_s=60)
    n, first = queue.retry_waiting()
    assert n == 1 and first > time.time() + 50
    (other,) = queue.claim("w", limit=1, lease_s=60)
    queue.defer("w", [other.id], "waiting for NDIF to run m: NDIF lists it COLD", delay_s=30)
    assert queue.retry_waiting()[0] == 1, "a job held back for its model waits for no retry"


def test_defer_waits_without_spending_an_attempt(queue) -> None:  # type: ignore[no-untyped-def]
    (a,) = queue.enqueue([job(1, max_attempts=1)])
    (held,) = queue.claim("w", limit=1, lease_s=60)
    bundle = queue.start_bundle("w", "ndif", "m", [a.id])
    assert queue.defer("w", [a.id], "waiting for NDIF: down", delay_s=60, bundle_id=bundle) == 1
    assert queue.defer("w", [a.id], "waiting for NDIF: down", delay_s=60) == 0  # a second call: no-op
    row = queue.get(a.id)
    assert (row.state, row.attempts, row.error) == ("queued", 0, "waiting for NDIF: down")
    assert row.not_before > time.time() + 50 and queue.claim("w", limit=1, lease_s=60) == []
    assert queue.retry_waiting()[0] == 1
    assert [x.outcome for x in queue.attempts_of(a.id)] == ["deferred"]
    assert queue.bundle(bundle).state == "failed"


def test_dedup_joins_queued_and_serves_completed(queue) -> None:  # type: ignore[no-untyped-def]
    first, joined = queue.enqueue([job(1, key="a" * 64), job(2, key="a" * 64)])
    assert first.state == "queued" and joined.joined and joined.id == first.id
    queue.claim("w", limit=1, lease_s=60)
    queue.complete("w", [(first.id, "a" * 64, 5)])
    (cached,) = queue.enqueue([job(3, key="a" * 64)])
    assert cached.state == "cached" and cached.id != first.id
    assert queue.get(cached.id).result_key == "a" * 64
    (forced,) = queue.enqueue([job(4, key="a" * 64, force=True)])
    assert forced.state == "queued"


def test_cancel_retry_counts_and_lookup(queue) -> None:  # type: ignore[no-untyped-def]
    a, b = queue.enqueue([job(1, tags=["x"]), job(2)])
    assert queue.cancel([a.id]) == {a.id: "cancelled"}
    assert queue.retry([a.id]) == {a.id: "queued"}
    assert queue.counts()["queued"] == 2
    assert [r.id for r in queue.list_jobs(tag="x")] == [a.id]
    assert queue.get(a.id[:6]).id == a.id
    assert queue.get(f"{1:064x}").id == a.id  # by cache key
    assert queue.stored_bytes() == 0


def test_release_returns_jobs_untouched(queue) -> None:  # type: ignore[no-untyped-def]
    (a,) = queue.enqueue([job(1)])
    queue.claim("w", limit=1, lease_s=60)
    assert queue.release("w") == 1
    row = queue.get(a.id)
    assert row.state == "queued" and row.attempts == 0 and row.lease_owner is None
    assert [x.outcome for x in queue.attempts_of(a.id)] == ["released"]


def test_batched_enqueue_of_many(queue) -> None:  # type: ignore[no-untyped-def]
    out = queue.enqueue([job(i) for i in range(2000)])
    assert len({o.id for o in out}) == 2000
    assert queue.counts()["queued"] == 2000


def test_stored_bytes_count_each_result_once_until_gc_detaches_it(queue) -> None:  # type: ignore[no-untyped-def]
    a, b, c = queue.enqueue([job(1), job(2), job(3)])
    queue.claim("w", limit=3, lease_s=60)
    queue.complete("w", [(a.id, "r" * 64, 100), (b.id, "r" * 64, 100), (c.id, "s" * 64, 20)])
    queue.enqueue([job(4, key=f"{1:064x}")])  # served from the store: no new bytes
    assert queue.stored_bytes() == 120
    assert queue.detach_results(["r" * 64], "result removed by gc") == ["r" * 64]
    assert queue.stored_bytes() == 20


def test_count_jobs_and_offset_agree_with_the_listed_rows(queue) -> None:  # type: ignore[no-untyped-def]
    queue.enqueue([job(n, tags=["x"] if n % 2 else []) for n in range(7)])
    everything = queue.list_jobs(limit=None)
    assert queue.count_jobs() == 7 and queue.count_jobs(tag="x") == 3 and queue.count_jobs(state="failed") == 0
    assert queue.list_jobs(limit=2, offset=3) == everything[3:5]
    assert queue.list_jobs(limit=None, offset=5) == everything[5:]
    assert queue.list_jobs(limit=3, offset=7) == []


def test_one_submission_at_a_time_joins_serves_or_queues_as_a_batch_would(queue) -> None:  # type: ignore[no-untyped-def]
    (first,) = queue.enqueue([job(1, key="b" * 64)])
    (joined,) = queue.enqueue([job(2, key="b" * 64)])
    (by_old_key,) = queue.enqueue([job(3, key="c" * 64, aliases=("b" * 64,))])
    assert first.state == "queued" and not first.joined
    assert joined.joined and joined.id == first.id and by_old_key.joined and by_old_key.id == first.id
    assert queue.count_jobs() == 1
    queue.claim("w", limit=1, lease_s=60)
    queue.complete("w", [(first.id, "b" * 64, 5)])
    (cached,) = queue.enqueue([job(4, key="b" * 64)])
    assert cached.state == "cached" and queue.get(cached.id).result_key == "b" * 64
    # A re-run (its first run's COMMIT lost unseen) finds the job by id instead of queueing it twice.
    again = job(5, key="d" * 64)
    assert queue.enqueue([again])[0].state == "queued"
    assert queue._enqueue_new_key(again, time.time(), rerun=True).id == again.id
    assert queue.count_jobs(state="queued") == 1


def test_a_single_submission_of_a_new_key_is_one_statement_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its whole cost is one commit: no BEGIN and COMMIT round trips around a lookup and an insert."""
    database = open_database(f"sqlite:///{tmp_path / 'q.db'}")
    queue = Queue(database)
    queue.enqueue([job(1)])  # the pool now holds one idle connection, which the next call takes
    conn = database._sqlite_connect()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    database._sqlite_release(conn)
    (new,) = queue.enqueue([job(2)])
    conn.set_trace_callback(None)
    assert len(statements) == 1 and statements[0].startswith("INSERT INTO jobs"), statements
    (joined,) = queue.enqueue([job(3, key=f"{2:064x}")])
    assert new.state == "queued" and joined.joined and joined.id == new.id
    assert queue.count_jobs() == 2
    dispose_engines()


def test_ndifs_job_id_is_committed_with_a_full_sync_and_an_ordinary_write_is_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The queue's commits may be lost to a power cut (`synchronous = NORMAL`), but not the one
    that records NDIF's job id: lost, the request would be sent to NDIF a second time."""
    from ndif_jobs.db.remote import RemoteBundles

    database = open_database(f"sqlite:///{tmp_path / 'q.db'}")
    queue = Queue(database)
    ids = [r.id for r in queue.enqueue([job(1), job(2)])]
    queue.claim("w", 2, 60, backend="local")
    bundle = queue.start_bundle("w", "ndif", "local:m", ids)
    conn = database._sqlite_connect()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    database._sqlite_release(conn)
    queue.enqueue([job(3)])  # an ordinary write
    ordinary = len(statements)
    RemoteBundles(database).mark_submitted("w", bundle, "ndif-1", ids, None)
    conn.set_trace_callback(None)
    before, submitted = statements[:ordinary], statements[ordinary:]
    assert not any("synchronous" in s for s in before), before
    assert submitted[0] == "PRAGMA synchronous = FULL" and submitted[-1] == "PRAGMA synchronous = NORMAL", submitted
    assert "COMMIT" in submitted[-2] and any(s.startswith("UPDATE bundles") for s in submitted), submitted
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again for whoever takes it next
    assert queue.bundle(bundle).remote_job_id == "ndif-1"
    dispose_engines()
