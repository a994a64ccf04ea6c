"""structlog set-up: readable lines on a terminal, JSON lines otherwise, secrets redacted.

Every log call goes through `redact_secrets`, which replaces the configured NDIF API key (and
any value under a key that looks like a secret) with `***`, so the key cannot leak through a
formatted error message, an exception or a stray `repr(settings)`. A database password given
in the queue's URL is registered the same way when the database is opened (`db/engine.py`).

structlog is imported only when logging is set up: the CLI's read commands register secrets and
scrub their error lines without paying for it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.typing import Processor

_SECRET_KEYS = ("api_key", "apikey", "ndif-api-key", "password", "token", "secret")
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never print `value` in a log line from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if any(marker in key.lower() for marker in _SECRET_KEYS):
            event_dict[key] = "***"
        elif isinstance(value, str) and _secrets:
            event_dict[key] = scrub(value)
        elif isinstance(value, BaseException) and _secrets:
            event_dict[key] = scrub(repr(value))
    return event_dict


def _scrub_rendered(_logger: Any, _method: str, line: str) -> str:
    # Tracebacks are rendered late; scrub the final text as a last line of defence.
    return scrub(line) if _secrets else line


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    import structlog

    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
        exc_processor: Any = lambda _l, _m, e: e  # noqa: E731 - the console renderer formats exceptions itself
    else:
        renderer = structlog.processors.JSONRenderer()
        exc_processor = structlog.processors.format_exc_info
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            exc_processor,
            renderer,
            # structlog's `Processor` type names event-dict processors only; the one after the
            # renderer is handed the rendered line.
            cast("Processor", _scrub_rendered),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def ensure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure logging unless the application already did (the Python API's default)."""
    import structlog

    if not structlog.is_configured():
        configure_logging(level, fmt)


def get_logger(name: str = "ndif_jobs") -> Any:
    import structlog

    return structlog.get_logger(name)
