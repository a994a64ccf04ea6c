"""HTML that stands alone: the figure as a data: URI, the stylesheet inline, nothing fetched.

Shared by the report (`report.py`) and the notebook views (`notebook.py`): both must open with
no server and no network.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jinja2 import Environment

from .app import HERE, template_env

if TYPE_CHECKING:
    from ..service import Result


def env() -> Environment:
    return template_env()


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def stylesheet() -> str:
    return (HERE / "static" / "app.css").read_text()


def draw_png(results: Sequence[Result]) -> bytes:
    """The `plot` figure of these results as PNG bytes, drawn here (no cache: no data folder)."""
    import matplotlib

    from ..plots import _DPI, _rc, figure

    fig = figure(list(results))
    buffer = io.BytesIO()
    with matplotlib.rc_context(_rc()):
        fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
