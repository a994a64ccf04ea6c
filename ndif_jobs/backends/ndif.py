"""The NDIF backend: one non-blocking `model.session(remote=True)` request per bundle.

A bundle's experiments travel as ONE nnsight session: nnsight serializes the session body (a
call of `runtime.run_bundle` over every job) with our experiment code shipped by value, and
names the model by its key. We POST that payload ourselves, over httpx with nnsight's wire
format, so we can tell the server's answers apart: a 503 or a dropped connection is worth a
retry, a 401 is not. Then we poll `GET /response/{id}` (recording every status), download the
result as soon as it is COMPLETED (its URL expires after an hour), check it, and unpickle it.

What is trusted: NDIF_HOST, reached over https (plain http only to this machine, under
NDIF_JOBS_ALLOW_HTTP_LOOPBACK), and the result URLs it hands out, under the same rule, with
redirects never followed. Even so a result is unpickled only as data (torch's weights-only
unpickler: tensors, numbers, strings, lists, tuples, dicts; nothing that runs code), and its
download and decompression stop at NDIF_JOBS_MAX_RESULT_BYTES plus a margin.

Errors, by what a retry can do about them (the classes are `errors.py`'s, the same for every backend):
* `Transient`: connection refused or dropped, timeouts, HTTP 5xx, 429, a truncated or corrupt
  download. Retried with exponential backoff and jitter (tenacity).
* `Rejected`: the API key (401/400/403), the version gate (400), a malformed request (422),
  "Could not deploy this model", a result refused (too large, not plain data, from a URL that is
  not https, a redirect). No retry: the message says what to do.
* `RemoteJobError`: the request ran and NDIF answered ERROR. The worker splits the bundle to
  find the job at fault.
"""

from __future__ import annotations

import calendar
import io
import ipaddress
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import version as package_version
from typing import Any
from urllib.parse import unquote, urlparse

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from .. import experiments
from ..errors import BadInput, NdifJobsError, Rejected, RemoteJobError, Transient, Unavailable
from ..logging import get_logger, register_secret, scrub
from ..model_refs import ModelRef
from ..settings import Settings
from .base import Handle, JobOutcome, JobSpec, OnStatus, Status
from .ndif_status import ModelStatus, refuses_model

log = get_logger("ndif_jobs.ndif")

FINAL = ("COMPLETED", "ERROR")
#: How long a worker keeps NDIF's `GET /env` answer before asking again.
ENV_TTL_S = 600.0

#: How long NDIF's result link lives (a presigned URL that says otherwise is believed).
RESULT_LINK_S = 3600.0


class ResultExpired(Rejected):
    """The result link of a COMPLETED request no longer works (403/404): NDIF made it `made_at`
    (epoch seconds; None when the link does not say) for `life_s` seconds. The request ran: the
    worker sends its jobs again with no attempt spent."""

    def __init__(self, message: str, made_at: float | None = None, life_s: float = RESULT_LINK_S) -> None:
        super().__init__(message)
        self.made_at = made_at
        self.life_s = life_s


class ModelRefused(Rejected):
    """NDIF refused the model itself (could not deploy it, not available for this key): every
    queued job of the model would fail the same way."""


def link_times(url: str) -> tuple[float | None, float]:
    """When a presigned result link was made and how long it lives, from its SigV4 query
    (`X-Amz-Date`, `X-Amz-Expires`), looked for even inside a URL that wraps it."""
    text = unquote(unquote(url))
    date = re.search(r"X-Amz-Date=(\d{8}T\d{6}Z)", text)
    life = re.search(r"X-Amz-Expires=(\d+)", text)
    made = calendar.timegm(time.strptime(date.group(1), "%Y%m%dT%H%M%SZ")) if date else None
    return (float(made) if made is not None else None), (float(life.group(1)) if life else RESULT_LINK_S)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _transport(url: str, allow_http_loopback: bool) -> str:
    """"ok" for https anywhere, or plain http to this machine when explicitly allowed; "flag" for
    plain http to this machine without that; "refused" for anything else."""
    parsed = urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return "ok"
    if parsed.scheme == "http" and parsed.hostname and _is_loopback(parsed.hostname):
        return "ok" if allow_http_loopback else "flag"
    return "refused"


