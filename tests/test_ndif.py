"""The ndif backend against the real NDIF server (scripts/ndif-local), driven by the real client.

Every test here sends real HTTP to a real NDIF 0.1.2 API process, whose real model replica runs
the experiments. Faults NDIF never makes by itself (503, 429, dropped connections, truncated or
corrupt downloads) come from a proxy in between (scripts/ndif_local/faultproxy.py); the rest (errors inside
an experiment, a killed worker, the version gate) are the real thing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, run_cli, wait_until

sys.path.insert(0, str(REPO / "scripts"))
from ndif_local.faultproxy import FaultProxy  # noqa: E402

pytestmark = [pytest.mark.ndif, pytest.mark.slow]

MODEL = "local/smollm2"

JOBS = [
    ("logit-lens", {"prompt": "The capital of France is", "layers": [0, 15, 29], "top_k": 3}),
    ("logit-lens", {"prompt": "The Eiffel Tower is in the city of", "layers": [29], "top_k": 3}),
    ("activations", {"prompt": "The capital of France is", "layers": [0, 10, 20, 29], "top_k": 5}),
    ("activations", {"prompt": "Hello there", "layers": [5], "top_k": 2}),
    ("patching", {"clean_prompt": "The Eiffel Tower is in the city of", "corrupted_prompt": "The Colosseum is in the city of",
                  "answer": " Paris", "wrong_answer": " Rome", "layers": [0, 15, 29], "position": -1}),
    ("steering", {"positive_prompt": "I love this movie", "negative_prompt": "I hate this movie", "prompt": "This restaurant is",
                  "layer": 6, "coefficient": 3.0, "top_k": 3}),
]


def submit_all(env: dict[str, str], jobs=JOBS, backend: str = "ndif", model: str = MODEL) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for name, params in jobs:
        args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
        cmd = ["submit", name, "-b", backend, "-m", model, "--json", "--force"]
        for a in args:
            cmd += ["-p", a]
        ids.append(json.loads(run_cli(*cmd, env=env, check=True).stdout)["id"])
    return ids


def values(env: dict[str, str], job_id: str) -> dict:
    """A job's values as `results --json` prints them (the same load and conversion), read in this
    process: it has torch loaded already, and a `results` process per job would load it again."""
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings
    from ndif_jobs.store.codec import to_jsonable

    try:
        return to_jsonable(Service(Settings(home=Path(env["NDIF_JOBS_HOME"]))).load_result(job_id).to_dict())
    finally:
        dispose_engines()


def result_folders(home: Path) -> list[Path]:
    return [p.parent for p in (home / "results").rglob("manifest.json")]


@pytest.fixture
def ndif_env(env, local_ndif):  # type: ignore[no-untyped-def]
    return local_ndif.client_env(env)


def test_queue_through_ndif_equals_local_in_few_requests(ndif_env, local_ndif, home) -> None:  # type: ignore[no-untyped-def]
    before = local_ndif.requests()
    ids = submit_all({**ndif_env, "NDIF_JOBS_MAX_BUNDLE": "4"})
    run_cli("worker", "--until-empty", "--max-bundle", "4", env=ndif_env, check=True, timeout=600)
    assert local_ndif.requests() - before == math.ceil(len(JOBS) / 4)
    for job_id in ids:
        shown = json.loads(run_cli("show", job_id, "--json", env=ndif_env, check=True).stdout)
        assert shown["state"] == "completed", shown
        statuses = [s["status"] for s in shown["bundle"]["status_history"]]
        assert statuses[0] == "SUBMITTED" and statuses[-1] == "COMPLETED" and shown["bundle"]["remote_job_id"]

    # The same experiments on the local backend and the embedded model (the same weights).
    local_env = {**ndif_env, "NDIF_JOBS_HOME": str(home.parent / "local-home")}
    local_ids = submit_all(local_env, backend="local", model="smollm2-135m")
    run_cli("worker", "--until-empty", env=local_env, check=True, timeout=600)
    for remote_id, local_id, (name, _) in zip(ids, local_ids, JOBS, strict=True):
        a, b = values(ndif_env, remote_id), values(local_env, local_id)
        assert a.keys() == b.keys()
        for field in a:
            if field.endswith(("_ids", "layers")) or field in ("top_tokens", "steered_top_tokens", "answer_id", "wrong_answer_id"):
                assert a[field] == b[field], (name, field)
            elif isinstance(a[field], (list, float)):
                assert torch.allclose(torch.tensor(a[field]), torch.tensor(b[field]), atol=2e-4, rtol=1e-4), (name, field)


def test_transient_faults_are_survived(ndif_env, local_ndif, home) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(local_ndif.host).start()
    try:
        env = local_ndif.client_env(ndif_env, host=proxy.url)
        env.update(NDIF_JOBS_RETRY_BACKOFF_S="0.05", NDIF_JOBS_RETRY_BACKOFF_MAX_S="0.2", NDIF_JOBS_HTTP_RETRIES="8")
        ids = submit_all(env, jobs=JOBS[:3])
        proxy.inject("submit", "503", times=2)
        proxy.inject("submit", "429")
        proxy.inject("submit", "drop")  # connection dropped before the request reached NDIF
        proxy.inject("poll", "503")
        proxy.inject("poll", "drop")
        proxy.inject("poll", "garbage")
        proxy.inject("download", "truncate")
        proxy.inject("download", "corrupt")
        before = local_ndif.requests()
        run_cli("worker", "--until-empty", env=env, check=True, timeout=600)
        assert local_ndif.requests() - before == 1  # the faulted POSTs never reached NDIF
        assert proxy.injected["download:truncate"] == 1 and proxy.injected["download:corrupt"] == 1
        for job_id in ids:
            shown = json.loads(run_cli("show", job_id, "--json", env=env, check=True).stdout)
            assert shown["state"] == "completed" and shown["attempts"] == 1
        assert len(result_folders(home)) == len(ids)  # nothing stored twice
        assert run_cli("verify", env=env).returncode == 0
    finally:
        proxy.stop()


BOOM = '''
import threading
from ndif_jobs import experiment, Params

class P(Params):
    prompt: str
    explode: bool = False

@experiment("maybe-boom", params=P)
def maybe_boom(model, p):
    with model.trace(p["prompt"]):
        top = model.output.logits[0, -1].argmax().save()
    if p["explode"]:
        # Runs fine, but NDIF cannot send a lock back: the whole request ends in ERROR.
        return {"top": top, "lock": threading.Lock()}
    return {"top": top}
'''


def test_request_error_is_isolated_by_splitting(ndif_env, local_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "boom_probe.py").write_text(BOOM)
    env = {**ndif_env, "NDIF_JOBS_IMPORTS": "boom_probe", "PYTHONPATH": str(tmp_path)}
    jobs = [("maybe-boom", {"prompt": f"Prompt number {i}", "explode": i == 2}) for i in range(4)]
    ids = submit_all(env, jobs=jobs)
    before = local_ndif.requests()
    run_cli("worker", "--until-empty", env=env, check=True, timeout=600)
    states = {i: json.loads(run_cli("show", i, "--json", env=env, check=True).stdout) for i in ids}
    # [0 1 2 3] errs -> [0 1] ok, [2 3] errs -> [2] errs, [3] ok
    assert local_ndif.requests() - before == 5
    assert [states[i]["state"] for i in ids] == ["completed", "completed", "failed", "completed"]
    assert "pickle" in states[ids[2]]["error"] and states[ids[2]]["error"].startswith("NDIF: ")
    assert states[ids[2]]["attempts"] == 1


SLOW = '''
import time
from ndif_jobs import experiment, Params

class P(Params):
    prompt: str
    seconds: float = 8.0

@experiment("slow-lens", params=P)
def slow_lens(model, p):
    time.sleep(p["seconds"])  # runs on NDIF: long enough to kill the worker meanwhile
    with model.trace(p["prompt"]):
        top = model.output.logits[0, -1].argmax().save()
    return {"top": top}
'''


def _start_worker(env: dict[str, str]) -> subprocess.Popen:
    """`ndif-jobs worker --until-empty` in the background; its stderr (the log) kept for errors."""
    return subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker", "--until-empty"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_submission(home: Path, timeout: float = 120) -> str:
    db = sqlite3.connect(home / "queue.db")
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = db.execute("SELECT remote_job_id FROM bundles WHERE remote_job_id IS NOT NULL").fetchone()
        if row:
            return row[0]
        time.sleep(0.1)
    raise AssertionError("the worker never submitted")


def _slow_job_in_flight(ndif_env, tmp_path, home, grace_s: str):  # type: ignore[no-untyped-def]
    """One slow job submitted and being run by NDIF, its worker still waiting: (env, job id, worker)."""
    (tmp_path / "slow_probe.py").write_text(SLOW)
    # After a restart NDIF may answer ERROR (evicted), COMPLETED late, or never again: a short
    # deadline bounds the last case (the request is then sent again).
    env = {**ndif_env, "NDIF_JOBS_IMPORTS": "slow_probe", "PYTHONPATH": str(tmp_path), "NDIF_JOBS_EVICTION_GRACE_S": grace_s,
           "NDIF_JOBS_RETRY_BACKOFF_S": "0.5", "NDIF_JOBS_RETRY_BACKOFF_MAX_S": "2", "NDIF_JOBS_BUNDLE_DEADLINE_S": "60",
           "NDIF_JOBS_MAX_ATTEMPTS": "5"}
    (job,) = submit_all(env, jobs=[("slow-lens", {"prompt": "The capital of France is", "seconds": 6.0})])
    worker = _start_worker(env)
    _wait_for_submission(home)
    return env, job, worker


def _completed_once(env, job: str, worker, home) -> None:  # type: ignore[no-untyped-def]
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-2000:]
    shown = json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)
    assert shown["state"] == "completed", (shown["error"], shown["attempt_history"], shown["bundle"])
    assert len(result_folders(home)) == 1


def test_api_restart_mid_request_is_survived(ndif_env, local_ndif, tmp_path, home) -> None:  # type: ignore[no-untyped-def]
    """The real API process restarted while NDIF runs the request: NDIF says the replica was evicted."""
    env, job, worker = _slow_job_in_flight(ndif_env, tmp_path, home, grace_s="20")
    local_ndif.harness("restart-api")
    _completed_once(env, job, worker, home)


def test_killed_model_replica_mid_request_is_survived(ndif_env, local_ndif, tmp_path, home) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL to the stack's real model actor while it runs the request (Ray restarts it)."""
    env, job, worker = _slow_job_in_flight(ndif_env, tmp_path, home, grace_s="5")
    time.sleep(2)  # running on the replica by now
    status = json.loads(local_ndif.harness("status", "--json").stdout)
    ray_session = status["services"]["ray"]["pid"]
    actors = [int(p) for p in os.listdir("/proc") if p.isdigit() and _in_session(int(p), ray_session)
              and b"CPUModelActor" in _cmdline(int(p))]
    assert actors, "no model actor found in this stack's Ray session"
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    _completed_once(env, job, worker, home)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _in_session(pid: int, session: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3]) == session
    except (OSError, IndexError, ValueError):
        return False


