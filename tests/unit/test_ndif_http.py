"""What the NDIF client makes of each HTTP answer, and how its polling loop waits.

The network is the boundary here: `httpx.MockTransport` stands in for NDIF and answers each
request from a script, so every answer and every failure is chosen exactly and nothing waits on
a real server. The real server's behaviour is covered end to end by tests/test_ndif.py.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ndif_jobs.backends.base import Handle
from ndif_jobs.backends.ndif import NdifBackend, NdifClient, classify
from ndif_jobs.errors import Rejected, RemoteJobError, Transient, Unavailable
from ndif_jobs.logging import register_secret
from ndif_jobs.settings import Settings

HOST = "https://ndif.test"
Handler = Callable[[httpx.Request], httpx.Response]


def make_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a client of the scripted NDIF: no waits between retries unless a test asks."""
    values: dict[str, Any] = dict(
        home=home, ndif_host=HOST, ndif_api_key=None, http_retries=3, retry_backoff_s=0.0,
        retry_backoff_max_s=0.0, poll_min_s=0.01, poll_max_s=0.01, eviction_grace_s=0.0,
    )
    values.update(overrides)
    return Settings(**values)


def on_mock(client: NdifClient, handler: Handler) -> NdifClient:
    """`client`, its HTTP calls answered by `handler` instead of the network."""
    client._http.close()
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    return client


class Script:
    """Answers requests in order from `answers` (the last one repeats); an exception instance in
    the list is raised instead, as a dropped connection would be. Records every request."""

    def __init__(self, answers: Iterable[httpx.Response | Exception]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        # A fresh, unread copy each time: a body is streamed once, and the last answer may repeat.
        return httpx.Response(answer.status_code, headers=answer.headers, stream=httpx.ByteStream(answer.content))


def refused() -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused")


# -- classifying an answer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "detail", "kind", "says"),
    [
        (401, "Missing API key", Rejected, "NDIF_API_KEY"),
        (403, "Unknown API key", Rejected, "NDIF_API_KEY"),
        (400, "Invalid API key format", Rejected, "NDIF_API_KEY"),
        (400, "Client nnsight 0.8.1 is below the minimum 0.9.0", Rejected, "upgrade nnsight"),
        (422, "data: field required", Rejected, "422"),
        (404, "Not Found", Rejected, "404"),
        (429, "slow down", Unavailable, "429"),
        (502, "Bad Gateway", Unavailable, "502"),
        (503, "Cluster not connected", Unavailable, "503"),
        (504, "Gateway Timeout", Unavailable, "504"),
        (500, "Internal Server Error", Transient, "500"),
    ],
)
def test_each_answer_is_classified_by_what_a_retry_can_do(code: int, detail: str, kind: type, says: str) -> None:
    error = classify(httpx.Response(code, json={"detail": detail}), "submit a request")
    assert type(error) is kind  # exactly: a 500 is worth a retry but is not an outage
    assert says in str(error) and detail in str(error)


def test_an_answer_without_json_is_described_by_its_text_or_reason() -> None:
    assert "upstream timed out" in str(classify(httpx.Response(502, text="upstream timed out"), "poll"))
    assert "Service Unavailable" in str(classify(httpx.Response(503), "poll"))
    long = classify(httpx.Response(500, text="x" * 10_000), "poll")
    assert len(str(long)) < 700


def test_an_api_key_echoed_by_ndif_never_reaches_the_message() -> None:
    register_secret("f00d-not-a-uuid-key")
    error = classify(httpx.Response(400, json={"detail": "API key 'f00d-not-a-uuid-key' is not a UUID"}), "submit")
    assert isinstance(error, Rejected)
    assert "f00d-not-a-uuid-key" not in str(error) and "***" in str(error)


# -- one call, with its retries -------------------------------------------------------------------


def test_submit_rides_out_an_outage_and_returns_ndifs_job_id(tmp_path: Path) -> None:
    script = Script([httpx.Response(503, json={"detail": "Cluster not connected"}), refused(),
                     httpx.Response(200, json={"id": "job-1", "status": "RECEIVED"})])
    client = on_mock(NdifClient(make_settings(tmp_path, ndif_api_key="0000-key")), script)
    assert client.submit("model-key", b"payload", compress=True) == "job-1"
    assert len(script.requests) == 3
    sent = script.requests[-1]
    assert (sent.method, str(sent.url)) == ("POST", f"{HOST}/request")
    assert sent.headers["ndif-api-key"] == "0000-key" and "nnsight-version" in sent.headers
    body = sent.read()
    assert b'"model_key": "model-key"' in body and b'"session_id": ""' in body and b"payload" in body