def check_host(url: str, allow_http_loopback: bool) -> str:
    """NDIF_HOST, if it may receive the API key: https anywhere, or plain http to this machine
    only when explicitly allowed."""
    verdict = _transport(url, allow_http_loopback)
    if verdict == "ok":
        return url.rstrip("/")
    if verdict == "flag":
        raise BadInput(
            f"NDIF_HOST {url} is plain http: allow it for a local NDIF with NDIF_JOBS_ALLOW_HTTP_LOOPBACK=1"
        )
    raise BadInput(f"NDIF_HOST {url!r} must be an https:// URL (or http:// to a local NDIF on loopback)")


def check_result_url(url: str, allow_http_loopback: bool) -> str:
    """A result URL NDIF handed out, if we may fetch it: what it serves is unpickled, so NDIF_HOST's
    rule holds for it too. The message names the scheme and host only: a presigned URL's query
    is a credential."""
    if _transport(url, allow_http_loopback) == "ok":
        return url
    parsed = urlparse(url)
    raise Rejected(
        f"NDIF handed out a result URL that is not https ({parsed.scheme}://{parsed.hostname}): not fetched, "
        "as a result is unpickled; plain http is taken only from this machine, with NDIF_JOBS_ALLOW_HTTP_LOOPBACK=1"
    )


def result_limit(settings: Settings) -> int:
    """The most bytes a result may have, downloaded or decompressed: NDIF_JOBS_MAX_RESULT_BYTES,
    which bundles are packed under by estimate, plus a quarter and 1 MiB for what the estimate
    leaves out (torch.save's framing, pickled lists and strings)."""
    return settings.max_result_bytes + settings.max_result_bytes // 4 + (1 << 20)


def _too_large(what: str, limit: int) -> Rejected:
    return Rejected(
        f"the result is too large: {what} more than {limit} bytes (NDIF_JOBS_MAX_RESULT_BYTES plus a margin): "
        "not read; send fewer jobs per bundle (--max-bundle) or raise NDIF_JOBS_MAX_RESULT_BYTES, "
        "then `ndif-jobs retry` the jobs"
    )


def _detail(response: Any) -> str:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return scrub(str(detail or response.reason_phrase or "")).strip()[:500]


def classify(response: Any, action: str) -> NdifJobsError:
    """The error a non-2xx answer stands for, with what to do about it."""
    code, detail = response.status_code, _detail(response)
    if code in (401, 403) or (code == 400 and "key" in detail.lower()):
        return Rejected(
            f"NDIF refused the API key ({code}: {detail}): set NDIF_API_KEY to a valid key "
            "(get one at https://login.ndif.us), then `ndif-jobs retry` the failed jobs"
        )
    if code == 400:
        return Rejected(
            f"NDIF refused the request ({code}: {detail}): if it names a version, upgrade nnsight/python "
            "to what the server requires, then `ndif-jobs retry` the failed jobs"
        )
    if code in (429, 502, 503, 504):
        return Unavailable(f"NDIF answered {code} while trying to {action}: {detail}")
    if code >= 500:
        return Transient(f"NDIF answered {code} while trying to {action}: {detail}")
    return Rejected(f"NDIF answered {code} while trying to {action}: {detail}")