def test_ndif_down_for_a_while_then_back(ndif_env, local_ndif, tmp_path, home) -> None:  # type: ignore[no-untyped-def]
    """NDIF unreachable for many times the worker's whole retry window (the windows are shrunk
    here so that seconds stand for an outage of hours): before the submission, the jobs wait in
    the queue without spending attempts; after it, the worker keeps polling the same request.
    With one attempt allowed per job, any spent attempt would fail a job."""
    (tmp_path / "slow_probe.py").write_text(SLOW)
    proxy = FaultProxy(local_ndif.host).start()
    try:
        env = local_ndif.client_env(ndif_env, host=proxy.url)
        env.update(NDIF_JOBS_IMPORTS="slow_probe", PYTHONPATH=str(tmp_path), NDIF_JOBS_MAX_ATTEMPTS="1",
                   NDIF_JOBS_RETRY_BACKOFF_S="0.2", NDIF_JOBS_RETRY_BACKOFF_MAX_S="1", NDIF_JOBS_HTTP_RETRIES="3",
                   NDIF_JOBS_HTTP_RETRY_MAX_S="1", NDIF_JOBS_POLL_MAX_S="0.5")
        before = local_ndif.requests()

        # Down before the submission: every try is cut off; the jobs stay queued, no attempt spent.
        ids = submit_all(env, jobs=JOBS[:2])
        proxy.down = True
        worker = _start_worker(env)
        wait_until(lambda: proxy.injected["submit:down"] >= 6, what="several cut-off submissions")
        assert worker.poll() is None
        status = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
        assert status["counts"]["failed"] == 0 and status["counts"]["completed"] == 0

        def says_waiting() -> bool:  # `status` tells the truth: queued, waiting for NDIF
            shown = json.loads(run_cli("show", ids[0], "--json", env=env, check=True).stdout)
            return shown["state"] == "queued" and "waiting for NDIF" in (shown["error"] or "")

        wait_until(says_waiting, what="a job shown as waiting for NDIF")
        proxy.down = False
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        assert local_ndif.requests() - before == 1

        # Down while NDIF runs the request: the worker polls on and never sends it again.
        (slow,) = submit_all(env, jobs=[("slow-lens", {"prompt": "The capital of France is", "seconds": 4.0})])
        worker = _start_worker(env)
        wait_until(lambda: local_ndif.requests() - before == 2, what="the slow submission")
        proxy.down = True
        wait_until(lambda: proxy.injected["poll:down"] >= 6, what="several cut-off polls")
        time.sleep(4.0)  # NDIF finishes the request meanwhile
        proxy.down = False
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        assert local_ndif.requests() - before == 2  # the slow request was sent once

        for job_id in [*ids, slow]:
            shown = json.loads(run_cli("show", job_id, "--json", env=env, check=True).stdout)
            assert (shown["state"], shown["attempts"]) == ("completed", 1), (shown["error"], shown["attempt_history"])
        assert len(result_folders(home)) == 3
    finally:
        proxy.stop()


