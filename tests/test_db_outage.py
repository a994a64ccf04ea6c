"""The queue database briefly unavailable: workers ride it out, or past the window stop cleanly.

Real PostgreSQL, real worker processes, a real outage: the database refuses new connections
(`ALLOW_CONNECTIONS false`) and every session on it is terminated, then it comes back. Each test
gets its own database (`ndif_outage`, dropped and made again), so nothing else on the server is
touched, and `ALLOW_CONNECTIONS` is always restored and the database dropped at the end.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ndif_jobs.db.engine import Database, dispose_engines, open_database
from ndif_jobs.db.queue import NewJob, Queue
from ndif_jobs.db.remote import RemoteBundles
from ndif_jobs.db.retry import is_transient
from ndif_jobs.errors import StoreError
from ndif_jobs.logging import configure_logging

from .conftest import POSTGRES_URL, REPO, run_cli, wait_until

NAME = "ndif_outage"
RETRY_EVENT = "queue database unreachable: retrying"

PROBE = '''
import os, time
from ndif_jobs import experiment, Params
from ndif_jobs.experiments.access import blocks, hidden

class P(Params):
    n: int
    log: str
    sleep_s: float = 0.0

@experiment("outage-probe", params=P)
def outage_probe(model, p):
    # One line per execution (O_APPEND: each small write is atomic), then a pause that keeps the
    # workers busy long enough for the outage to land mid-run.
    fd = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{p['n']} {os.getpid()}\\n".encode())
    os.close(fd)
    time.sleep(p["sleep_s"])
    with model.trace("hello"):
        h = hidden(blocks(model)[0].output).sum().save()
    return {"n": p["n"], "h": h}
'''


# -- the database and its outage --------------------------------------------------------------


def _url(database: str, password: str | None = None) -> str:
    """POSTGRES_URL pointed at another database (SQLAlchemy form, for ndif-jobs)."""
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL).set(database=database)
    if password is not None:
        url = url.set(password=password)
    return url.render_as_string(hide_password=False)


def _conninfo(database: str) -> str:
    """The same for psycopg itself (no `+psycopg` driver suffix)."""
    from sqlalchemy.engine import make_url

    return make_url(_url(database)).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement on the server's `postgres` database, never on the one being taken down."""
    with psycopg.connect(_conninfo("postgres"), autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def _allow_connections(allowed: bool) -> None:
    _admin(f'ALTER DATABASE "{NAME}" ALLOW_CONNECTIONS {"true" if allowed else "false"}')


def _terminate_sessions() -> None:
    _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
           NAME)


@contextmanager
def database_down() -> Iterator[None]:
    """The database refuses every new connection and loses every open one, until the block ends."""
    try:
        _allow_connections(False)
        _terminate_sessions()
        yield
    finally:
        _allow_connections(True)


@pytest.fixture
def outage_url() -> Iterator[str]:
    """A fresh, empty database for one test, always accepting connections again and dropped after."""
    _admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{NAME}"')
    try:
        yield _url(NAME)
    finally:
        dispose_engines()
        try:
            _allow_connections(True)
        finally:
            _admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')


def _completed() -> int:
    with psycopg.connect(_conninfo(NAME)) as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE state = 'completed'").fetchone()[0]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """This process's structlog output, as JSON lines."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    yield stream
    import structlog

    structlog.reset_defaults()


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _job(n: int, **kw: Any) -> NewJob:
    return NewJob(key=f"{n:064x}", experiment="activations", model="m", model_key="local:m", backend="local",
                  params={"n": n}, **kw)


# -- fast checks: what is retried, what is not, and how it ends ---------------------------------


def test_only_errors_that_mean_unreachable_or_locked_are_transient() -> None:
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert is_transient(sqlite3.OperationalError("database is busy"))
    assert not is_transient(sqlite3.OperationalError("no such table: jobs"))
    assert not is_transient(sqlite3.IntegrityError("UNIQUE constraint failed: jobs.id"))
    assert is_transient(psycopg.OperationalError("connection failed: Connection refused"))
    assert is_transient(psycopg.errors.AdminShutdown("terminating connection due to administrator command"))
    assert not is_transient(psycopg.errors.UniqueViolation("duplicate key"))
    assert not is_transient(psycopg.errors.SyntaxError("syntax error"))
    assert not is_transient(psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))
    assert not is_transient(ValueError("a bug"))


