"""How a byte count reads, the same in the CLI, on a page and in a sweep's summary."""

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