def test_worker_stopped_while_ndif_is_down_leaves_at_once(ndif_env, local_ndif, tmp_path, home) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM while NDIF is unreachable mid-wait, with the default two-minute HTTP retry window:
    the worker leaves within seconds (not after the window), exit 0, the request left at NDIF; the
    next worker re-attaches to it once NDIF is back and nothing is sent twice."""
    (tmp_path / "slow_probe.py").write_text(SLOW)
    proxy = FaultProxy(local_ndif.host).start()
    try:
        env = local_ndif.client_env(ndif_env, host=proxy.url)
        env.update(NDIF_JOBS_IMPORTS="slow_probe", PYTHONPATH=str(tmp_path), NDIF_JOBS_RETRY_BACKOFF_S="20",
                   NDIF_JOBS_RETRY_BACKOFF_MAX_S="60", NDIF_JOBS_HTTP_RETRIES="20", NDIF_JOBS_HTTP_RETRY_MAX_S="300")
        before = local_ndif.requests()
        (job,) = submit_all(env, jobs=[("slow-lens", {"prompt": "The capital of France is", "seconds": 3.0})])
        worker = _start_worker(env)
        _wait_for_submission(home)
        proxy.down = True
        wait_until(lambda: proxy.injected["poll:down"] >= 1, what="a cut-off poll")
        time.sleep(1.0)  # inside the first backoff delay (up to 20 s) now
        stopped_at = time.time()
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
        took = time.time() - stopped_at
        assert worker.returncode == 0, err[-2000:]
        assert took < 8, f"the stopping worker took {took:.1f} s to leave"
        assert json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)["state"] == "submitted"

        proxy.down = False
        took_over_at = time.time()  # the stopped worker handed its lease back: no 5-minute lease to sit out
        run_cli("worker", "--until-empty", env=env, check=True, timeout=300)
        assert time.time() - took_over_at < 120
        shown = json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)
        assert (shown["state"], shown["attempts"]) == ("completed", 1), (shown["error"], shown["attempt_history"])
        assert local_ndif.requests() - before == 1  # re-attached, not sent again
        assert len(result_folders(home)) == 1
    finally:
        proxy.stop()


def test_unanswered_request_is_resent_after_its_deadline(ndif_env, local_ndif, home) -> None:  # type: ignore[no-untyped-def]
    """NDIF never answers the first request (as when a replica dies): past the deadline it is resent."""
    proxy = FaultProxy(local_ndif.host).start()
    try:
        proxy.stall_submissions = 1
        env = local_ndif.client_env(ndif_env, host=proxy.url)
        env.update(NDIF_JOBS_BUNDLE_DEADLINE_S="8", NDIF_JOBS_POLL_MAX_S="1", NDIF_JOBS_RETRY_BACKOFF_S="0.1")
        ids = submit_all(env, jobs=JOBS[:2])
        before = local_ndif.requests()
        run_cli("worker", "--until-empty", env=env, check=True, timeout=600)
        assert local_ndif.requests() - before == 2
        (first,) = proxy.stalled
        for job_id in ids:
            shown = json.loads(run_cli("show", job_id, "--json", env=env, check=True).stdout)
            assert shown["state"] == "completed" and shown["bundle"]["remote_job_id"] != first
        db = sqlite3.connect(home / "queue.db")
        state, history = db.execute("SELECT state, status_history FROM bundles WHERE remote_job_id = ?", (first,)).fetchone()
        assert state == "abandoned" and "ABANDONED" in history
        assert len(result_folders(home)) == 2
    finally:
        proxy.stop()


def test_redis_down_then_back(ndif_env, local_ndif) -> None:  # type: ignore[no-untyped-def]
    """NDIF's Redis stopped: POST /request answers 500 until it is back; the submission is retried."""
    env = {**ndif_env, "NDIF_JOBS_RETRY_BACKOFF_S": "1", "NDIF_JOBS_RETRY_BACKOFF_MAX_S": "4",
           "NDIF_JOBS_HTTP_RETRIES": "40", "NDIF_JOBS_HTTP_RETRY_MAX_S": "240"}
    (job,) = submit_all(env, jobs=JOBS[:1])
    local_ndif.harness("stop", "--only", "redis")
    worker = _start_worker(env)
    try:
        time.sleep(8)
        assert worker.poll() is None  # still retrying, not failed
        local_ndif.harness("start")  # Redis back (and the API, which needs a fresh connection to it)
        _, err = worker.communicate(timeout=600)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err[-2000:]
    shown = json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)
    assert shown["state"] == "completed" and shown["attempts"] == 1


