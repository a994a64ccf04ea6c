"""A worker claims only the jobs it can run, and takes a dead worker's jobs back at once.

Real worker processes on a real SQLite file; the claim's filter and the take-back also on the
real PostgreSQL server. A `--backend local` worker leaves NDIF jobs without a stand-in queued
for NDIF; a worker that has not loaded an experiment leaves its jobs queued, says so once, and
`status` shows them waiting for a worker that can; a worker SIGKILLed mid-bundle has its jobs
taken back by the next worker on its host at once, with no attempt spent; a lease held from
another host is waited out, and the wait is logged with its end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ndif_jobs.db.engine import dispose_engines, open_database
from ndif_jobs.db.queue import NewJob, Queue

from .conftest import REPO, run_cli, wait_until
from .test_workers import PROBE  # `count-me`: one line per execution

NAP = '''
import os, time
from ndif_jobs import experiment, Params

class P(Params):
    n: int
    log: str

@experiment("nap", params=P)
def nap(model, p):
    fd = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{p['n']} {os.getpid()}\\n".encode())
    os.close(fd)
    time.sleep(float(os.environ.get("NAP_S", "0")))
    return {"n": p["n"]}
'''

ACTIVATIONS = {"prompt": "Hello there", "layers": [0], "top_k": 2}


# -- helpers ---------------------------------------------------------------------------------------


def _module_env(env: dict[str, str], tmp_path: Path, name: str, source: str) -> dict[str, str]:
    """`env` with the experiment module `name` importable and imported (NDIF_JOBS_IMPORTS)."""
    (tmp_path / f"{name}.py").write_text(source)
    return {**env, "NDIF_JOBS_IMPORTS": name, "PYTHONPATH": str(tmp_path)}


def _submit(env: dict[str, str], tmp_path: Path, experiment: str, model: Path, params: list[dict]) -> list[str]:
    path = tmp_path / f"params-{experiment}.json"
    path.write_text(json.dumps(params))
    doc = json.loads(run_cli("submit", experiment, "-m", str(model), "--params-file", str(path), "--json",
                             env=env, check=True).stdout)
    return [row["id"] for row in (doc if isinstance(doc, list) else [doc])]


def _show(env: dict[str, str], job_id: str) -> dict:
    return json.loads(run_cli("show", job_id, "--json", env=env, check=True).stdout)


def _status(env: dict[str, str]) -> dict:
    return json.loads(run_cli("status", "--json", env=env, check=True).stdout)


def _logs(stderr: str, event_start: str) -> list[dict]:
    """The worker's JSON log lines whose event starts with `event_start`."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event", "").startswith(event_start)]


def _queue(home: Path) -> Queue:
    return Queue(open_database(f"sqlite:///{home / 'queue.db'}"))


# -- item 4: a local worker leaves NDIF jobs without a stand-in to NDIF -------------------------------


