"""Several worker processes on one queue never run a job twice."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from .conftest import REPO

PROBE = '''
import os
from ndif_jobs import experiment, Params
from ndif_jobs.experiments.access import blocks, hidden

class P(Params):
    n: int
    log: str

@experiment("count-me", params=P)
def count_me(model, p):
    # O_APPEND makes each small write atomic: the log holds one line per execution.
    fd = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{p['n']} {os.getpid()}\\n".encode())
    os.close(fd)
    with model.trace("hello"):
        h = hidden(blocks(model)[0].output).sum().save()
    return {"n": p["n"], "h": h}
'''


def _drain(env, tmp_path, n_jobs: int, n_workers: int, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "count_probe.py").write_text(PROBE)
    env = {**env, "NDIF_JOBS_IMPORTS": "count_probe", "PYTHONPATH": str(tmp_path), "NDIF_JOBS_MAX_BUNDLE": "8"}
    log = tmp_path / "executions.log"
    params = [{"n": i, "log": str(log)} for i in range(n_jobs)]
    (tmp_path / "params.json").write_text(json.dumps(params))
    subprocess.run([sys.executable, "-m", "ndif_jobs", "submit", "count-me", "--model", str(tiny_llama),
                    "--params-file", str(tmp_path / "params.json")], env=env, check=True, cwd=REPO, capture_output=True)
    workers = [
        subprocess.Popen([sys.executable, "-m", "ndif_jobs", "worker", "--until-empty"], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(n_workers)
    ]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errors
    assert not any("database is locked" in e for e in errors)
    executions = Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    assert sorted(executions) == list(range(n_jobs)), "a job was never run"
    assert max(executions.values()) == 1, [n for n, c in executions.items() if c > 1]
    pids = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(pids) == n_workers, "every worker should have taken a share"
    status = json.loads(subprocess.run([sys.executable, "-m", "ndif_jobs", "status", "--json"], env=env, cwd=REPO,
                                       capture_output=True, text=True, check=True).stdout)
    assert status["counts"]["completed"] == n_jobs


@pytest.mark.slow
def test_two_workers_on_one_sqlite_file(env, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    _drain(env, tmp_path, n_jobs=240, n_workers=2, tiny_llama=tiny_llama)


@pytest.mark.slow
def test_three_workers_on_postgresql(env, tmp_path, tiny_llama, postgres_url) -> None:  # type: ignore[no-untyped-def]
    _drain({**env, "NDIF_JOBS_DATABASE_URL": postgres_url, "NDIF_JOBS_STORE_LOCAL_OK": "1"}, tmp_path, n_jobs=120, n_workers=3, tiny_llama=tiny_llama)