def test_version_gate_stops_cleanly_with_what_to_do(ndif_env, local_ndif) -> None:  # type: ignore[no-untyped-def]
    local_ndif.harness("restart-api", "--env", "NDIF_MIN_PYTHON_VERSION=3.99")
    try:
        (job,) = submit_all(ndif_env, jobs=JOBS[:1])
        before = local_ndif.requests()
        proc = run_cli("worker", "--until-empty", env=ndif_env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        shown = json.loads(run_cli("show", job, "--json", env=ndif_env, check=True).stdout)
        assert shown["state"] == "failed" and shown["attempts"] == 1  # no retries burnt
        assert "3.99" in shown["error"] and "retry" in shown["error"]
        assert local_ndif.requests() == before  # the gate's 400 is not a 200
    finally:
        local_ndif.harness("restart-api", "--env", "NDIF_MIN_PYTHON_VERSION=")


AUTH_SCHEMA = """
DROP TABLE IF EXISTS key_user_tag_assignments, user_tags, keys, users;
CREATE TABLE users (user_id uuid PRIMARY KEY, email text);
CREATE TABLE keys (key_id uuid PRIMARY KEY, user_id uuid NOT NULL);
CREATE TABLE user_tags (user_tag_id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE key_user_tag_assignments (key_id uuid NOT NULL, user_tag_id int NOT NULL);
"""


def test_api_keys_are_checked_and_never_leak(ndif_env, local_ndif, home) -> None:  # type: ignore[no-untyped-def]
    """NDIF with auth on (keys in the real PostgreSQL): 401/400/403 stop cleanly; a good key runs."""
    import uuid

    import psycopg

    from .conftest import POSTGRES_URL

    admin = POSTGRES_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'ndif_auth'").fetchone():
            conn.execute("CREATE DATABASE ndif_auth")
    auth_url = admin.rsplit("/", 1)[0] + "/ndif_auth"
    good, user = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(auth_url, autocommit=True) as conn:
        conn.execute(AUTH_SCHEMA)
        conn.execute("INSERT INTO users VALUES (%s, 'researcher@example.org')", (user,))
        conn.execute("INSERT INTO keys VALUES (%s, %s)", (good, user))
    local_ndif.harness("restart-api", "--env", f"NDIF_POSTGRES_URL={auth_url}")
    try:
        malformed = "secret-but-not-a-uuid-7f3a9c"
        cases = {"": "401", malformed: "400", str(uuid.uuid4()): "403"}
        for key, code in cases.items():
            env = {**ndif_env, "NDIF_API_KEY": key}
            (job,) = submit_all(env, jobs=JOBS[:1])
            proc = run_cli("worker", "--until-empty", env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            shown = json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)
            assert shown["state"] == "failed" and shown["attempts"] == 1, (code, shown)
            assert f"NDIF refused the API key ({code}" in shown["error"] and "NDIF_API_KEY" in shown["error"]
            if key:
                assert key not in proc.stdout + proc.stderr
        env = {**ndif_env, "NDIF_API_KEY": good}
        (job,) = submit_all(env, jobs=JOBS[:1])
        run_cli("worker", "--until-empty", env=env, check=True, timeout=300)
        shown = json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)
        assert shown["state"] == "completed", shown
        stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
        for secret in (malformed, good):
            assert secret.encode() not in stored  # not in the database, results or anything else
    finally:
        local_ndif.harness("restart-api", "--env", "NDIF_POSTGRES_URL=")


