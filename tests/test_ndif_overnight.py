"""Running overnight against the real NDIF (scripts/ndif-local): no completed result is wasted
for a link that expired, and nothing is sent to a model NDIF does not run.

The expired link comes from the fault proxy (a 403 for the download, as S3 answers a presigned
URL past its hour); the model that is not running is the stack's own, really evicted from NDIF
and deployed again (NDIF's `ndif evict` / `ndif deploy` library calls, in the server's venv).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, run_cli, wait_until
from .test_ndif import JOBS, _start_worker, submit_all

sys.path.insert(0, str(REPO / "scripts"))
from ndif_local import harness  # noqa: E402
from ndif_local.faultproxy import FaultProxy  # noqa: E402

pytestmark = [pytest.mark.ndif, pytest.mark.slow]

MODEL = "local/smollm2"


@pytest.fixture
def ndif_env(env, local_ndif):  # type: ignore[no-untyped-def]
    return local_ndif.client_env(env)


def test_expired_result_link_sends_the_jobs_again_without_spending_an_attempt(ndif_env, local_ndif) -> None:  # type: ignore[no-untyped-def]
    """The download of a COMPLETED result answers 403 (its link expired while the laptop slept):
    the jobs are sent again at once, no attempt spent (one attempt allowed: a spent one would fail
    them), and `show` says why and how much time was lost."""
    proxy = FaultProxy(local_ndif.host).start()
    try:
        env = {**local_ndif.client_env(ndif_env, host=proxy.url), "NDIF_JOBS_MAX_ATTEMPTS": "1"}
        ids = submit_all(env, jobs=JOBS[:2])
        proxy.inject("download", "expired")
        before = local_ndif.requests()
        run_cli("worker", "--until-empty", env=env, check=True, timeout=300)
        assert proxy.injected["download:expired"] == 1
        assert local_ndif.requests() - before == 2  # the bundle, then once more after the 403
        assert _states(env, ids) == [("completed", 1)] * len(ids)
        shown = json.loads(run_cli("show", ids[0], "--json", env=env, check=True).stdout)
        first = shown["attempt_history"][0]
        assert first["outcome"] == "deferred" and "result link expired after 60 min: sent again" in first["error"]
        assert shown["time_lost_s"] is not None and 0 <= shown["time_lost_s"] < 120
        text = run_cli("show", ids[0], env=env, check=True).stdout
        assert "time lost" in text and "result link expired" in text
    finally:
        proxy.stop()


def _states(env: dict[str, str], ids: list[str]) -> list[tuple[str, int]]:
    """(state, attempts) of each job, from one `status --json` (its latest jobs: all of a test's)."""
    latest = {j["id"]: j for j in json.loads(run_cli("status", "--json", env=env, check=True).stdout)["latest"]}
    return [(latest[i]["state"], latest[i]["attempts"]) for i in ids]


class _ModelCycle:
    """Evicts the stack's model from NDIF at once, and deploys it again on `deploy()`: one process
    in the server's venv (one Ray connection, which costs about 10 s to open)."""

    SCRIPT = (
        "import sys, yaml\n"
        "from ndif.cli.lib.evict import evict\n"
        "from ndif.cli.lib.deploy import deploy\n"
        "specs = yaml.safe_load(open(sys.argv[1]))['models']\n"
        "evict(model_keys=[s['model_key'] for s in specs])\n"
        "print('evicted', flush=True)\n"
        "sys.stdin.readline()\n"
        "out = deploy(specs)\n"
        "print('deployed', [d['status'] for d in out['deployments']], flush=True)\n"
    )

    def __init__(self, local_ndif) -> None:  # type: ignore[no-untyped-def]
        env = local_ndif.env
        self.layout = harness.Layout(local_ndif.root, local_ndif.port, Path(env["NDIF_LOCAL_VENV"]),
                                     Path(env["NDIF_LOCAL_MODEL_DIR"]))
        state = self.layout.load_state()
        server_env = harness.service_env(self.layout, state.get("forwarded", {}), state.get("gpu", False))
        self.proc = subprocess.Popen([self.layout.bin("python"), "-c", self.SCRIPT, str(self.layout.run / "models.yaml")],
                                     env=server_env, cwd=str(self.layout.run), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.deployed = False

    def _line(self, expected: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(expected):
            self.proc.kill()
            raise AssertionError(f"ndif {expected[:-2]} failed: {line}{self.proc.communicate()[1][-3000:]}")
        self.forget_status()

    def evicted(self) -> None:
        self._line("evicted")

    def deploy(self) -> None:
        if self.deployed:
            return
        self.deployed = True
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self._line("deployed ['READY']")
        self.proc.wait(timeout=60)

    def forget_status(self) -> None:
        """Drop the API's cached /status (kept 60 s in its Redis), so the next read is NDIF's view now."""
        with socket.create_connection(("127.0.0.1", self.layout.ports["redis"]), timeout=5) as conn:
            conn.sendall(b"*2\r\n$3\r\nDEL\r\n$6\r\nstatus\r\n")
            conn.recv(64)


def _ndif_lists_running(local_ndif) -> bool:  # type: ignore[no-untyped-def]
    import httpx

    deployments = httpx.get(f"{local_ndif.host}/status", timeout=60).json()["deployments"]
    return any(d.get("repo_id") == MODEL and d.get("application_state") == "RUNNING" for d in deployments.values())


def test_jobs_wait_for_a_model_ndif_does_not_run_and_go_once_it_runs(ndif_env, local_ndif) -> None:  # type: ignore[no-untyped-def]
    """The model evicted from NDIF (it lists it COLD): the worker sends nothing, the jobs wait in
    the queue saying why (`show`, `status`); once NDIF runs the model again they go, one request,
    no attempt spent."""
    env = {**ndif_env, "NDIF_JOBS_MODEL_WAIT_S": "0.5", "NDIF_JOBS_STATUS_CACHE_S": "0.5", "NDIF_JOBS_MAX_ATTEMPTS": "1"}
    cycle = _ModelCycle(local_ndif)
    worker = None
    try:
        ids = submit_all(env, jobs=JOBS[:2])
        cycle.evicted()
        assert not _ndif_lists_running(local_ndif)
        before = local_ndif.requests()
        worker = _start_worker(env)

        status: dict = {}

        def waits() -> bool:
            """`status` says which jobs wait for which model, and why, and so do the jobs themselves
            (`show`, `list`, the pages): queued, saying why. Every MODEL_WAIT_S the worker claims them
            for a moment to ask NDIF again, so one snapshot may catch them claimed."""
            status.update(json.loads(run_cli("status", "--json", env=env, check=True).stdout))
            return [(w["model"], w["jobs"]) for w in status["waiting_for_model"]] == [(MODEL, 2)] and all(
                job["state"] == "queued" and (job["error"] or "").startswith(f"waiting for NDIF to run {MODEL}: ")
                for job in status["latest"])

        wait_until(waits, timeout=60, what="the jobs shown queued and waiting for NDIF to run their model")
        assert "COLD" in status["waiting_for_model"][0]["reason"] and len(status["latest"]) == 2
        assert local_ndif.requests() == before  # nothing sent to the cold model
        assert worker.poll() is None

        cycle.deploy()
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-2000:]
        assert local_ndif.requests() - before == 1
        assert _states(env, ids) == [("completed", 1)] * 2
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        if cycle.proc.poll() is None:
            cycle.deploy()  # the other tests need the model running
        wait_until(lambda: _ndif_lists_running(local_ndif), timeout=120, what=f"NDIF to list {MODEL} running again")


def test_a_model_ndif_cannot_deploy_fails_its_queued_jobs_once(ndif_env, local_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model NDIF has never heard of, sent anyway (NDIF_JOBS_ALLOW_COLD=1): NDIF answers "Could
    not deploy this model" for the first bundle, and the other queued jobs of the model fail with
    that answer and what to do, without a request each (one job per bundle here)."""
    # The client knows the model's config and tokenizer (so it can submit and build the request);
    # NDIF has no copy of it and no hub to fetch it from.
    source = local_ndif.root / "hf_home" / "hub" / "models--local--smollm2"
    target = tmp_path / "hf" / "hub" / "models--local--nowhere"
    (target / "refs").mkdir(parents=True)
    (target / "refs" / "main").write_text((source / "refs" / "main").read_text())
    for snapshot in (source / "snapshots").iterdir():
        (target / "snapshots" / snapshot.name).mkdir(parents=True)
        for f in snapshot.iterdir():
            if f.suffix != ".safetensors":
                (target / "snapshots" / snapshot.name / f.name).symlink_to(f.resolve())
    env = {**ndif_env, "HF_HOME": str(tmp_path / "hf"), "NDIF_JOBS_ALLOW_COLD": "1", "NDIF_JOBS_MAX_BUNDLE": "1"}
    ids = submit_all(env, jobs=JOBS[:2], model="local/nowhere")
    before = local_ndif.requests()
    run_cli("worker", "--until-empty", env=env, check=True, timeout=300)
    assert local_ndif.requests() - before == 1
    latest = json.loads(run_cli("status", "--json", env=env, check=True).stdout)["latest"]
    assert sorted(j["id"] for j in latest) == sorted(ids)
    for job in latest:
        assert job["state"] == "failed", job
        assert "NDIF could not deploy this model: Cannot find" in job["error"] and "`ndif-jobs retry`" in job["error"]
