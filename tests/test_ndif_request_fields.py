"""The exact request ndif-jobs sends to NDIF: the fields and headers nnsight 0.8 sends, no more,
no fewer. A server that wants more (upstream's 0.1.3 renames the request field `trusted` to
`tags`; nnsight 0.8.1 sends neither) or a new nnsight that sends more fails here first, loudly,
instead of as an NDIF 422 in the night.

Both clients post to one real HTTP server on loopback, which records each request whole."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

#: What nnsight 0.8.1 puts in the `data` form field (`RequestModel.metadata()`), and its headers.
DATA_FIELDS = {"model_key", "session_id", "compress", "env"}
HEADERS = {"ndif-timestamp", "nnsight-version", "python-version"}
MODEL_KEY = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "local/smollm2", "revision": null}'
API_KEY = "0b5d1c6e-8a43-4d5e-9c39-3e0d2f4b7a61"


class Captured:
    """One POST /request as the server saw it: headers, form fields, files."""

    def __init__(self, headers: dict[str, str], body: bytes) -> None:
        self.headers = headers
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body
        )
        self.fields: dict[str, Any] = {}
        self.files: dict[str, tuple[str | None, str, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            if filename is None:
                self.fields[name] = payload.decode()
            else:
                self.files[name] = (filename, part.get_content_type(), payload)

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.fields["data"])

    def header_names(self) -> set[str]:
        """Headers a client chose (httpx's own, and the body's framing, left out)."""
        return set(self.headers) - {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length",
                                    "content-type"}


@pytest.fixture
def ndif() -> Iterator[tuple[str, list[Captured]]]:
    seen: list[Captured] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(Captured({k.lower(): v for k, v in self.headers.items()}, body))
            answer = json.dumps({"id": f"job-{len(seen)}", "status": "RECEIVED", "description": ""}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _ndif_jobs_submit(host: str, tmp_path: Path, api_key: str | None, blob: bytes) -> str:
    from ndif_jobs.backends.ndif import NdifClient
    from ndif_jobs.settings import Settings

    settings = Settings(home=tmp_path, ndif_host=host, allow_http_loopback=True, ndif_api_key=api_key)
    client = NdifClient(settings)
    try:
        return client.submit(MODEL_KEY, blob, compress=True)
    finally:
        client.close()


def _nnsight_post(host: str, api_key: str | None, blob: bytes) -> None:
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.schema.request import RequestModel

    backend = RemoteBackend(MODEL_KEY, host=host, api_key=api_key, blocking=False)
    backend._post(RequestModel(model_key=MODEL_KEY, session_id="", compress=True), blob)


@pytest.mark.parametrize("api_key", [API_KEY, None], ids=["with-key", "without-key"])
def test_the_request_carries_exactly_the_fields_and_headers_nnsight_sends(ndif, tmp_path, api_key) -> None:  # type: ignore[no-untyped-def]
    from importlib.metadata import version

    host, seen = ndif
    blob = b"\x28\xb5\x2f\xfd serialized session"
    assert _ndif_jobs_submit(host, tmp_path, api_key, blob) == "job-1"
    _nnsight_post(host, api_key, blob)
    ours, theirs = seen

    # The form: one `data` field (the JSON envelope) and one `blob` file, as nnsight sends them.
    assert set(ours.fields) == set(theirs.fields) == {"data"}
    assert ours.files == theirs.files == {"blob": ("request", "application/octet-stream", blob)}
    # The envelope: exactly nnsight's fields, with the values a non-blocking request needs.
    assert set(ours.data) == set(theirs.data) == DATA_FIELDS, "the request fields changed: see this test's docstring"
    assert ours.data == {"model_key": MODEL_KEY, "session_id": "", "compress": True, "env": {}}
    assert ours.data == theirs.data
    assert "trusted" not in ours.data and "tags" not in ours.data
    # The headers: the same names; the versions the server may gate on, the key only when set.
    expected = HEADERS | ({"ndif-api-key"} if api_key else set())
    assert ours.header_names() == theirs.header_names() == expected
    assert ours.headers["nnsight-version"] == theirs.headers["nnsight-version"] == version("nnsight")
    assert ours.headers["python-version"] == theirs.headers["python-version"]
    assert float(ours.headers["ndif-timestamp"]) > 0
    if api_key:
        assert ours.headers["ndif-api-key"] == API_KEY


def test_nnsights_request_model_has_the_fields_this_client_sends() -> None:
    """nnsight's own schema of the envelope: a new field there is a field NDIF may come to want."""
    from nnsight.schema.request import RequestModel

    assert set(RequestModel.model_fields) == DATA_FIELDS


def test_ndif_local_setup_installs_the_version_asked_for_else_the_newest_the_index_serves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys
    import time

    from .conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from ndif_local import harness

    def chosen(*argv: str) -> str:
        args = harness.build_parser().parse_args(["setup", "--root", str(tmp_path), *argv])
        return harness.ndif_version(harness.make_layout(args), args)

    assert chosen("0.1.3") == "0.1.3"
    with pytest.raises(harness.Failure, match="not a version"):
        chosen("0.1.3; rm -rf /")
    # No version: the package index's newest, remembered for an hour beside the server venv.
    (tmp_path / "ndif-index.json").write_text(json.dumps({"checked_at": time.time(), "newest": "0.1.7"}))
    assert chosen() == "0.1.7"