def test_models_lists_ndif_deployments(ndif_env) -> None:  # type: ignore[no-untyped-def]
    """`models` shows NDIF's /status. NDIF caches that view for 60 s and computes it from Ray's actor
    table, so right after the earlier tests' faults (a replica SIGKILLed, the API restarted) it may
    still say DEPLOYING or leave the replica out; the deployment must show up RUNNING once that passes."""
    deadline, seen = time.time() + 150, []
    while True:
        doc = json.loads(run_cli("models", "--json", env=ndif_env, check=True).stdout)
        rows = [r for r in doc["ndif"] if r["model"] == MODEL]
        seen.append(doc["ndif"])
        if rows and rows[0]["state"] == "RUNNING" or time.time() > deadline:
            break
        time.sleep(5)
    assert len(rows) == 1, f"NDIF's /status never listed {MODEL} once; it said: {seen}"
    assert rows[0]["level"] == "HOT" and rows[0]["state"] == "RUNNING", seen
    assert rows[0]["model_key"] and '"repo_id": "local/smollm2"' in rows[0]["model_key"]
    assert any(r["model"] == "smollm2-135m" for r in doc["local"])


def test_plain_http_to_a_remote_host_is_refused(ndif_env) -> None:  # type: ignore[no-untyped-def]
    (job,) = submit_all({**ndif_env}, jobs=JOBS[:1])
    env = {**ndif_env, "NDIF_HOST": "http://example.org:8011"}
    proc = run_cli("worker", "--until-empty", env=env, timeout=120)
    assert proc.returncode == 2 and "must be an https:// URL" in proc.stderr
    assert json.loads(run_cli("show", job, "--json", env=env).stdout)["state"] == "queued"
