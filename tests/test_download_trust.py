"""What a worker takes from NDIF's answers: which result URLs it fetches, what it unpickles, how
much it reads, and what it stores of NDIF's status text.

The real NDIF never serves a malicious pickle, a decompression bomb or a redirect, so these tests
put a small HTTP server on loopback in NDIF's place (`FakeNdif`): it answers the real client's
polls from a script and serves the result blobs each test builds. Everything else is real: the
worker re-attaches, as after a crash, to a bundle already at "NDIF" in a real SQLite queue, and
polls, downloads, decodes and records as it would against api.ndif.us.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import zstandard

from ndif_jobs.db.engine import dispose_engines
from ndif_jobs.db.queue import NewJob
from ndif_jobs.db.remote import RemoteBundles
from ndif_jobs.logging import configure_logging
from ndif_jobs.service import Service
from ndif_jobs.settings import Settings
from ndif_jobs.worker import Worker

REMOTE_ID = "remote-1"
MiB = 1 << 20


class FakeNdif:
    """NDIF's two read routes on 127.0.0.1: `GET /response/<id>` answers the next status of
    `statuses[id]` (the last one repeats), `GET /blob/<name>` serves `blobs[name]`: bytes, or a
    callable that writes the answer itself. It also answers as an HTTP proxy (absolute-form
    requests), so that a URL naming another host reaches it when the client is pointed at it
    with HTTP_PROXY. `requests` lists (host, path) of everything asked."""

    def __init__(self) -> None:
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.blobs: dict[str, bytes | Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[tuple[str, str]] = []
        self.sent: dict[str, int] = defaultdict(int)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeNdif:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def completed(self, blob: str, description: str = "") -> dict[str, Any]:
        return {"id": REMOTE_ID, "status": "COMPLETED", "description": description, "data": f"{self.url}/blob/{blob}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def send_body(self, code: int, body: bytes, content_type: str = "application/octet-stream") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                target = urlsplit(self.path)
                host = target.hostname or self.headers.get("Host", "").rsplit(":", 1)[0]
                fake.requests.append((host, target.path))
                kind, _, name = target.path.strip("/").partition("/")
                if kind == "response" and name in fake.statuses:
                    script = fake.statuses[name]
                    status = script.pop(0) if len(script) > 1 else script[0]
                    return self.send_body(200, json.dumps(status).encode(), "application/json")
                if kind == "blob" and name in fake.blobs:
                    blob = fake.blobs[name]
                    return blob(self) if callable(blob) else self.send_body(200, blob)
                self.send_body(404, b'{"detail": "not found"}', "application/json")

        return Handler


def stream(fake: FakeNdif, name: str, total: int, declare: bool) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer of `total` bytes written 1 MiB at a time (counted in `fake.sent[name]`), with or
    without a Content-Length: it stops when the client hangs up."""

    def write(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declare:
            handler.send_header("Content-Length", str(total))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        chunk = b"\0" * MiB
        try:
            while fake.sent[name] < total:
                handler.wfile.write(chunk)
                fake.sent[name] += len(chunk)
        except OSError:
            pass

    return write


def result_blob(saves: dict[str, Any]) -> bytes:
    """What NDIF uploads for a request: torch.save of the session's saves, zstd-compressed."""
    buffer = io.BytesIO()
    torch.save(saves, buffer)
    return zstandard.ZstdCompressor(level=3).compress(buffer.getvalue())


class MakesDirectory:
    """Unpickled, this creates a folder: a stand-in for code a tampered result would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.fixture
def fake_ndif():  # type: ignore[no-untyped-def]
    with FakeNdif() as fake:
        yield fake


def make_settings(home: Path, fake: FakeNdif, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=home, ndif_host=fake.url, allow_http_loopback=True, http_retries=2, retry_backoff_s=0.01,
        retry_backoff_max_s=0.05, poll_min_s=0.05, poll_max_s=0.2, poll_s=0.05, log_format="json",
    )
    values.update(overrides)
    return Settings(**values)


def submitted_job(service: Service) -> str:
    """One NDIF job whose worker died after submitting it: `submitted`, lease run out, so the next
    worker re-attaches to REMOTE_ID. One attempt only: a retry would hide a wrong outcome."""
    queue = service.queue
    (job,) = queue.enqueue([NewJob(key="ab" * 32, experiment="activations", model="local/smollm2",
                                   model_key="local:smollm2", backend="ndif", params={"prompt": "x"},
                                   max_attempts=1)])
    queue.claim("dead-worker", limit=1, lease_s=0.01)
    bundle = queue.start_bundle("dead-worker", "ndif", "local:smollm2", [job.id])
    RemoteBundles(queue.engine).mark_submitted("dead-worker", bundle, REMOTE_ID, [job.id], deadline=time.time() + 30)
    time.sleep(0.05)
    return job.id


def run_worker(settings: Settings, fake: FakeNdif, *statuses: dict[str, Any]) -> tuple[Service, str, str]:
    """Re-attach a real worker to a submitted job while `fake` answers `statuses`; returns the
    service, the job id and the worker's log."""
    fake.statuses[REMOTE_ID] = list(statuses)
    service = Service(settings)
    job_id = submitted_job(service)
    log = io.StringIO()
    configure_logging("info", "json", stream=log)
    try:
        Worker(service).run(until_empty=True)
    finally:
        dispose_engines()
    return service, job_id, log.getvalue()


def test_result_that_would_run_code_is_refused_unread(fake_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    fake_ndif.blobs["evil"] = result_blob({"results": {"placeholder": {"x": MakesDirectory(marker)}}})
    service, job_id, log = run_worker(make_settings(tmp_path / "home", fake_ndif), fake_ndif,
                                      fake_ndif.completed("evil"))
    job = service.queue.get(job_id)
    assert not marker.exists(), "the worker ran code from the result"
    assert job.state == "failed" and "not plain data" in job.error and "mkdir" in job.error
    assert [h for h in fake_ndif.requests if h[1] == "/blob/evil"] == [("127.0.0.1", "/blob/evil")]  # no retry


def test_plain_data_results_load_through_the_restricted_unpickler(fake_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What an ndif-jobs result holds (tensors of any dtype, views, nested lists, dicts, numbers,
    strings, None, bools) passes the data-only unpickler unchanged."""
    fake_ndif.statuses[REMOTE_ID] = [{"id": REMOTE_ID, "status": "RUNNING"}, fake_ndif.completed("good")]
    service = Service(make_settings(tmp_path / "home", fake_ndif))
    job_id = submitted_job(service)
    weights = torch.randn(4, 6)
    value = {"logits": weights[1:3].bfloat16(), "ids": torch.arange(5), "top_tokens": [" Paris", " Rome"],
             "diff": 1.25, "layers": [0, 15, 29], "nested": {"none": None, "flag": True, "pair": [1, 2]}}
    fake_ndif.blobs["good"] = result_blob({"results": {job_id: value}})
    configure_logging("info", "json", stream=io.StringIO())
    try:
        Worker(service).run(until_empty=True)
        job = service.queue.get(job_id)
        assert job.state == "completed", job.error
        stored = service.store.get(job.result_key).values
    finally:
        dispose_engines()
    assert torch.equal(stored["logits"], value["logits"]) and torch.equal(stored["ids"], value["ids"])
    assert stored["top_tokens"] == value["top_tokens"] and stored["nested"] == value["nested"]
    assert stored["diff"] == 1.25 and stored["layers"] == [0, 15, 29]


def test_result_url_over_plain_http_to_another_host_is_never_fetched(fake_ndif, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """NDIF (here on loopback, allowed) hands out http://results.example.org/...: with HTTP_PROXY
    pointing at the fake, a fetch of it would reach the fake, which would record it."""
    monkeypatch.setenv("HTTP_PROXY", fake_ndif.url)
    monkeypatch.setenv("http_proxy", fake_ndif.url)
    fake_ndif.blobs["good"] = result_blob({"results": {}})
    url = "http://results.example.org/blob/good?X-Amz-Signature=s3cr3t"
    status = {"id": REMOTE_ID, "status": "COMPLETED", "data": url}
    service, job_id, log = run_worker(make_settings(tmp_path / "home", fake_ndif), fake_ndif, status)
    job = service.queue.get(job_id)
    assert not [r for r in fake_ndif.requests if r[0] == "results.example.org"], fake_ndif.requests
    assert job.state == "failed" and "not https (http://results.example.org)" in job.error, job.error
    assert "s3cr3t" not in job.error + log  # a presigned URL's signature is a credential


@pytest.mark.parametrize(
    ("url", "allow", "fetched"),
    [
        ("https://bucket.s3.amazonaws.com/r?sig=1", False, True),
        ("http://127.0.0.1:9000/r", True, True),
        ("http://127.0.0.1:9000/r", False, False),
        ("http://localhost/r", False, False),
        ("http://10.0.0.5/r", True, False),
        ("file:///etc/passwd", True, False),
        ("ftp://example.org/r", True, False),
    ],
)
def test_result_urls_follow_the_ndif_host_rule(url: str, allow: bool, fetched: bool) -> None:
    from ndif_jobs.backends.ndif import Rejected, check_result_url

    if fetched:
        assert check_result_url(url, allow) == url
    else:
        with pytest.raises(Rejected, match="not https"):
            check_result_url(url, allow)


def test_redirect_from_the_result_url_is_not_followed(fake_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"{fake_ndif.url}/blob/elsewhere")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    fake_ndif.blobs["moved"] = redirect
    fake_ndif.blobs["elsewhere"] = result_blob({"results": {}})
    service, job_id, _ = run_worker(make_settings(tmp_path / "home", fake_ndif), fake_ndif,
                                    fake_ndif.completed("moved"))
    job = service.queue.get(job_id)
    assert ("127.0.0.1", "/blob/elsewhere") not in fake_ndif.requests
    assert job.state == "failed" and "redirect (302): not followed" in job.error, job.error


def run_worker_traced(settings: Settings, fake: FakeNdif, status: dict[str, Any]) -> tuple[Service, str, int]:
    """`run_worker`, measuring the peak of the memory Python allocated meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        service, job_id, _ = run_worker(settings, fake, status)
        return service, job_id, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decompression_bomb_fails_the_jobs_with_memory_bounded(fake_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 2 KiB frame that expands to 64 MiB, against a 1 MiB limit: decompression stops at the
    limit (plus its margin), the job fails with what to do, and no retry repeats it."""
    fake_ndif.blobs["bomb"] = zstandard.ZstdCompressor(level=3).compress(b"\0" * (64 * MiB))
    assert len(fake_ndif.blobs["bomb"]) < 8192
    settings = make_settings(tmp_path / "home", fake_ndif, max_result_bytes=MiB)
    service, job_id, peak = run_worker_traced(settings, fake_ndif, fake_ndif.completed("bomb"))
    job = service.queue.get(job_id)
    assert job.state == "failed" and job.attempts == 1, (job.state, job.error)
    assert "too large" in job.error and "NDIF_JOBS_MAX_RESULT_BYTES" in job.error, job.error
    assert peak < 24 * MiB, f"decoding the bomb took {peak / MiB:.0f} MiB"
    assert len([r for r in fake_ndif.requests if r[1] == "/blob/bomb"]) == 1  # refused, not downloaded again


@pytest.mark.parametrize("declare", [False, True], ids=["unannounced", "content-length"])
def test_oversized_download_stops_reading_past_the_limit(fake_ndif, tmp_path, declare: bool) -> None:  # type: ignore[no-untyped-def]
    fake_ndif.blobs["huge"] = stream(fake_ndif, "huge", 96 * MiB, declare)
    settings = make_settings(tmp_path / "home", fake_ndif, max_result_bytes=MiB)
    service, job_id, peak = run_worker_traced(settings, fake_ndif, fake_ndif.completed("huge"))
    job = service.queue.get(job_id)
    assert job.state == "failed" and "too large" in job.error, (job.state, job.error)
    assert fake_ndif.sent["huge"] < 48 * MiB, f"the worker read on to {fake_ndif.sent['huge'] / MiB:.0f} MiB"
    assert peak < 24 * MiB, f"the download took {peak / MiB:.0f} MiB"


def test_status_text_is_scrubbed_of_the_api_key_before_it_is_stored(fake_ndif, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """NDIF echoes what it was sent (a malformed key comes back in its error text): a status
    description that repeats the API key is stored and logged with the key masked."""
    key = "sk-ndif-4f1c9e2b7d"
    home = tmp_path / "home"
    fake_ndif.blobs["good"] = result_blob({"results": {}})
    running = {"id": REMOTE_ID, "status": "RUNNING", "description": f"request from key {key} is running"}
    service, job_id, log = run_worker(make_settings(home, fake_ndif, ndif_api_key=key), fake_ndif,
                                      running, fake_ndif.completed("good"))
    bundle = service.queue.bundle(service.queue.get(job_id).bundle_id)
    history = bundle.status_history if isinstance(bundle.status_history, list) else json.loads(bundle.status_history)
    assert any(s["status"] == "RUNNING" and s["description"] == "request from key *** is running" for s in history)
    dispose_engines()
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert key.encode() not in stored  # the queue database, its WAL, results: nowhere
    assert key not in log