class NdifClient:
    """HTTP to one NDIF API, with retries for what a retry can fix."""

    def __init__(self, settings: Settings) -> None:
        import httpx

        self.settings = settings
        self.host = check_host(settings.ndif_host, settings.allow_http_loopback)
        key = settings.ndif_api_key.get_secret_value() if settings.ndif_api_key else ""
        register_secret(key)  # NDIF echoes a malformed key in its 400: never let it reach a log or the db
        self._key = key
        self._http = httpx.Client(timeout=httpx.Timeout(settings.http_timeout_s, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def _retrying(self, stop: threading.Event | None = None) -> Retrying:
        """Backoff with jitter for `Transient` errors. Once `stop` is set it gives up (re-raising
        the last error), waking from a backoff sleep at once: a stopping worker must not sit out
        a retry delay of minutes while NDIF is down."""
        give_up = stop_after_attempt(self.settings.http_retries) | stop_after_delay(self.settings.http_retry_max_s)
        return Retrying(
            retry=retry_if_exception_type(Transient),
            wait=wait_random_exponential(multiplier=self.settings.retry_backoff_s / 2 or 0.01,
                                         max=self.settings.retry_backoff_max_s),
            stop=give_up if stop is None else give_up | stop_when_event_set(stop),
            sleep=time.sleep if stop is None else _waiter(stop),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "retrying NDIF", attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome is not None else "",
            ),
        )

    def _call(self, method: str, url: str, action: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach NDIF at {self.host} to {action}: {type(exc).__name__}: {exc}") from None
        return response

    def _headers(self) -> dict[str, str]:
        headers = {
            "ndif-timestamp": repr(time.time()),
            "nnsight-version": package_version("nnsight"),
            "python-version": sys.version,
        }
        if self._key:
            headers["ndif-api-key"] = self._key
        return headers

    def submit(self, model_key: str, blob: bytes, compress: bool) -> str:
        """POST one request; returns NDIF's job id."""
        metadata = json.dumps({"model_key": model_key, "session_id": "", "compress": compress, "env": {}})

        def once() -> str:
            response = self._call(
                "POST", f"{self.host}/request", "submit a request",
                data={"data": metadata}, files={"blob": ("request", blob, "application/octet-stream")},
                headers=self._headers(),
            )
            if response.status_code >= 300:
                raise classify(response, "submit a request")
            try:
                body = response.json()
                return str(body["id"])
            except (ValueError, KeyError, TypeError):
                raise Transient(
                    f"NDIF answered the submission with something unreadable: {response.text[:200]!r}"
                ) from None

        return self._retrying()(once)

    def status(self, remote_id: str, stop: threading.Event | None = None) -> Status | None:
        """The job's latest status, or None while NDIF has none recorded yet (404)."""

        def once() -> Status | None:
            response = self._call("GET", f"{self.host}/response/{remote_id}", "poll a request",
                                  headers={"ndif-api-key": self._key} if self._key else None)
            if response.status_code == 404:
                return None
            if response.status_code >= 300:
                raise classify(response, "poll a request")
            try:
                body = response.json()
                # NDIF's text may repeat a secret (a malformed API key): scrubbed before it is kept.
                return Status(str(body["status"]).upper(), scrub(str(body.get("description") or "")),
                              body.get("data"), body.get("meta"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise Transient(f"NDIF answered a poll with something unreadable: {response.text[:200]!r}") from None

        return self._retrying(stop)(once)

    def download(self, url: str, limit: int) -> bytes:
        """The result blob, whole and at most `limit` bytes: a short read is an error, not a result,
        and reading stops as soon as the answer says or shows that it is larger than `limit`.

        Redirects are not followed (only the URL NDIF handed out is trusted), and the body is
        read as sent (`identity`): a content encoding (gzip, ...) would be a second decompression
        with no bound on its output."""
        import httpx

        url = check_result_url(url, self.settings.allow_http_loopback)

        def once() -> bytes:
            buffer = io.BytesIO()
            try:
                with self._http.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                    _check_download(response, limit, url)
                    expected = response.headers.get("Content-Length")
                    for chunk in response.iter_raw(1 << 20):
                        if buffer.tell() + len(chunk) > limit:
                            raise _too_large("the download ran to", limit)
                        buffer.write(chunk)
            except httpx.TransportError as exc:
                raise Unavailable(f"downloading the result broke off: {type(exc).__name__}: {exc}") from None
            data = buffer.getvalue()
            if expected is not None and int(expected) != len(data):
                raise Transient(f"downloading the result: got {len(data)} of {expected} bytes")
            return data

        return self._retrying()(once)

    def env(self, timeout_s: float = 10.0) -> Any:
        """NDIF's `GET /env` (its Python and packages), asked once with a short timeout and no
        retry: it only describes a result, so it must never hold one up."""
        response = self._call("GET", f"{self.host}/env", "read its environment", timeout=timeout_s)
        if response.status_code >= 300:
            raise classify(response, "read its environment")
        try:
            return response.json()
        except ValueError:
            raise Transient(f"NDIF answered /env with something unreadable: {response.text[:200]!r}") from None

    def deployments(self, retry: bool = True) -> dict[str, Any]:
        """NDIF's `/status` deployments (one try only, without `retry`)."""

        def once() -> dict[str, Any]:
            response = self._call("GET", f"{self.host}/status", "list models")
            if response.status_code >= 300:
                raise classify(response, "list models")
            try:
                body = response.json()
            except ValueError:
                raise Transient(f"NDIF answered /status with something unreadable: {response.text[:200]!r}") from None
            return body.get("deployments") or {} if isinstance(body, dict) else {}

        return self._retrying()(once) if retry else once()


def _check_download(response: Any, limit: int, url: str = "") -> None:
    """Raise unless `response` is a plain 2xx answer of at most `limit` bytes (as far as it says)."""
    code = response.status_code
    if 300 <= code < 400:
        raise Rejected(f"the result URL answered a redirect ({code}): not followed, as only the URL NDIF "
                       "handed out is trusted")
    if code >= 300:
        if code in (403, 404):
            made_at, life_s = link_times(url)
            raise ResultExpired(f"the result URL no longer works ({code}): it expired", made_at, life_s)
        raise Transient(f"downloading the result: HTTP {code}")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Rejected(f"the result came with Content-Encoding {encoding!r} although none was asked for: not read")
    expected = response.headers.get("Content-Length")
    if expected is not None and expected.isdigit() and int(expected) > limit:
        raise _too_large(f"the download says it is {expected} bytes,", limit)


def _is_eviction(message: str) -> bool:
    lowered = message.lower()
    return "evicted" in lowered or "try again later" in lowered


def decode_result(content: bytes, compressed: bool, limit: int) -> dict[str, Any]:
    """Decompress (to at most `limit` bytes) and unpickle a result blob, as data only.

    `torch.load(weights_only=True)` is torch's restricted unpickler: tensors and their storages,
    numbers, strings, bytes, lists, tuples, sets, dicts, None and bools, and nothing that could
    run code on load, which is all an ndif-jobs result holds (NDIF's server moves CUDA tensors to
    the CPU before it saves them, so they load the same way)."""
    try:
        if compressed:
            content = _decompress(content, limit)
        value = _unpickle(content)
    except MemoryError:
        # Not worth a retry, and a crash would recur in every worker that re-attaches to the bundle.
        raise Rejected("the result does not fit in this machine's memory: "
                       "send fewer jobs per bundle (--max-bundle), then `ndif-jobs retry` the jobs") from None
    if not isinstance(value, dict):
        raise Transient(f"the result is not a dict of saves but {type(value).__name__}")
    return value


def _unpickle(content: bytes) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken or refused blob
        refused = _unsafe_globals(content)
        if refused:
            raise Rejected(
                f"the result holds {', '.join(refused[:3])}, which is not plain data: not unpickled (an "
                "experiment must return tensors, numbers, strings, lists and dicts)"
            ) from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise Transient(f"the result is corrupt ({type(exc).__name__}: {first})") from None


def _decompress(content: bytes, limit: int) -> bytes:
    """The zstd frames in `content`, stopping past `limit` bytes of output: a small frame can
    declare or hold many GiB, and `ZstdDecompressor.decompress` allocates whatever the frame
    header says."""
    import zstandard

    out = io.BytesIO()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(content), read_across_frames=True) as reader:
            while chunk := reader.read(1 << 20):
                if out.tell() + len(chunk) > limit:
                    raise _too_large("decompressed, it runs to", limit)
                out.write(chunk)
    except zstandard.ZstdError as exc:
        raise Transient(f"the result is corrupt (zstd: {exc})") from None
    try:
        declared = zstandard.frame_content_size(content)
    except zstandard.ZstdError:
        declared = -1
    if declared >= 0 and out.tell() < declared:  # the stream reader ends a cut-off frame quietly
        raise Transient(f"the result is corrupt (zstd: {out.tell()} of {declared} bytes)")
    return out.getvalue()


def _unsafe_globals(content: bytes) -> list[str]:
    """The globals a torch.save blob names beyond torch's weights-only allowlist ([] if none, or
    if the blob cannot be read that far)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return get_unsafe_globals_in_checkpoint(io.BytesIO(content))
    except Exception:  # noqa: BLE001 - a broken blob: reported as corrupt by the caller
        return []


# -- building the request ------------------------------------------------------------------------------


_meta_models: dict[str, Any] = {}


def meta_model(ref: ModelRef) -> Any:
    """An nnsight model with no weights (from the locally cached config and tokenizer)."""
    if ref.model_key in _meta_models:
        return _meta_models[ref.model_key]
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    from ..model_refs import quiet_transformers

    quiet_transformers()
    kwargs = {"revision": ref.revision} if ref.revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.location, **kwargs)
        model = TransformersModel(ref.location, tokenizer=tokenizer, task="text-generation", **kwargs)
    except OSError as exc:
        raise BadInput(
            f"cannot build {ref.spec} without weights: its config and tokenizer are not cached here "
            f"({str(exc).splitlines()[0]}); fetch them once with network access"
        ) from None
    _meta_models[ref.model_key] = model
    return model


def serialize_bundle(model: Any, work: list[tuple[str, Callable[..., Any], dict]], model_key: str,
                     max_invokes: int, compress: bool = True) -> bytes:
    """The request payload: a session running `run_bundle` over every job, serialized by nnsight."""
    import nnsight
    from nnsight.intervention.backends.remote import RemoteBackend

    from ..experiments.runtime import run_bundle

    # Our package is not installed on NDIF: its code travels with the request, by value.
    nnsight.register("ndif_jobs")

    class Capture(RemoteBackend):
        blob: bytes = b""

        def __call__(self, tracer: Any = None) -> None:
            self.blob = self._serialize(tracer)
            return None

    capture = Capture(model_key, host="https://capture.invalid", blocking=False)
    capture.compress = compress
    with model.session(backend=capture):
        results = nnsight.save(run_bundle(model, work, max_invokes))  # noqa: F841 - read back on NDIF
    return capture.blob


def split_results(saves: dict[str, Any], job_ids: list[str]) -> dict[str, JobOutcome]:
    results = saves.get("results")
    if not isinstance(results, dict):
        raise Transient("the result holds no `results` dict: not an ndif-jobs bundle")
    out: dict[str, JobOutcome] = {}
    for job_id in job_ids:
        value = results.get(job_id)
        if value is None:
            out[job_id] = JobOutcome(error="NDIF's answer has no result for this job")
        elif isinstance(value, dict) and "$error" in value:
            out[job_id] = JobOutcome(error=str(value["$error"]), detail=str(value.get("$detail", "")))
        elif isinstance(value, dict):
            out[job_id] = JobOutcome(result=value)
        else:
            out[job_id] = JobOutcome(error=f"the experiment returned {type(value).__name__}, not a dict")
    return out


class NdifBackend:
    """Sends bundles to NDIF and waits for them by id (the worker commits the id in between)."""

    name = "ndif"
    title = "NDIF"
    reattaches = True
    standin_for: str | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = NdifClient(settings)
        self.compress = True
        self.models = ModelStatus(lambda: self.client.deployments(retry=False), settings.status_cache_s)
        #: NDIF's `GET /env` answer and until when (monotonic) it is kept (`server_env`).
        self._env: tuple[float, dict[str, Any]] | None = None

    def not_ready(self, model: ModelRef) -> str | None:
        """Why NDIF would have to deploy `model` for a bundle (None: it runs it now, or NDIF_JOBS_ALLOW_COLD)."""
        if self.settings.allow_cold or model.kind != "hub":
            return None
        verdict = self.models.readiness(model.model_key, model.location)
        return None if verdict.ready else verdict.why

    def load(self, model: ModelRef) -> None:
        """Nothing to load here: NDIF holds the weights."""

    def server_env(self) -> dict[str, Any]:
        """NDIF's `GET /env` answer, or `{"error": why}` where it gave none; asked at most every
        `ENV_TTL_S` per worker (NDIF itself caches it for 5 minutes)."""
        if self._env is not None and time.monotonic() < self._env[0]:
            return dict(self._env[1])
        try:
            found = self.client.env()
            env = found if isinstance(found, dict) else {"error": f"not a JSON object: {type(found).__name__}"}
        except NdifJobsError as exc:
            env = {"error": str(exc).splitlines()[0][:300]}
        self._env = (time.monotonic() + (ENV_TTL_S if "error" not in env else 60.0), env)
        return dict(env)

    def provenance(self, model: ModelRef) -> dict[str, Any]:
        """What a result from NDIF records of where it ran: the host and NDIF's environment."""
        return {"host": self.client.host, "server_env": self.server_env()}

    def send(self, model: ModelRef, jobs: list[JobSpec]) -> Handle:
        """POST one bundle; the handle holds NDIF's job id and the payload's size."""
        if model.kind != "hub":
            raise Rejected(f"model {model.spec!r} is local: only Hugging Face repo ids run on NDIF")
        nn_model = meta_model(model)
        work = [(job.job_id, experiments.get(job.experiment).function(), job.params) for job in jobs]
        blob = serialize_bundle(nn_model, work, model.model_key, self.settings.max_invokes, self.compress)
        remote_id = self.client.submit(model.model_key, blob, self.compress)
        return Handle(job_ids=[job.job_id for job in jobs], remote_id=remote_id,
                      deadline=time.time() + self.settings.bundle_deadline_s, payload_bytes=len(blob))

    def wait(
        self, handle: Handle, stop: threading.Event, on_status: OnStatus | None = None
    ) -> dict[str, JobOutcome] | None:
        """Poll until COMPLETED (the outcomes), ERROR (raises), the deadline (None), or a stop.

        While NDIF cannot be reached the request is still there: polling goes on (each poll
        already retried with backoff) until NDIF is back or the deadline passes. Setting `stop`
        ends the wait at once, even mid-retry: the request stays at NDIF and the next worker
        re-attaches to it.
        """
        if handle.remote_id is None:
            raise ValueError("an NDIF handle holds NDIF's job id")
        remote_id, job_ids, deadline = handle.remote_id, handle.job_ids, handle.deadline
        delay = self.settings.poll_min_s
        last: tuple[str, str] | None = None
        evicted_at: float | None = None
        unreachable_since: float | None = None
        while True:
            if deadline is not None and time.time() > deadline:
                return None
            if stop.is_set():
                raise Transient("the worker is stopping")
            try:
                status = self.client.status(remote_id, stop)
                if status is not None and status.status == "COMPLETED":
                    outcomes = self._fetch(status, job_ids, handle)
            except Unavailable as exc:
                if unreachable_since is None:
                    unreachable_since = time.time()
                    log.warning("NDIF unreachable while waiting: the request stays there, polling on",
                                remote_job=remote_id, error=str(exc))
                stop.wait(self.settings.poll_max_s)
                continue
            if unreachable_since is not None:
                log.info("NDIF reachable again", remote_job=remote_id,
                         down_s=round(time.time() - unreachable_since, 1))
                unreachable_since = None
            if status is not None and (status.status, status.description) != last:
                last = (status.status, status.description)
                if on_status is not None:
                    on_status(status)
            if status is not None and status.status == "ERROR":
                message = scrub(status.description.strip()) or "NDIF reported an error"
                if refuses_model(message):
                    said = next(line for line in message.splitlines() if refuses_model(line)).strip()
                    detail = re.sub(r"(?i)^could not deploy this model\.?\s*", "", said)
                    head = "NDIF could not deploy this model" if detail != said else "NDIF refused this model"
                    raise ModelRefused(f"{head}: {detail[:300] or 'no reason given'}; its queued jobs failed with"
                                       " it: check the model id and your key's access at https://ndif.us, then"
                                       " `ndif-jobs retry` them")
                if _is_eviction(message):
                    # The replica was evicted (e.g. the API restarted); the model may still finish
                    # the request, and NDIF then reports COMPLETED after this ERROR.
                    evicted_at = evicted_at or time.time()
                    if time.time() - evicted_at > self.settings.eviction_grace_s:
                        raise Transient(f"NDIF evicted the request: {message.splitlines()[0][:200]}")
                else:
                    raise RemoteJobError(message)
            if status is not None and status.status == "COMPLETED":
                return outcomes
            stop.wait(delay)
            delay = min(delay * 1.5, self.settings.poll_max_s)

    def _fetch(self, status: Status, job_ids: list[str], handle: Handle | None = None) -> dict[str, JobOutcome]:
        data = status.data
        limit = result_limit(self.settings)
        attempts = max(self.settings.http_retries, 1)
        for attempt in range(1, attempts + 1):
            if isinstance(data, str) and "://" in data:
                began = time.monotonic()
                content = self.client.download(data, limit)
                if handle is not None:  # every download counts: a corrupt one was sent too
                    handle.download_s = (handle.download_s or 0.0) + time.monotonic() - began
                    handle.downloaded_bytes = (handle.downloaded_bytes or 0) + len(content)
            elif isinstance(data, (bytes, bytearray)):
                content = bytes(data)
            else:
                raise Transient("NDIF said COMPLETED without a result")
            try:
                return split_results(decode_result(content, self.compress, limit), job_ids)
            except Transient:
                if attempt == attempts:
                    raise
                log.warning("the downloaded result was corrupt: downloading it again", attempt=attempt)
        raise Transient("unreachable")


def _waiter(stop: threading.Event) -> Callable[[float], None]:
    """A sleep that a set `stop` cuts short (tenacity's `sleep` takes seconds and returns nothing)."""

    def wait(seconds: float) -> None:
        stop.wait(seconds)

    return wait