def test_no_api_key_header_without_a_key(tmp_path: Path) -> None:
    script = Script([httpx.Response(200, json={"id": "job-1"})])
    on_mock(NdifClient(make_settings(tmp_path)), script).submit("model-key", b"payload", compress=False)
    assert "ndif-api-key" not in script.requests[0].headers


@pytest.mark.parametrize("code", [400, 401, 403, 422])
def test_a_refused_request_is_never_sent_twice(tmp_path: Path, code: int) -> None:
    script = Script([httpx.Response(code, json={"detail": "no"})])
    client = on_mock(NdifClient(make_settings(tmp_path, http_retries=5)), script)
    with pytest.raises(Rejected):
        client.submit("model-key", b"payload", compress=True)
    assert len(script.requests) == 1


def test_an_unreachable_ndif_is_tried_http_retries_times_then_unavailable(tmp_path: Path) -> None:
    script = Script([refused()])
    client = on_mock(NdifClient(make_settings(tmp_path, http_retries=4)), script)
    with pytest.raises(Unavailable, match=f"cannot reach NDIF at {HOST}"):
        client.submit("model-key", b"payload", compress=True)
    assert len(script.requests) == 4


def test_an_unreadable_answer_is_tried_again(tmp_path: Path) -> None:
    script = Script([httpx.Response(200, text="<html>proxy error</html>"), httpx.Response(200, json={"id": "job-2"})])
    assert on_mock(NdifClient(make_settings(tmp_path)), script).submit("k", b"p", compress=True) == "job-2"
    assert len(script.requests) == 2


def test_a_poll_reads_the_status_or_none_before_ndif_has_one(tmp_path: Path) -> None:
    register_secret("feed-secret-key")
    script = Script([httpx.Response(404, json={"detail": "not yet"}),
                     httpx.Response(200, json={"id": "r", "status": "queued",
                                               "description": "position 3 for feed-secret-key"})])
    client = on_mock(NdifClient(make_settings(tmp_path)), script)
    assert client.status("r") is None
    status = client.status("r")
    assert status is not None and status.status == "QUEUED"
    assert status.description == "position 3 for ***"
    assert str(script.requests[0].url) == f"{HOST}/response/r"


def test_setting_stop_ends_a_poll_that_is_sitting_out_a_retry_delay(tmp_path: Path) -> None:
    script = Script([httpx.Response(503, json={"detail": "down"})])
    settings = make_settings(tmp_path, http_retries=100, retry_backoff_s=60.0, retry_backoff_max_s=60.0)
    client = on_mock(NdifClient(settings), script)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.status("r", stop)
    assert time.monotonic() - started < 5  # not the up-to-a-minute backoff before the next try


# -- the polling loop -----------------------------------------------------------------------------


def result_blob(results: dict[str, Any]) -> bytes:
    """A bundle's answer as NDIF stores it: `torch.save` of the saves, zstd-compressed."""
    import torch
    import zstandard

    buffer = io.BytesIO()
    torch.save({"results": results}, buffer)
    return zstandard.ZstdCompressor(level=3).compress(buffer.getvalue())


def status(state: str, description: str = "", data: Any = None) -> httpx.Response:
    return httpx.Response(200, json={"id": "r", "status": state, "description": description, "data": data})


class FakeNdif:
    """Polls of `/response/r` answered by `statuses`, downloads of `/blob` by `blobs` (each a
    `Script`: in order, the last one repeating)."""

    def __init__(self, statuses: Iterable[httpx.Response | Exception], blobs: Iterable[bytes] = (b"",)) -> None:
        self.polls = Script(statuses)
        self.downloads = Script(httpx.Response(200, content=blob) for blob in blobs)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return (self.downloads if request.url.path == "/blob" else self.polls)(request)


def backend_on(fake: FakeNdif, settings: Settings) -> NdifBackend:
    backend = NdifBackend(settings)
    on_mock(backend.client, fake)
    return backend


def wait(backend: NdifBackend, job_ids: list[str], deadline: float | None = None,
         stop: threading.Event | None = None) -> tuple[Any, list[tuple[str, str]]]:
    """`backend.wait` on NDIF request `r`; returns its outcomes and the statuses it reported."""
    seen: list[tuple[str, str]] = []
    handle = Handle(job_ids=job_ids, remote_id="r", deadline=deadline)
    out = backend.wait(handle, stop or threading.Event(), lambda s: seen.append((s.status, s.description)))
    return out, seen


