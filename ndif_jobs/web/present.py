"""How values read on a page: ages, sizes, tensor shapes, and text with its secrets taken out.

Text that came from NDIF or a worker (errors, status descriptions) may carry an NDIF job id, a
result URL or the API key; `redact` takes them out before any page or report shows it. Params
are the user's own text and are shown whole (escaped by the templates, never trusted).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from ..units import short_duration, size_text

_URL = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>]+", re.IGNORECASE)
_NDIF_JOB = re.compile(r"\bNDIF job [0-9A-Za-z_-]{6,}")


def redact(text: str | None, remote_ids: Iterable[str | None] = ()) -> str:
    """`text` without URLs, NDIF job ids (the given ones, and any "NDIF job X") or the API key."""
    if not text:
        return ""
    from ..logging import scrub

    out = scrub(text)
    for remote_id in remote_ids:
        if remote_id:
            out = out.replace(remote_id, "[NDIF job id]")
    out = _NDIF_JOB.sub("NDIF job [id]", out)
    return _URL.sub("[url]", out)


def ago(t: float | None) -> str:
    if not t:
        return "-"
    return f"{duration(max(0.0, time.time() - float(t)))} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return short_duration(float(seconds))


def when(t: float | None) -> str:
    """An absolute UTC time, for a tooltip beside an age."""
    if not t:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t)))


size = size_text


def rate(per_s: float | None) -> str:
    if not per_s:
        return "-"
    return f"{per_s * 3600:.0f}/h" if per_s < 1 / 60 else f"{per_s * 60:.1f}/min"


def pretty(value: Any) -> str:
    """JSON for a person to read; the template escapes it like any other text."""
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def tags(stored: str) -> list[str]:
    return [t for t in stored.strip(",").split(",") if t]


def describe(value: Any) -> tuple[str, str]:
    """A result value as (kind, what it holds): a tensor's dtype and shape, else a short repr."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dtype = str(value.dtype).removeprefix("torch.")
        shape = "×".join(str(d) for d in value.shape) or "scalar"
        if value.numel() <= 8:
            shown = [round(x, 4) if isinstance(x, float) else x for x in value.reshape(-1).tolist()]
            return f"{dtype} [{shape}]", str(shown)
        return f"{dtype} [{shape}]", ""
    if isinstance(value, list):
        head = repr(value[:10])
        return f"list [{len(value)}]", head if len(value) <= 10 else f"{head[:-1]}, …]"
    if isinstance(value, float):
        return "float", f"{value:.6g}"
    text = repr(value)
    return type(value).__name__, text if len(text) <= 300 else text[:300] + "…"
