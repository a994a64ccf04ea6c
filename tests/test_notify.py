"""Notifications: real receivers on loopback (an HTTP server, an SMTP server) get what a real
worker run tells; failures are batched; a receiver that is down never stops the worker; the
secrets in notification URLs never reach the log."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ndif_jobs import Params, experiment

from .conftest import wait_until


class BoomParams(Params):
    prompt: str


@experiment("notify-boom", params=BoomParams)
def notify_boom(model, p):  # type: ignore[no-untyped-def]
    raise ValueError("the probe is wrong on purpose")


# -- receivers ----------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on loopback that records each POSTed JSON body and answers `status`
    (or, with `hang`, never answers)."""

    def __init__(self, status: int = 200, hang: bool = False) -> None:
        self.bodies: list[dict] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hang:
                    receiver.release.wait(30)
                    return
                receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[int, list[str]]]:
    """A real SMTP server (aiosmtpd) on loopback: its port, and the messages it received."""
    from aiosmtpd.controller import Controller

    received: list[str] = []

    class Handler:
        async def handle_DATA(self, _server, _session, envelope):  # type: ignore[no-untyped-def] # noqa: N802
            received.append(envelope.content.decode(errors="replace"))
            return "250 OK"

    port = _free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, received
    controller.stop()


def _submit_and_run(service, tiny_llama: Path, extra: list | None = None):  # type: ignore[no-untyped-def]
    from ndif_jobs.service import Submission
    from ndif_jobs.worker import Worker

    subs = [Submission("activations", {"prompt": f"Night run {i}", "layers": [0]}, model=str(tiny_llama),
                       tags=["overnight"]) for i in range(2)]
    jobs = service.submit_many(subs + (extra or []))
    started = time.monotonic()
    stats = Worker(service, backend="local").run(until_empty=True)
    return jobs, stats, time.monotonic() - started


def _notify_env(monkeypatch: pytest.MonkeyPatch, urls: list[str], **more: str) -> None:
    monkeypatch.setenv("NDIF_JOBS_NOTIFY", " ".join(urls))
    for name, value in more.items():
        monkeypatch.setenv(name, value)


# -- the tests -----------------------------------------------------------------------------------


def test_a_real_worker_run_tells_an_smtp_server_and_a_webhook_it_drained_and_what_failed(  # type: ignore[no-untyped-def]
    service, tiny_llama, smtp, receiver, monkeypatch
) -> None:
    from ndif_jobs.service import Submission

    port, mails = smtp
    _notify_env(monkeypatch, [f"mailto://127.0.0.1:{port}?from=worker@example.com&to=me@example.com",
                              receiver.url()])
    boom = Submission("notify-boom", {"prompt": "x"}, model=str(tiny_llama), tags=["overnight"])
    jobs, stats, _ = _submit_and_run(service, tiny_llama, [boom])
    assert (stats.completed, stats.failed) == (2, 1)

    # Everything is sent before `run` returns (the notifier is closed on the way out).
    titles = [b["title"] for b in receiver.bodies]
    assert "ndif-jobs: the queue drained" in titles
    assert "ndif-jobs: tag overnight drained" in titles
    assert "ndif-jobs: 1 job(s) failed for good" in titles
    failed = next(b["message"] for b in receiver.bodies if "failed for good" in b["title"])
    assert jobs[2].id in failed and "notify-boom" in failed and "the probe is wrong on purpose" in failed
    tag = next(b["message"] for b in receiver.bodies if b["title"] == "ndif-jobs: tag overnight drained")
    assert "2 completed" in tag and "1 failed" in tag
    queue = next(b["message"] for b in receiver.bodies if b["title"] == "ndif-jobs: the queue drained")
    assert "2 completed, 1 failed" in queue

    drained_mails = [m for m in mails if "the queue drained" in m]
    assert len(drained_mails) == 1, mails
    assert "To: me@example.com" in drained_mails[0] and "2 completed, 1 failed" in drained_mails[0]


def test_failed_jobs_are_told_at_most_once_a_batch_period_naming_them_and_the_first_error(receiver) -> None:
    from ndif_jobs.notify import Notifier

    notifier = Notifier([receiver.url()], batch_s=1.5, timeout_s=5)
    try:
        notifier.failed("job1", "probe", "CUDA out of memory")
        wait_until(lambda: len(receiver.bodies) == 1, timeout=10, what="the first failure, at once")
        assert "job1 (probe)" in receiver.bodies[0]["message"]
        for i in range(2, 6):
            notifier.failed(f"job{i}", "probe", f"error {i}")
        time.sleep(0.8)
        assert len(receiver.bodies) == 1, "failures within the period wait for it to end"
        wait_until(lambda: len(receiver.bodies) == 2, timeout=10, what="the batch when the period ends")
        batch = receiver.bodies[1]
        assert batch["title"] == "ndif-jobs: 4 job(s) failed for good"
        assert all(f"job{i} (probe)" in batch["message"] for i in range(2, 6))
        assert "First error: error 2" in batch["message"]
        time.sleep(2.0)
        assert len(receiver.bodies) == 2
    finally:
        notifier.close(timeout_s=5)


def test_a_notifier_that_is_down_neither_stops_nor_slows_the_worker(  # type: ignore[no-untyped-def]
    service, tiny_llama, monkeypatch
) -> None:
    from ndif_jobs.notify import Notifier

    failing, hanging = Receiver(status=500), Receiver(hang=True)
    refused = f"json://127.0.0.1:{_free_port()}/hook"
    try:
        # Each event only queues its message: 500 events against a hanging receiver take no time.
        notifier = Notifier([hanging.url()], timeout_s=1)
        started = time.monotonic()
        for _ in range(500):
            notifier.drained("the queue", {"completed": 1}, 1.0)
        assert time.monotonic() - started < 0.5
        notifier.close(timeout_s=0.1)

        _notify_env(monkeypatch, [refused, failing.url(), hanging.url()], NDIF_JOBS_NOTIFY_TIMEOUT_S="1")
        _jobs, stats, seconds = _submit_and_run(service, tiny_llama)
        assert (stats.completed, stats.failed) == (2, 0)
        assert len(failing.bodies) >= 1, "the 500 receiver was tried"
        assert seconds < 30
    finally:
        failing.close()
        hanging.close()


def test_secrets_in_notification_urls_never_reach_the_log(tmp_path: Path) -> None:
    import structlog

    from ndif_jobs.logging import configure_logging, get_logger
    from ndif_jobs.notify import Notifier

    password, token = "Sup3rS3cretPw", "ntfyTok3nXYZ42"
    urls = [f"json://alice:{password}@127.0.0.1:{_free_port()}/hook", f"ntfys://{token}@ntfy.invalid/topic"]
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        notifier = Notifier(urls, timeout_s=1)
        notifier.drained("the queue", {"completed": 1}, 3.0)
        notifier.close(timeout_s=5)
        get_logger("test").warning("a careless line", target=urls[0], error=f"could not reach {urls[1]}")
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    assert "notification not delivered" in text and "a careless line" in text
    assert password not in text and token not in text