def test_wait_reports_each_new_status_once_and_returns_every_jobs_outcome(tmp_path: Path) -> None:
    import torch

    blob = result_blob({"a": {"x": torch.arange(3)}, "b": {"$error": "ValueError: bad layer", "$detail": "tb"},
                        "d": [1, 2]})
    fake = FakeNdif([httpx.Response(404), status("QUEUED", "position 2"), status("QUEUED", "position 2"),
                     status("RUNNING"), status("COMPLETED", data=f"{HOST}/blob")], [blob])
    outcomes, seen = wait(backend_on(fake, make_settings(tmp_path)), ["a", "b", "c", "d"])
    assert seen == [("QUEUED", "position 2"), ("RUNNING", ""), ("COMPLETED", "")]
    assert torch.equal(outcomes["a"].result["x"], torch.arange(3)) and outcomes["a"].ok
    assert (outcomes["b"].error, outcomes["b"].detail) == ("ValueError: bad layer", "tb")
    assert outcomes["c"].error == "NDIF's answer has no result for this job"
    assert "list" in outcomes["d"].error


def test_a_corrupt_download_is_fetched_again(tmp_path: Path) -> None:
    good = result_blob({"a": {"n": 1}})
    fake = FakeNdif([status("COMPLETED", data=f"{HOST}/blob")], [good[: len(good) // 2], good])
    outcomes, _ = wait(backend_on(fake, make_settings(tmp_path)), ["a"])
    assert outcomes["a"].result == {"n": 1}
    assert len(fake.downloads.requests) == 2


def test_an_error_answer_is_the_requests_fault(tmp_path: Path) -> None:
    fake = FakeNdif([status("RUNNING"), status("ERROR", "Traceback (most recent call last):\nRuntimeError: boom")])
    with pytest.raises(RemoteJobError, match="boom"):
        wait(backend_on(fake, make_settings(tmp_path)), ["a"])


def test_a_model_ndif_cannot_deploy_is_refused_for_good(tmp_path: Path) -> None:
    fake = FakeNdif([status("ERROR", "Could not deploy this model. Not enough memory.")])
    with pytest.raises(Rejected, match="could not deploy"):
        wait(backend_on(fake, make_settings(tmp_path)), ["a"])


def test_an_eviction_within_the_grace_is_waited_out_for_a_late_completion(tmp_path: Path) -> None:
    fake = FakeNdif([status("RUNNING"), status("ERROR", "Replica evicted. Try again later."),
                     status("ERROR", "Replica evicted. Try again later."), status("COMPLETED", data=f"{HOST}/blob")],
                    [result_blob({"a": {"n": 2}})])
    outcomes, seen = wait(backend_on(fake, make_settings(tmp_path, eviction_grace_s=30.0)), ["a"])
    assert outcomes["a"].result == {"n": 2}
    assert [s for s, _ in seen] == ["RUNNING", "ERROR", "COMPLETED"]


def test_an_eviction_past_the_grace_is_worth_another_try_not_the_bundles_fault(tmp_path: Path) -> None:
    fake = FakeNdif([status("ERROR", "Replica evicted. Try again later.")])
    started = time.monotonic()
    with pytest.raises(Transient, match="evicted") as caught:
        wait(backend_on(fake, make_settings(tmp_path, eviction_grace_s=0.2)), ["a"])
    assert not isinstance(caught.value, RemoteJobError)
    assert time.monotonic() - started >= 0.2


def test_an_unreachable_ndif_is_polled_until_it_is_back(tmp_path: Path) -> None:
    fake = FakeNdif([refused(), refused(), httpx.Response(503), refused(), status("RUNNING"),
                     status("COMPLETED", data=f"{HOST}/blob")], [result_blob({"a": {"n": 3}})])
    outcomes, seen = wait(backend_on(fake, make_settings(tmp_path, http_retries=1)), ["a"])
    assert outcomes["a"].result == {"n": 3}
    assert seen == [("RUNNING", ""), ("COMPLETED", "")]
    assert len(fake.polls.requests) == 6


def test_setting_stop_ends_the_wait_at_once_while_ndif_is_unreachable(tmp_path: Path) -> None:
    fake = FakeNdif([refused()])
    backend = backend_on(fake, make_settings(tmp_path, http_retries=1, poll_max_s=60.0))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Transient, match="stopping"):
        wait(backend, ["a"], stop=stop)
    assert time.monotonic() - started < 5  # not the minute between polls


def test_no_answer_by_the_deadline_gives_none(tmp_path: Path) -> None:
    fake = FakeNdif([status("RUNNING")])
    outcomes, seen = wait(backend_on(fake, make_settings(tmp_path)), ["a"], deadline=time.time() + 0.3)
    assert outcomes is None and seen == [("RUNNING", "")]
