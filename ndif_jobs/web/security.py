"""Who may see the pages, and which requests may change anything.

- **The token.** Bound to loopback the app needs none (only this machine reaches it); bound to
  any other address it refuses to start without one (`require_token`). With a token every
  request is 401 unless it shows it: `Authorization: Bearer TOKEN`, the cookie the first visit
  sets, or `?token=TOKEN` once (answered by a redirect that drops it from the address, and the
  cookie). Compared with `secrets.compare_digest`, in constant time.
- **CSRF.** The only writes are POST forms (retry, cancel); each carries the app's CSRF token,
  a random value a page from another site cannot read, checked in constant time.
- **Host.** Requests naming a host the app was not started for are refused, so a hostile page
  cannot rebind a DNS name to 127.0.0.1 and read the queue through it.
- **Headers.** A Content-Security-Policy allowing only the app's own script and style, so even
  text that slipped past escaping could not run.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..errors import BadInput

COOKIE = "ndif_jobs_token"
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                                 b" connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The token the app will ask for, and whether it was generated here (to print it once).
    None on loopback without `--token`; a new random one for any other address without it."""
    if token is not None and (len(token) < 16 or not _TOKEN_CHARS.fullmatch(token)):
        raise BadInput("--token must be at least 16 letters, digits, '-' or '_' (or leave it out for a generated one)")
    if token is not None or is_loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def same(a: str | None, b: str) -> bool:
    return a is not None and secrets.compare_digest(a.encode(), b.encode())


class Guard:
    """ASGI middleware: the token, the allowed hosts and the security headers on every answer."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: set[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and _hostname(headers.get("host", "")) not in self.hosts:
            await _plain(send, 400, "unknown host: open the address ndif-jobs ui printed")
            return
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if same(query.get("token"), self.token):
                await _login_redirect(send, scope, query, self.token)
                return
            if not (same(_bearer(headers), self.token) or same(_cookie(headers, COOKIE), self.token)):
                await _plain(send, 401, "401: this ndif-jobs ui needs its token (the address it printed has it)",
                             [(b"www-authenticate", b"Bearer")])
                return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def _plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *(extra or []), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


async def _login_redirect(send: Send, scope: Scope, query: dict[str, str], token: str) -> None:
    """Set the token's cookie and send the browser to the same page without the token in it."""
    rest = {k: v for k, v in query.items() if k != "token"}
    target = scope.get("path", "/") + (f"?{urlencode(rest)}" if rest else "")
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", target.encode()), (b"set-cookie", cookie.encode()),
                            (b"content-length", b"0"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b""})
