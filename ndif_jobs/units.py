"""How a byte count and a duration read, the same wherever ndif-jobs writes them for a person."""

from __future__ import annotations


def size_text(n: int | None) -> str:
    """`n` bytes in binary units (`512 B`, `1.5 KiB`, ..., `2.0 TiB`); `-` when unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def short_duration(seconds: float) -> str:
    """A duration in a table cell or a progress line: `1.5d`, `2.0h`, `3.5m`, `42s`, `1.2s`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def duration_text(seconds: float) -> str:
    """A duration in a message: `1 h 02 min`, `3 min 20 s`, `12 s`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