def test_read_commands_load_no_retry_machinery(env: dict[str, str]) -> None:
    """Retrying costs a healthy `status` nothing: no SQLAlchemy, driver, tenacity or structlog."""
    run_cli("submit", "activations", "-p", "prompt=Hi", env=env, check=True)
    code = (
        "import sys; sys.argv = ['ndif-jobs', 'status']\n"
        "from ndif_jobs.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', [m for m in ('sqlalchemy', 'psycopg', 'tenacity', 'structlog') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out, out[-500:]


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_rerun_after_an_unseen_commit_does_nothing_twice(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each transaction run twice, as a retry after a COMMIT whose answer was lost would run it."""
    url = f"sqlite:///{tmp_path / 'q.db'}" if dialect == "sqlite" else request.getfixturevalue("outage_url")
    queue = Queue(open_database(url))
    try:
        jobs = [_job(1, force=True), _job(2), _job(3)]
        t = time.time()
        first = queue._enqueue(jobs, t, rerun=False)
        again = queue._enqueue(jobs, t, rerun=True)  # force=True would hit the primary key without the check
        assert again == first and queue.counts()["queued"] == 3

        claimed = queue._claim("w1", 2, 60.0, None, t, earlier=[])
        reclaimed = queue._claim("w1", 2, 60.0, None, t + 5, earlier=[t])
        assert sorted(r.id for r in reclaimed) == sorted(r.id for r in claimed)
        assert all(r.attempts == 1 and r.lease_expires_at == t + 65 for r in queue.get_many([r.id for r in claimed]))
        assert all(len(queue.attempts_of(r.id)) == 1 for r in claimed)
        assert queue.counts()["queued"] == 1, "the re-run must not claim more"

        ids = [r.id for r in claimed]
        queue._start_bundle("b0000001", "w1", "ndif", "local:m", ids, rerun=False)
        queue._start_bundle("b0000001", "w1", "ndif", "local:m", ids, rerun=True)
        assert queue.bundle("b0000001").job_count == 2

        remote = RemoteBundles(queue.engine)
        remote.mark_submitted("w1", "b0000001", "ndif-1", ids, deadline=None)
        remote.mark_submitted("w1", "b0000001", "ndif-1", ids, deadline=None)
        assert [h["status"] for h in json.loads(queue.bundle("b0000001").status_history)] == ["SUBMITTED"]
        remote.hand_back("w1")  # the worker stops: the next one re-attaches
        t2 = time.time() + 1
        taken = remote._take_over("w2", 60.0, 16, t2, earlier=[])
        retaken = remote._take_over("w2", 60.0, 16, t2 + 5, earlier=[t2])
        assert [(b.id, sorted(j.id for j in held)) for b, held in retaken] == \
            [(b.id, sorted(j.id for j in held)) for b, held in taken] == [("b0000001", sorted(ids))]
        assert all(len(queue.attempts_of(i)) == 2 for i in ids), "one lost attempt and one re-attached, no more"
        assert all(j.lease_owner == "w2" and j.lease_expires_at == t2 + 65 for j in queue.get_many(ids))
    finally:
        dispose_engines()


@pytest.mark.postgres
def test_no_window_fails_at_once_in_one_line_without_the_password(outage_url: str, captured_logs: io.StringIO) -> None:
    # Trust authentication ignores the password: it is there to be hidden.
    queue = Queue(open_database(_url(NAME, password="s3cret-pw")), db_retry_s=0)
    queue.enqueue([_job(1)])
    with database_down():
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            queue.counts()
        assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "\n" not in message and "s3cret-pw" not in message
    assert message.startswith("the queue database postgresql+psycopg://") and NAME in message
    assert "unreachable" in message and "NDIF_JOBS_DB_RETRY_S=0" in message
    assert RETRY_EVENT not in captured_logs.getvalue()
    assert queue.counts()["queued"] == 1, "the next call works once the database is back"


@pytest.mark.postgres
def test_retries_until_the_database_is_back_and_never_retries_a_bug(
    outage_url: str, captured_logs: io.StringIO
) -> None:
    queue = Queue(open_database(_url(NAME, password="s3cret-pw")), db_retry_s=60)
    queue.enqueue([_job(1)])
    with database_down():
        back = threading.Timer(1.5, _allow_connections, args=(True,))
        back.start()
        started = time.monotonic()
        counts = queue.counts()
        back.join()
    assert counts["queued"] == 1 and time.monotonic() - started >= 1.4
    retries = [e for e in _events(captured_logs.getvalue()) if e["event"] == RETRY_EVENT]
    assert retries and all(e["operation"] == "counts" and e["level"] == "warning" for e in retries)
    assert 0 < retries[0]["retry_in_s"] <= 0.1 and all(e["retry_in_s"] <= 2.0 for e in retries)
    assert "s3cret-pw" not in captured_logs.getvalue() and NAME in retries[0]["database"]

    # A unique-key violation is a bug, not an outage: it surfaces at once, untouched.
    seen = len(captured_logs.getvalue())
    started = time.monotonic()
    with pytest.raises(psycopg.errors.UniqueViolation):
        queue.enqueue([_job(2, id="abcdef012345", force=True), _job(3, id="abcdef012345", force=True)])
    assert time.monotonic() - started < 2
    assert RETRY_EVENT not in captured_logs.getvalue()[seen:]


@pytest.mark.postgres
def test_a_connection_lost_mid_transaction_is_never_reused(outage_url: str) -> None:
    from sqlalchemy import create_engine

    # No pre-ping and one pooled connection: were the dead connection returned to the pool, the
    # next call would get it and fail.
    engine = create_engine(outage_url, pool_size=1, max_overflow=0)
    Queue(open_database(outage_url))  # the schema
    database = Database.wrap(engine)
    try:
        with database.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (first_pid,) = cur.fetchone()
        with pytest.raises(psycopg.OperationalError):
            with database.cursor(write=True) as cur:
                cur.execute("UPDATE jobs SET priority = 1")
                _terminate_sessions()
                cur.execute("SELECT count(*) FROM jobs")
        with database.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (second_pid,) = cur.fetchone()
        assert second_pid != first_pid
    finally:
        engine.dispose()

    # The queue's own engine pings what it hands out: connections the server dropped while idle
    # are replaced without an error or a retry.
    queue = Queue(open_database(outage_url), db_retry_s=0)
    queue.counts()
    _terminate_sessions()
    assert queue.counts()["queued"] == 0


# -- real workers through a real outage -------------------------------------------------------


def _setup_jobs(env: dict[str, str], tmp_path: Path, tiny_llama: Path, url: str, n_jobs: int, sleep_s: float,
                **settings: str) -> dict[str, str]:
    """Queue `n_jobs` probe jobs on `url`; returns the workers' environment."""
    (tmp_path / "outage_probe.py").write_text(PROBE)
    env = {**env, "NDIF_JOBS_DATABASE_URL": url, "NDIF_JOBS_STORE_LOCAL_OK": "1", "NDIF_JOBS_IMPORTS": "outage_probe", "PYTHONPATH": str(tmp_path),
           "NDIF_JOBS_MAX_BUNDLE": "1", **settings}
    log = tmp_path / "executions.log"
    params = [{"n": i, "log": str(log), "sleep_s": sleep_s} for i in range(n_jobs)]
    (tmp_path / "params.json").write_text(json.dumps(params))
    run_cli("submit", "outage-probe", "--model", str(tiny_llama), "--params-file", str(tmp_path / "params.json"),
            env=env, check=True)
    return env


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ndif-jobs worker --until-empty`, its stderr (JSON log lines, and any error) into `log`."""
    with log.open("w") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker", "--until-empty"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _started(log: Path) -> bool:
    return any(e.get("event") == "worker started" for e in _events(log.read_text()))


def _check_outcome(env: dict[str, str], home: Path, tmp_path: Path, n_jobs: int) -> None:
    """Every job completed, one result folder per key, every attempt explained, `verify` clean."""
    status = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
    assert status["counts"]["completed"] == n_jobs, status["counts"]
    with psycopg.connect(_conninfo(NAME)) as conn:
        jobs = conn.execute('SELECT id, "key", state, attempts, params, result_key FROM jobs').fetchall()
        outcomes: dict[str, list[str | None]] = {}
        for job_id, outcome in conn.execute("SELECT job_id, outcome FROM attempts ORDER BY number"):
            outcomes.setdefault(job_id, []).append(outcome)
    assert len(jobs) == n_jobs and {state for _, _, state, _, _, _ in jobs} == {"completed"}

    executions = Counter(int(line.split()[0]) for line in (tmp_path / "executions.log").read_text().splitlines())
    assert sorted(executions) == list(range(n_jobs)), "a job was never run"
    for job_id, key, _, attempts, params, result_key in jobs:
        # An attempt beyond the first is only ever one whose worker stopped renewing its lease.
        lost = outcomes[job_id].count("lease expired")
        assert 1 <= attempts <= 1 + lost, (job_id, attempts, outcomes[job_id])
        # A worker found gone on its host gives its attempt back: that run is not counted.
        assert executions[json.loads(params)["n"]] <= attempts + outcomes[job_id].count("worker gone"), (job_id, attempts)
        assert result_key == key

    # Exactly one result folder per key, no half-written leftovers; `verify` re-hashes them all.
    results = home / "results"
    folders = [p for p in results.glob("*/*") if p.is_dir() and not p.parent.name.startswith(".")]
    assert sorted(p.name for p in folders) == sorted(key for _, key, _, _, _, _ in jobs)
    assert not [p for p in results.iterdir() if p.name.startswith((".tmp-", ".trash-", ".corrupt-"))]
    with psycopg.connect(_conninfo(NAME)) as conn:
        (identity,) = conn.execute("SELECT id FROM queue_identity").fetchone()
    assert [p.name for p in (results / ".queues").iterdir()] == [identity]  # the store's one queue
    proc = run_cli("verify", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["checked"] == n_jobs and report["ok"] == n_jobs and not report["problems"]


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_ride_out_a_database_outage(
    env: dict[str, str], home: Path, tmp_path: Path, tiny_llama: Path, outage_url: str
) -> None:
    n_jobs, outage_s = 30, 7.0
    # A lease well past the outage: no job should need a second attempt.
    env = _setup_jobs(env, tmp_path, tiny_llama, outage_url, n_jobs, sleep_s=0.4, NDIF_JOBS_LEASE_S="30")
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [_start_worker(env, log) for log in logs]
    try:
        # Every worker has opened the database (its first step), and some jobs are done.
        wait_until(lambda: all(_started(log) for log in logs), 300, "every worker started")
        wait_until(lambda: _completed() >= 3, 120, "some jobs completed")
        with database_down():
            time.sleep(0.5)
            # `status` during the outage says so in one line; it never shows made-up counts.
            down = run_cli("status", "--json", env={**env, "NDIF_JOBS_DB_RETRY_S": "0"})
            assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
            assert down.stderr.strip().startswith("error: ") and len(down.stderr.strip().splitlines()) == 1
            assert NAME in down.stderr
            time.sleep(outage_s - 0.5)
        assert _completed() < n_jobs, "the outage came too late to test anything"
        for worker in workers:
            worker.wait(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    texts = [log.read_text() for log in logs]
    assert [w.returncode for w in workers] == [0, 0, 0], [t[-2000:] for t in texts]
    for text in texts:
        assert "Traceback" not in text
        assert any(e.get("event") == RETRY_EVENT for e in _events(text)), "a worker never met the outage"
    _check_outcome(env, home, tmp_path, n_jobs)


@pytest.mark.slow
@pytest.mark.postgres
def test_an_outage_past_the_window_stops_the_worker_and_loses_nothing(
    env: dict[str, str], home: Path, tmp_path: Path, tiny_llama: Path, outage_url: str
) -> None:
    n_jobs = 8
    # A short lease, so that the next worker takes back what the stopped one held in seconds.
    env = _setup_jobs(env, tmp_path, tiny_llama, outage_url, n_jobs, sleep_s=0.4,
                      NDIF_JOBS_LEASE_S="3", NDIF_JOBS_DB_RETRY_S="2")
    log = tmp_path / "worker-1.log"
    worker = _start_worker(env, log)
    try:
        wait_until(lambda: _started(log), 300, "the worker started")
        wait_until(lambda: _completed() >= 1, 120, "a job completed")
        with database_down():
            # Down until the worker has given up: the call that met the outage, then the release of
            # its jobs on the way out, each retried for the 2 s window.
            worker.wait(timeout=120)
        assert _completed() < n_jobs
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    assert worker.returncode == 1, text[-2000:]
    assert "Traceback" not in text
    others = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
    assert len(others) == 1 and others[0].startswith("error: the queue database "), others
    assert "unreachable for" in others[0] and "NDIF_JOBS_DB_RETRY_S=2" in others[0] and NAME in others[0]
    assert any(e.get("event") == RETRY_EVENT for e in _events(text))

    # The database is back: a later worker takes over what the stopped one held and finishes.
    with psycopg.connect(_conninfo(NAME)) as conn:
        held = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE lease_owner IS NOT NULL")]
    later = run_cli("worker", "--until-empty", env={**env, "NDIF_JOBS_DB_RETRY_S": "120"}, timeout=600)
    assert later.returncode == 0, later.stderr[-3000:]
    _check_outcome(env, home, tmp_path, n_jobs)
    with psycopg.connect(_conninfo(NAME)) as conn:
        for job_id in held:
            rows = conn.execute("SELECT outcome FROM attempts WHERE job_id = %s ORDER BY id", (job_id,))
            outcomes = [outcome for (outcome,) in rows]
            # The stopped worker's process is gone: this host's next worker takes its jobs back at once.
            lost = [o for o in outcomes if o in ("lease expired", "worker gone")]
            assert len(lost) == 1 and outcomes[-1] == "completed", (job_id, outcomes)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_started_during_an_outage_waits_for_the_database(
    env: dict[str, str], home: Path, tmp_path: Path, tiny_llama: Path, outage_url: str
) -> None:
    """A worker started (by cron, systemd...) while the database is down waits for it, within
    `NDIF_JOBS_DB_RETRY_S`, and then runs the queue; a command a person types fails at once."""
    n_jobs = 3
    env = _setup_jobs(env, tmp_path, tiny_llama, outage_url, n_jobs, sleep_s=0.0, NDIF_JOBS_DB_RETRY_S="120")
    log = tmp_path / "worker.log"
    with database_down():
        worker = _start_worker(env, log)
        try:
            def waiting() -> bool:
                return any(e.get("event") == RETRY_EVENT and e.get("operation") == "open the database"
                           for e in _events(log.read_text()))

            wait_until(lambda: waiting() or worker.poll() is not None, 120, "the worker met the outage")
            assert worker.poll() is None, log.read_text()[-2000:]
            started = time.monotonic()
            status = run_cli("status", env=env)
            assert status.returncode == 1 and time.monotonic() - started < 30, status.stderr
            assert status.stderr.startswith("error: ") and NAME in status.stderr
            assert len(status.stderr.strip().splitlines()) == 1
            time.sleep(2.0)
            assert worker.poll() is None, log.read_text()[-2000:]  # still waiting, not given up
        except BaseException:
            worker.kill()
            worker.wait()
            raise
    worker.wait(timeout=300)
    text = log.read_text()
    assert worker.returncode == 0 and "Traceback" not in text, text[-2000:]
    _check_outcome(env, home, tmp_path, n_jobs)
