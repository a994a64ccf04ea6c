"""Reliability under faults, with real processes, real files and real signals (docs/reliability.md).

Graceful and hard shutdown of a worker mid-bundle, a result store that cannot be written, a
database another process holds locked, unusable data folders, the API key kept out of every file
and log, and a short chaos run against the real local NDIF (scripts/chaos.py --quick).
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

SLEEPY = '''
import time
from pathlib import Path
from ndif_jobs import experiment, Params
from ndif_jobs.experiments.access import blocks, hidden

class P(Params):
    n: int
    marks: str
    seconds: float = 2.0
    size: int = 1

@experiment("sleepy", params=P)
def sleepy(model, p):
    Path(p["marks"], f"start-{p['n']}").touch()
    time.sleep(p["seconds"])
    with model.trace("hello"):
        h = hidden(blocks(model)[0].output).sum().save()
    Path(p["marks"], f"end-{p['n']}").touch()
    import torch
    return {"n": p["n"], "h": h, "payload": torch.ones(p["size"])}
'''


@pytest.fixture
def probe_env(env, tmp_path):  # type: ignore[no-untyped-def]
    """The `sleepy` experiment importable by every subprocess; marks under tmp_path/marks."""
    (tmp_path / "sleepy_probe.py").write_text(SLEEPY)
    (tmp_path / "marks").mkdir()
    return {**env, "NDIF_JOBS_IMPORTS": "sleepy_probe", "PYTHONPATH": str(tmp_path), "NDIF_JOBS_LEASE_S": "3",
            "NDIF_JOBS_RETRY_BACKOFF_S": "0.1", "NDIF_JOBS_RETRY_BACKOFF_MAX_S": "0.3"}


def submit_sleepy(env: dict[str, str], tmp_path: Path, model: Path, jobs: list[dict]) -> list[str]:
    for job in jobs:
        job.setdefault("marks", str(tmp_path / "marks"))
    (tmp_path / "params.json").write_text(json.dumps(jobs))
    out = run_cli("submit", "sleepy", "-m", str(model), "--params-file", str(tmp_path / "params.json"), "--json",
                  env=env, check=True).stdout
    doc = json.loads(out)
    rows = doc if isinstance(doc, list) else doc.get("jobs", [doc])
    return [r["id"] for r in rows]


def worker(env: dict[str, str], *args: str, **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path_glob: tuple[Path, str], timeout: float = 120) -> list[Path]:
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"nothing matched {pattern} in {folder} within {timeout} s")


def jobs_table(home: Path) -> dict[str, tuple]:
    with sqlite3.connect(home / "queue.db") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, attempts, error, result_key FROM jobs")}


def result_entries(home: Path) -> tuple[list[Path], list[str]]:
    """(result folders with a manifest, names of temp/corrupt leftovers in the store root)."""
    root = home / "results"
    if not root.exists():
        return [], []
    return ([p.parent for p in root.glob("*/*/manifest.json")],
            [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".corrupt-"))])


# -- shutdown ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_the_job_in_hand_and_a_second_one_exits_at_once(probe_env, tmp_path, home, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    ids = submit_sleepy(probe_env, tmp_path, tiny_llama, [{"n": i} for i in range(3)])
    marks = tmp_path / "marks"

    # First SIGTERM mid-job: the job in hand is finished, the rest are not touched, exit 0.
    first = worker(probe_env, "--until-empty", "--max-bundle", "1")
    (started,) = wait_for((marks, "start-*"))
    first.send_signal(signal.SIGTERM)
    sent = time.time()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err[-2000:]
    assert time.time() - sent < 30
    n = int(started.name.split("-")[1])
    assert (marks / f"end-{n}").exists()
    assert sorted(p.name for p in marks.glob("start-*")) == [f"start-{n}"]
    table = jobs_table(home)
    assert table[ids[n]][0] == "completed"
    for other in (ids[i] for i in range(3) if i != n):
        assert table[other][:2] == ("queued", 0), table[other]  # untouched: not even an attempt used

    # Second SIGTERM: exit at once, non-zero, the job abandoned mid-run.
    second = worker(probe_env, "--until-empty", "--max-bundle", "1")
    wait_for((marks, f"start-[!{n}]"))
    running = [p for p in marks.glob("start-*") if p.name != f"start-{n}"]
    second.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    second.send_signal(signal.SIGTERM)
    sent = time.time()
    second.communicate(timeout=30)
    assert time.time() - sent < 3.0  # the release on the way out is bounded at 2 s, then os._exit
    assert second.returncode not in (0, None)
    (m,) = [int(p.name.split("-")[1]) for p in running]
    assert not (marks / f"end-{m}").exists()

    # A new worker completes everything: nothing lost (the abandoned job's lease lapses or was released).
    time.sleep(3.2)
    run_cli("worker", "--until-empty", env=probe_env, check=True, timeout=300)
    table = jobs_table(home)
    assert [table[i][0] for i in ids] == ["completed"] * 3
    folders, leftovers = result_entries(home)
    assert len(folders) == 3 and not leftovers
    assert run_cli("verify", env=probe_env).returncode == 0


# -- a store that cannot be written --------------------------------------------------------------------


def _tiny_filesystem(limit: int):  # type: ignore[no-untyped-def]
    """A file-size limit on the worker: every write past `limit` bytes fails with EFBIG, as on a full disk
    (Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_result_store_fails_the_job_cleanly(probe_env, tmp_path, home, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    env = {**probe_env, "NDIF_JOBS_MAX_ATTEMPTS": "2"}
    small, big = submit_sleepy(env, tmp_path, tiny_llama, [{"n": 0, "seconds": 0}, {"n": 1, "seconds": 0, "size": 2_000_000}])
    proc = worker(env, "--until-empty", "--max-bundle", "1", preexec_fn=_tiny_filesystem(4 << 20))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    table = jobs_table(home)
    assert table[small][0] == "completed"
    state, attempts, error, result_key = table[big]
    assert state == "failed" and attempts == 2, table[big]  # retried, then failed for good
    assert "cannot store result" in error and "too large" in error.lower(), error
    assert result_key is None
    folders, leftovers = result_entries(home)
    assert [f.name for f in folders] == [table[small][3]] and not leftovers  # nothing half-written kept
    assert run_cli("verify", env=env).returncode == 0


# -- a locked database ---------------------------------------------------------------------------------

LOCKER = '''
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
for _ in range(int(sys.argv[2])):
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(2.0)
    db.execute("COMMIT")
    time.sleep(0.05)
print("done", flush=True)
'''


@pytest.mark.slow
def test_a_briefly_locked_database_is_waited_for(probe_env, tmp_path, home, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    submit_sleepy(probe_env, tmp_path, tiny_llama, [{"n": 0, "seconds": 0}])

    # submit while another process holds the write lock for 2 s
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(home / "queue.db"), "1"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    started = time.time()
    ids = submit_sleepy(probe_env, tmp_path, tiny_llama, [{"n": 1, "seconds": 0}, {"n": 2, "seconds": 0}])
    assert time.time() - started > 1.0  # it did wait
    locker.wait(timeout=30)

    # a worker while the lock is taken for 2 s at a time, again and again
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(home / "queue.db"), "6"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    proc = run_cli("worker", "--until-empty", env=probe_env, timeout=300)
    locker.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stdout + proc.stderr
    table = jobs_table(home)
    assert len(table) == 3 and {t[0] for t in table.values()} == {"completed"}, table
    assert all(i in table for i in ids)


# -- unusable data folders -----------------------------------------------------------------------------


def _unusable(tmp_path: Path, kind: str) -> dict[str, str]:
    (tmp_path / "a-file").write_text("not a folder")
    if kind == "home under a file":
        return {"NDIF_JOBS_HOME": str(tmp_path / "a-file" / "home")}
    if kind == "home on a read-only filesystem":
        return {"NDIF_JOBS_HOME": "/proc/ndif-jobs-home"}
    if kind == "database is a folder":
        (tmp_path / "h" / "queue.db").mkdir(parents=True)
        return {"NDIF_JOBS_HOME": str(tmp_path / "h")}
    if kind == "database on a read-only filesystem":
        return {"NDIF_JOBS_HOME": str(tmp_path / "h2"), "NDIF_JOBS_DATABASE_URL": "sqlite:////proc/ndif-jobs/queue.db"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["home under a file", "home on a read-only filesystem", "database is a folder",
                                  "database on a read-only filesystem"])
@pytest.mark.parametrize("command", [("status",), ("submit", "logit-lens", "-p", "prompt=hi")])
def test_an_unusable_data_folder_is_one_clear_line(env, tmp_path, kind, command) -> None:  # type: ignore[no-untyped-def]
    bad = _unusable(tmp_path, kind)
    proc = run_cli(*command, env={**env, **bad}, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    where = bad.get("NDIF_JOBS_DATABASE_URL", bad["NDIF_JOBS_HOME"]).removeprefix("sqlite:///")
    assert Path(where).parent.as_posix() in lines[0] or where in lines[0], lines[0]


# -- the API key, remote path --------------------------------------------------------------------------

SECRET = "ndifkey-3f9c1e7a5b2d4c6e8f0a1b2c3d4e5f60"


@pytest.mark.ndif
@pytest.mark.slow
def test_the_api_key_never_reaches_the_database_logs_or_results(env, local_ndif, home) -> None:  # type: ignore[no-untyped-def]
    ndif_env = {**local_ndif.client_env(env), "NDIF_API_KEY": SECRET, "NDIF_JOBS_LOG_LEVEL": "debug"}
    for prompt in ("The capital of France is", "Hello there"):
        run_cli("submit", "logit-lens", "-b", "ndif", "-m", "local/smollm2", "-p", f"prompt={prompt}",
                "-p", "layers=[3]", "-p", "top_k=2", "--force", env=ndif_env, check=True)
    proc = run_cli("worker", "--until-empty", env=ndif_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(run_cli("status", "--json", env=ndif_env, check=True).stdout)
    assert shown["counts"]["completed"] == 2  # the remote path really ran
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "queue.db" for p in files) and any(p.name == "manifest.json" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


# -- chaos ---------------------------------------------------------------------------------------------


@pytest.mark.ndif
@pytest.mark.slow
def test_chaos_quick_run_loses_nothing(local_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_env = {k: v for k, v in local_ndif.env.items() if not k.startswith("NDIF_JOBS_")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chaos.py"), "--quick", "--seed", "7", "--duration", "15",
         "--ndif-host", local_ndif.host, "--ndif-root", str(local_ndif.root), "--no-restart-api",
         "--work-dir", str(tmp_path / "chaos")],
        env=run_env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "seed 7" in out and "FAIL" not in out

    def count(name: str) -> int:
        match = re.search(rf"^\s*{re.escape(name)}\s+(\d+)\s*$", out, re.M)
        return int(match.group(1)) if match else 0

    assert count("jobs") == 40
    assert count("completed") + count("failed") == 40
    assert count("result folders") == count("completed")
    assert count("results stored twice") == 0 and count(".tmp- leftovers") == 0 and count("verify exit code") == 0
    assert count("NDIF requests received (200)") >= count("bundles sent to NDIF") >= 1


@pytest.mark.slow
def test_a_result_store_that_refuses_writes_fails_the_job_cleanly(probe_env, tmp_path, home, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """The results folder where nobody may create anything (sysfs refuses mkdir with EPERM even to root,
    as a read-only folder does to a user)."""
    env = {**probe_env, "NDIF_JOBS_MAX_ATTEMPTS": "2"}
    (job,) = submit_sleepy(env, tmp_path, tiny_llama, [{"n": 0, "seconds": 0}])
    shutil.rmtree(home / "results")  # made by the submit (it names the queue there)
    (home / "results").symlink_to("/sys/fs", target_is_directory=True)
    proc = run_cli("worker", "--until-empty", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, attempts, error, result_key = jobs_table(home)[job]
    assert state == "failed" and attempts == 2 and "cannot store result" in error, (state, attempts, error)
    assert result_key is None


HANG = '''
import time
from ndif_jobs import experiment, Params

class P(Params):
    prompt: str
    hang: bool = False

@experiment("maybe-hang", params=P)
def maybe_hang(model, p):
    while p["hang"]:
        time.sleep(0.05)
    with model.trace(p["prompt"]):
        top = model.output.logits[0, -1].argmax().save()
    return {"top": top}
'''


@pytest.mark.slow
def test_an_experiment_that_never_returns_hits_the_bundle_time_limit(env, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "hang_probe.py").write_text(HANG)
    env = {**env, "NDIF_JOBS_IMPORTS": "hang_probe", "PYTHONPATH": str(tmp_path), "NDIF_JOBS_BUNDLE_TIME_LIMIT_S": "4",
           "NDIF_JOBS_MAX_BUNDLE": "1"}
    stuck = json.loads(run_cli("submit", "maybe-hang", "--model", str(tiny_llama), "--json", "-p", "prompt=a", "-p", "hang=true",
                               "--priority", "5", env=env, check=True).stdout)
    later = json.loads(run_cli("submit", "maybe-hang", "--model", str(tiny_llama), "--json", "-p", "prompt=b",
                               env=env, check=True).stdout)
    started = time.time()
    proc = run_cli("worker", "--until-empty", env=env, timeout=120)
    assert proc.returncode == 3 and time.time() - started < 60
    assert "ran past its time limit" in proc.stderr.splitlines()[-1]
    shown = json.loads(run_cli("show", stuck["id"], "--json", env=env, check=True).stdout)
    assert shown["state"] == "failed" and "NDIF_JOBS_BUNDLE_TIME_LIMIT_S" in shown["error"]
    assert json.loads(run_cli("show", later["id"], "--json", env=env, check=True).stdout)["state"] == "queued"
    run_cli("worker", "--until-empty", env=env, check=True, timeout=120)  # the rest of the queue still runs
    assert json.loads(run_cli("show", later["id"], "--json", env=env, check=True).stdout)["state"] == "completed"
