"""A worker SIGKILLed at every step of a job's life (ndif_jobs/crashpoints.py), then a fresh worker.

At each point: the killed worker leaves the truth in `status` (once its lease runs out, its held
jobs are reported as such), the next worker finishes every job, each result is stored exactly
once and passes `verify`, and the dead worker's attempt is recorded as lost. Work that never
left the dead worker is run again (at-least-once); work already at NDIF is re-attached by NDIF
job id and never sent twice, except in the one window where NDIF accepted a request whose id
the worker had not yet written down (`posted`).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .conftest import REPO, run_cli
from .test_workers import PROBE as COUNTED  # `count-me`: one line per execution

pytestmark = pytest.mark.slow

LEASE_S = 2.0


def executions(log: Path) -> Counter:
    """How many times each job's experiment ran (its `n`, the first field of each line)."""
    return Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()


def crashed_worker(env: dict[str, str], point: str) -> None:
    """Run a worker armed to die at `point`; it must die there (SIGKILL), not finish."""
    proc = subprocess.run([sys.executable, "-m", "ndif_jobs", "worker", "--until-empty"],
                          env={**env, "NDIF_JOBS_CRASH_AT": point}, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, f"the worker did not die at {point}: rc={proc.returncode} {proc.stderr[-1500:]}"


def status(env: dict[str, str]) -> dict:
    return json.loads(run_cli("status", "--json", env=env, check=True).stdout)


def held_after_lease(env: dict[str, str]) -> dict[str, int]:
    """Once the dead worker's leases have run out, `status` names the jobs it held."""
    time.sleep(LEASE_S + 0.5)
    held = status(env)["lease_expired"]
    shown = run_cli("status", env=env, check=True).stdout
    assert ("stopped renewing its lease" in shown) == bool(held), shown
    return held


def check_recovered(env: dict[str, str], home: Path, job_ids: list[str]) -> list[dict]:
    """A fresh worker finishes everything; one result per key, all verified. Returns `show` of each job."""
    run_cli("worker", "--until-empty", env=env, check=True, timeout=600)
    shown = [json.loads(run_cli("show", j, "--json", env=env, check=True).stdout) for j in job_ids]
    assert [s["state"] for s in shown] == ["completed"] * len(job_ids), [s["error"] for s in shown]
    folders = [p.parent.name for p in (home / "results").rglob("manifest.json")]
    assert sorted(folders) == sorted({s["result_key"] for s in shown}), "a result is missing or stored twice"
    verify = run_cli("verify", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    after = status(env)
    assert after["lease_expired"] == {} and after["counts"]["completed"] == len(job_ids)
    return shown


def lost_attempts(shown: dict) -> list[str]:
    """The dead worker's attempts: taken back at once by the next worker on its host (`worker
    gone`), or, for work at NDIF, re-attached once its lease was ended (`lease expired`)."""
    return [a["outcome"] for a in shown["attempt_history"] if a["outcome"] in ("lease expired", "worker gone")]


# -- the local backend ---------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["claimed", "running", "storing", "stored", "finished"])
def test_local_worker_killed_at(point, env, home, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "count_probe.py").write_text(COUNTED)
    env = {**env, "NDIF_JOBS_IMPORTS": "count_probe", "PYTHONPATH": str(tmp_path), "NDIF_JOBS_LEASE_S": str(LEASE_S)}
    log = tmp_path / "executions.log"
    (tmp_path / "params.json").write_text(json.dumps([{"n": i, "log": str(log)} for i in range(3)]))
    out = run_cli("submit", "count-me", "-m", str(tiny_llama), "--params-file", str(tmp_path / "params.json"), "--json",
                  env=env, check=True).stdout
    doc = json.loads(out)
    job_ids = [row["id"] for row in (doc if isinstance(doc, list) else doc.get("jobs", [doc]))]

    crashed_worker(env, point)
    ran_before = executions(log)
    expected_held = {} if point == "finished" else {"claimed" if point == "claimed" else "running": 3}
    assert held_after_lease(env) == expected_held
    if point == "storing":  # died mid-write: a temporary folder, never a half-written result
        assert [p.name for p in (home / "results").iterdir() if p.name.startswith(".tmp-")]

    shown = check_recovered(env, home, job_ids)
    runs = executions(log)
    assert sorted(runs) == ["0", "1", "2"]
    if point in ("claimed", "running"):
        assert ran_before == Counter() and set(runs.values()) == {1}  # nothing had run: each ran once
    elif point in ("storing", "stored"):
        assert set(ran_before.values()) == {1} and set(runs.values()) == {2}  # ran again: at-least-once
    else:
        assert set(runs.values()) == {1}  # done before the kill: nothing ran again
    expected_lost = 0 if point == "finished" else 1
    assert [len(lost_attempts(s)) for s in shown] == [expected_lost] * 3


# -- the NDIF backend (real local NDIF) ----------------------------------------------------------

NDIF_JOBS = [
    ("logit-lens", {"prompt": "The capital of France is", "layers": [0, 29], "top_k": 3}),
    ("activations", {"prompt": "Hello there", "layers": [5], "top_k": 2}),
]


@pytest.mark.ndif
@pytest.mark.parametrize(
    "point, requests, held_state",
    [
        ("running", 1, "running"),      # before the POST: sent once, by the next worker
        ("posted", 2, "running"),       # NDIF has it, its id unrecorded: the one window that sends twice
        ("submitted", 1, "submitted"),  # id recorded: re-attached, never sent again
        ("downloaded", 1, "submitted"),  # the result was in hand: re-attached and downloaded again
        ("stored", 1, "submitted"),     # stored, not marked: re-attached; the stored result is kept
    ],
)
def test_ndif_worker_killed_at(point, requests, held_state, env, home, local_ndif) -> None:  # type: ignore[no-untyped-def]
    from .test_ndif import submit_all

    env = {**local_ndif.client_env(env), "NDIF_JOBS_LEASE_S": str(LEASE_S)}
    job_ids = submit_all(env, jobs=NDIF_JOBS)
    before = local_ndif.requests()

    crashed_worker(env, point)
    assert held_after_lease(env) == {held_state: 2}
    if held_state == "submitted":
        with sqlite3.connect(home / "queue.db") as db:
            (remote,) = db.execute("SELECT DISTINCT remote_job_id FROM bundles WHERE remote_job_id IS NOT NULL").fetchall()

    shown = check_recovered(env, home, job_ids)
    assert local_ndif.requests() - before == requests
    if held_state == "submitted":
        for s in shown:
            assert s["bundle"]["remote_job_id"] == remote[0]
            assert "REATTACHED" in [h["status"] for h in s["bundle"]["status_history"]]
    assert [len(lost_attempts(s)) for s in shown] == [1, 1]