@pytest.mark.slow
def test_local_worker_leaves_ndif_jobs_without_a_standin_queued_for_ndif(env, home, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    env = {**env, "NDIF_JOBS_LOCAL_STANDINS": json.dumps({"org/has-standin": str(tiny_llama)}),
           "NDIF_JOBS_RETRY_BACKOFF_S": "0.05"}
    (local_id,) = _submit(env, tmp_path, "activations", tiny_llama, [ACTIVATIONS])
    queue = _queue(home)
    ndif = [NewJob(key=f"{n:064x}", experiment="activations", model=model, model_key=f"hf:{model}@main",
                   backend="ndif", params=ACTIVATIONS) for n, model in enumerate(("org/no-standin", "org/has-standin"))]
    no_standin, standin = (e.id for e in queue.enqueue(ndif))
    dispose_engines()

    proc = run_cli("worker", "-b", "local", "--until-empty", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    left = _show(env, no_standin)
    assert (left["state"], left["backend"], left["model"], left["attempts"]) == ("queued", "ndif", "org/no-standin", 0)
    assert left["attempt_history"] == [], "claimed and given back: the claim must not take it at all"
    ran = _show(env, standin)
    assert (ran["state"], ran["backend"], ran["model"]) == ("completed", "local", str(tiny_llama))
    assert _show(env, local_id)["state"] == "completed"
    said = _logs(proc.stderr, "leaving NDIF jobs to an NDIF worker")
    assert [(s["model"], s["jobs"]) for s in said] == [("org/no-standin", 1)]


# -- item 5: a worker that has not loaded an experiment leaves its jobs queued ------------------------


@pytest.mark.slow
def test_worker_without_an_experiment_leaves_its_jobs_queued_says_why_once_and_status_shows_them(
    env, home, tmp_path, tiny_llama
) -> None:  # type: ignore[no-untyped-def]
    with_module = _module_env(env, tmp_path, "count_probe", PROBE)
    log = tmp_path / "executions.log"
    own = _submit(with_module, tmp_path, "count-me", tiny_llama, [{"n": i, "log": str(log)} for i in range(3)])
    (builtin,) = _submit(env, tmp_path, "activations", tiny_llama, [ACTIVATIONS])

    # A worker without the module: it runs what it can, then idles through several checks.
    worker = subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _show(env, builtin)["state"] in ("completed", "failed"), what="the built-in job")
        time.sleep(3.0)  # the unrunnable check runs every 5 polls (0.2 s each): several more checks
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr[-3000:]
    assert _show(env, builtin)["state"] == "completed"
    for job_id in own:
        shown = _show(env, job_id)
        assert (shown["state"], shown["attempts"], shown["attempt_history"]) == ("queued", 0, []), shown
        assert "waiting for a worker that can run experiment 'count-me'" in shown["error"]
    said = _logs(stderr, "leaving jobs of an experiment this worker has not loaded")
    assert len(said) == 1, said
    assert (said[0]["experiment"], said[0]["jobs"]) == ("count-me", 3)
    assert "NDIF_JOBS_IMPORTS" in said[0]["why"] and "--import" in said[0]["why"]

    assert _status(env)["waiting_for_worker"] == {"count-me": 3}
    shown_status = run_cli("status", env=env, check=True).stdout
    assert "3 queued jobs wait for a worker that can run them: count-me (3)" in " ".join(shown_status.split())

    # `--until-empty` ends when nothing it can run is left, the jobs still queued.
    drained = run_cli("worker", "--until-empty", env=env, timeout=60)
    assert drained.returncode == 0, drained.stderr[-3000:]
    assert _status(env)["counts"]["queued"] == 3

    # A worker that has the module runs them, and the note is gone.
    run_cli("worker", "--until-empty", env=with_module, check=True, timeout=300)
    assert [_show(env, j)["state"] for j in own] == ["completed"] * 3
    assert _status(env)["waiting_for_worker"] == {}


# -- item 8: a dead worker's jobs ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_workers_jobs_are_taken_back_at_once_with_no_attempt_spent(env, home, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    env = {**_module_env(env, tmp_path, "nap_probe", NAP), "NDIF_JOBS_LEASE_S": "300"}
    log = tmp_path / "executions.log"
    job_ids = _submit(env, tmp_path, "nap", tiny_llama, [{"n": i, "log": str(log)} for i in range(3)])

    stderr_path = tmp_path / "killed.log"
    with stderr_path.open("w") as stderr:
        victim = subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker"], env={**env, "NAP_S": "600"},
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_until(lambda: log.exists() and log.read_text().strip() != "", what="the bundle to be running")
        victim.kill()  # SIGKILL mid-bundle: no handler, no release
        victim.wait()
    (started,) = _logs(stderr_path.read_text(), "worker started")
    dead = started["worker"]

    before = _status(env)
    assert before["counts"]["running"] == 3
    assert before["held_by_gone_workers"] == [{"worker": dead, "where": f"pid {victim.pid} on this host", "jobs": 3}]
    assert "held by a worker that is gone" in run_cli("status", env=env, check=True).stdout

    t0 = time.monotonic()
    proc = run_cli("worker", "--until-empty", env=env, timeout=120)  # the lease is 300 s: not waited out
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    (took,) = _logs(proc.stderr, "took back the jobs of a worker that is gone")
    assert (took["worker"], took["requeued"], took["attempt_spent"]) == (dead, 3, False)
    for job_id in job_ids:
        shown = _show(env, job_id)
        assert (shown["state"], shown["attempts"]) == ("completed", 1), shown
        outcomes = [a["outcome"] for a in shown["attempt_history"]]
        assert outcomes == ["worker gone", "completed"], outcomes
    after = _status(env)
    assert after["held_by_gone_workers"] == [] and after["counts"]["completed"] == 3


@pytest.mark.slow
def test_a_lease_held_from_another_host_is_waited_out_and_the_wait_logged_with_its_end(
    env, home, tmp_path, tiny_llama
) -> None:  # type: ignore[no-untyped-def]
    env = _module_env(env, tmp_path, "count_probe", PROBE)
    log = tmp_path / "executions.log"
    job_ids = _submit(env, tmp_path, "count-me", tiny_llama, [{"n": i, "log": str(log)} for i in range(2)])
    elsewhere = "other-host:4242:1700000000:beef"  # another host: its pid means nothing here
    queue = _queue(home)
    (held,) = queue.claim(elsewhere, limit=1, lease_s=600.0)  # outlasts the worker's start, however slow

    stderr_path = tmp_path / "worker.log"
    with stderr_path.open("w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker", "--until-empty"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until(lambda: _logs(stderr_path.read_text(), "waiting for jobs another worker holds") != [],
                       timeout=300, what="the worker to say whose lease it waits out")
            # The other host's lease runs out now (rather than in ten minutes): the job comes back.
            with queue.db.cursor(write=True) as cur:
                cur.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ?", (time.time() - 1, held.id))
            assert worker.wait(timeout=120) == 0, stderr_path.read_text()[-3000:]
        finally:
            worker.kill()
    dispose_engines()
    logged = stderr_path.read_text()
    waits = _logs(logged, "waiting for jobs another worker holds")
    assert len(waits) == 1, waits
    assert (waits[0]["worker"], waits[0]["jobs"], waits[0]["where"]) == (elsewhere, 1, "pid 4242 on host other-host")
    assert waits[0]["lease_until"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.lease_expires_at))
    assert _logs(logged, "took back") == []
    assert [_show(env, j)["state"] for j in job_ids] == ["completed", "completed"]
    assert [a["outcome"] for a in _show(env, held.id)["attempt_history"]] == ["lease expired", "completed"]


def test_a_worker_is_judged_gone_only_on_its_own_host_and_by_its_process_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import owners

    me = owners.new_worker_id()
    host, pid, started, _ = me.split(":")
    assert (host, int(pid)) == (owners.this_host(), os.getpid())
    assert not owners.is_gone(me)
    # The pid is alive but was given to a process that started at another time: pid reuse.
    assert owners.is_gone(f"{host}:{pid}:{int(started) - 3600}:0000")

    exited = subprocess.Popen(["true"])
    exited.wait()
    assert owners.is_gone(f"{host}:{exited.pid}:{started}:0000")
    zombie = subprocess.Popen(["true"])  # exits, never reaped: its pid exists as a zombie
    wait_until(lambda: owners.process_started(zombie.pid) is None, timeout=10, what="the child to exit")
    assert owners.is_gone(f"{host}:{zombie.pid}:{started}:0000")
    zombie.wait()

    assert not owners.is_gone(f"not-{socket.gethostname()}:{exited.pid}:{started}:0000"), "another host: never judged"
    assert not owners.is_gone(f"{socket.gethostname()}:{exited.pid}:0000"), "an id in the older form: never judged"
    assert not owners.is_gone("w1")


# -- the claim's SQL, on SQLite and PostgreSQL ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request, tmp_path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'q.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    yield Queue(open_database(url))
    dispose_engines()


def _job(n: int, experiment: str = "activations", backend: str = "local", model: str = "m") -> NewJob:
    return NewJob(key=f"{n:064x}", experiment=experiment, model=model, model_key=f"k:{model}", backend=backend,
                  params={"n": n})


def test_claim_takes_only_what_the_worker_can_run_and_never_touches_the_rest(queue) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.db.queue import Runnable

    local, unknown, no_standin, standin = (e.id for e in queue.enqueue([
        _job(1), _job(2, experiment="mine"), _job(3, backend="ndif", model="big"), _job(4, backend="ndif", model="small"),
    ]))
    untouched = {j.id: j.updated_at for j in queue.get_many([unknown, no_standin])}
    here = Runnable(backend="local", standins=("small",), experiments=("activations",))
    assert queue.waiting_count(runnable=here) == 2

    claimed = queue.claim("w-local", limit=10, lease_s=60, runnable=here)
    assert sorted(j.id for j in claimed) == sorted([local, standin])
    for job in queue.get_many([unknown, no_standin]):
        assert (job.state, job.attempts, job.lease_owner, job.updated_at) == ("queued", 0, None, untouched[job.id])
        assert queue.attempts_of(job.id) == [], "claimed then given back: the filter must be in the claim"
    assert queue.claim("w-local", limit=10, lease_s=60, runnable=here) == []
    assert queue.waiting_count(runnable=here) == 2  # the two it holds
    assert sorted(queue.unrunnable(here)) == [("activations", "ndif", "big", 1, 0), ("mine", "local", "m", 1, 0)]

    # An NDIF worker takes the NDIF job the local worker left; nobody takes the unknown experiment.
    (ndif,) = queue.claim("w-ndif", limit=10, lease_s=60, runnable=Runnable(backend="ndif", experiments=("activations",)))
    assert ndif.id == no_standin and ndif.backend == "ndif"
    assert queue.claim("w-any", limit=10, lease_s=60, runnable=Runnable(experiments=("activations",))) == []

    assert queue.note_unrunnable("mine", "local", "experiment 'mine': not loaded") == 1
    assert queue.note_unrunnable("mine", "local", "experiment 'mine': not loaded") == 0  # said already
    assert queue.needs_worker_counts() == {"mine": 1}
    (mine,) = queue.claim("w-mine", limit=10, lease_s=60, runnable=Runnable(experiments=("mine",)))
    assert mine.id == unknown and mine.error is None and queue.needs_worker_counts() == {}


def test_take_back_requeues_a_gone_workers_jobs_without_spending_an_attempt(queue) -> None:  # type: ignore[no-untyped-def]
    queue.enqueue([_job(1), _job(2), _job(3)])
    mine = queue.claim("gone", limit=2, lease_s=300)
    (other,) = queue.claim("alive", limit=1, lease_s=300)
    bundle = queue.start_bundle("gone", "local", "k:m", [mine[0].id])

    assert queue.take_back("gone", "its worker is gone") == {"requeued": 2, "failed": 0, "at_ndif": 0}
    for job in queue.get_many([j.id for j in mine]):
        assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
        assert [(a.outcome, a.error) for a in queue.attempts_of(job.id)] == [("worker gone", "its worker is gone")]
    assert queue.bundle(bundle).state == "abandoned"
    assert queue.get(other.id).state == "claimed" and queue.get(other.id).lease_owner == "alive"
    assert queue.take_back("gone", "its worker is gone") == {"requeued": 0, "failed": 0, "at_ndif": 0}
    assert [h[:2] for h in queue.holders()] == [("alive", 1)]


def test_a_job_whose_workers_die_every_time_fails_after_its_attempts_instead_of_looping(queue) -> None:  # type: ignore[no-untyped-def]
    """Taking back a gone worker's jobs spends no attempt, so a job that itself kills its worker
    (killed for memory, say) would stop every worker forever: after `max_attempts` deaths it fails."""
    queue.enqueue([_job(1), _job(2)])
    (killer,) = queue.claim("w0", limit=1, lease_s=300)
    for n in range(1, 3):
        assert queue.take_back(f"w{n - 1}", "its worker is gone") == {"requeued": 1, "failed": 0, "at_ndif": 0}
        (again,) = queue.claim(f"w{n}", limit=1, lease_s=300)
        assert again.id == killer.id and again.attempts == 1
    assert queue.take_back("w2", "its worker is gone") == {"requeued": 0, "failed": 1, "at_ndif": 0}
    job = queue.get(killer.id)
    assert job.state == "failed" and job.lease_owner is None and "died every time it ran this job" in job.error
    assert [a.outcome for a in queue.attempts_of(killer.id)] == ["worker gone"] * 3
    (other,) = queue.claim("w3", limit=1, lease_s=300)  # the rest of the queue runs on
    assert other.id != killer.id and other.attempts == 1
