"""An HTTP proxy between ndif-jobs and a real NDIF, injecting the faults NDIF never makes itself.

NDIF answers 503 only while its cluster reconnects, and never 429, a dropped connection, a
truncated or corrupt result, or queue latency on demand; real networks and proxies do. This
proxy forwards every request to the real API and, when told to, answers in their place:

    proxy = FaultProxy(upstream="http://127.0.0.1:8011").start()
    proxy.inject("submit", "503", times=2)     # the next two POST /request get a 503
    proxy.inject("download", "truncate")       # the next result download is cut short
    proxy.inject("download", "expired")        # the next result download answers 403: the link expired
    proxy.latency_s["submit"] = 2.0            # every POST /request waits 2 s (queue latency)
    proxy.down = True                          # NDIF is down: every connection is cut, unanswered

Result URLs in COMPLETED answers are rewritten to pass through the proxy as well (NDIF hands
out presigned object-store URLs), so downloads can be faulted too. Counters say what it saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import httpx

KINDS = {"submit", "poll", "download", "status"}
FAULTS = {"503", "429", "500", "drop", "truncate", "corrupt", "garbage", "delay", "expired"}
#: What an S3-compatible store answers for a presigned URL past its expiry.
EXPIRED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Request has expired</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._faults: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.seen: dict[str, int] = defaultdict(int)
        self.injected: dict[str, int] = defaultdict(int)
        self.latency_s: dict[str, float] = defaultdict(float)
        #: Submissions to swallow: NDIF gets them, but every poll of their id answers 404 ("no
        #: status yet"), as when a replica dies and its request waits forever.
        self.stall_submissions = 0
        #: While set, NDIF is down: every request's connection is cut without an answer.
        self.down = False
        self.stalled: set[str] = set()
        self._client = httpx.Client(timeout=120)

    def start(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()

    def inject(self, kind: str, fault: str, times: int = 1, arg: float = 0.0) -> None:
        assert kind in KINDS and fault in FAULTS, (kind, fault)
        with self._lock:
            self._faults[kind].extend([(fault, arg)] * times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, kind: str) -> tuple[str, float] | None:
        with self._lock:
            self.seen[kind] += 1
            if self._faults[kind]:
                fault = self._faults[kind].pop(0)
                self.injected[f"{kind}:{fault[0]}"] += 1
                return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _kind(self) -> str:
                path = urlparse(self.path).path
                if path == "/request":
                    return "submit"
                if path.startswith("/response/"):
                    return "poll"
                if path == "/_download":
                    return "download"
                return "status"

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

            def _tunnel(self) -> None:
                """A websocket (nnsight's blocking /subscribe): bytes piped both ways, untouched."""
                import socket

                target = urlparse(proxy.upstream)
                upstream = socket.create_connection((target.hostname, target.port or 80))
                head = f"{self.command} {self.path} HTTP/1.1\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in self.headers.items() if k.lower() != "host"
                ) + f"Host: {target.hostname}:{target.port}\r\n\r\n"
                upstream.sendall(head.encode())
                client = self.connection

                def pipe(src: Any, dst: Any) -> None:
                    try:
                        while chunk := src.recv(65536):
                            dst.sendall(chunk)
                    except OSError:
                        pass
                    finally:
                        for s in (src, dst):
                            try:
                                s.shutdown(2)
                            except OSError:
                                pass

                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join()
                self.close_connection = True

            def _handle(self, method: str) -> None:
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    return self._tunnel()
                kind = self._kind()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.down:
                    with proxy._lock:
                        proxy.injected[f"{kind}:down"] += 1
                    return self._drop()
                fault = proxy._take(kind)
                extra = proxy.latency_s.get(kind, 0.0)
                if extra:
                    time.sleep(extra)
                if fault is not None:
                    name, arg = fault
                    if name == "delay":
                        time.sleep(arg)
                    elif name in ("503", "429", "500"):
                        detail = json.dumps({"detail": f"injected {name}"}).encode()
                        return self._send(int(name), detail, {"Content-Type": "application/json"})
                    elif name == "drop":
                        return self._drop()
                    elif name == "expired":
                        return self._send(403, EXPIRED_BODY, {"Content-Type": "application/xml"})
                    elif name == "garbage":
                        return self._send(200, b"<html>not json</html>", {"Content-Type": "text/html"})
                if kind == "poll" and urlparse(self.path).path.rsplit("/", 1)[-1] in proxy.stalled:
                    return self._send(404, b'{"detail": "not found"}', {"Content-Type": "application/json"})
                if kind == "download":
                    target = parse_qs(urlparse(self.path).query)["u"][0]
                    upstream = proxy._client.get(target)
                    content = upstream.content
                    if fault is not None and fault[0] == "truncate":
                        # Claim the full length, send half, hang up: a download cut off midway.
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(content)))
                        self.end_headers()
                        self.wfile.write(content[: len(content) // 2])
                        return self._drop()
                    if fault is not None and fault[0] == "corrupt":
                        content = bytearray(content)
                        for i in range(0, len(content), max(1, len(content) // 16)):
                            content[i] ^= 0xFF
                        content = bytes(content)
                    return self._send(upstream.status_code, content)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = proxy._client.request(method, proxy.upstream + self.path, content=body, headers=headers)
                content = upstream.content
                if kind == "poll" and upstream.status_code == 200:
                    content = self._rewrite(content)
                if kind == "submit" and upstream.status_code == 200 and proxy.stall_submissions > 0:
                    with proxy._lock:
                        proxy.stall_submissions -= 1
                        proxy.stalled.add(json.loads(content)["id"])
                passed = {k: v for k, v in upstream.headers.items()
                          if k.lower() in ("content-type",)}
                self._send(upstream.status_code, content, passed)

            def _rewrite(self, content: bytes) -> bytes:
                try:
                    body = json.loads(content)
                except ValueError:
                    return content
                data = body.get("data") if isinstance(body, dict) else None
                if isinstance(data, str) and data.startswith("http"):
                    body["data"] = f"{proxy.url}/_download?u={quote(data, safe='')}"
                    return json.dumps(body).encode()
                return content

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        return Handler
