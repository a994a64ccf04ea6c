"""`ndif-jobs report`: one HTML file for a sweep, a tag or some jobs, to keep or send.

Self-contained: the stylesheet is inline, every figure a data: URI, no script at all, so it
opens from disk with no server and no network. Each job shows what its page shows (params,
attempts, result names and summary, figure) with the same escaping and the same redaction: the
NDIF job id never appears (a report is meant to leave the machine).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import embed, pages, present
from .queries import STATES, Progress

if TYPE_CHECKING:
    from ..service import Service


def _rows(service: Service, job_refs: Sequence[str] | None, sweep: str | None, tag: str | None) -> list[Any]:
    queue = service.queue
    if sweep is not None:
        from ..db.sweeps import Sweeps

        Sweeps(queue).require(sweep)
        return queue.list_jobs(sweep=sweep, limit=None, newest_first=False)
    if tag is not None:
        return queue.list_jobs(tag=tag, limit=None, newest_first=False)
    return [queue.get(ref) for ref in job_refs or ()]


def _figure(service: Service, view: pages.JobView) -> str | None:
    from ..errors import NdifJobsError
    from .figures import figure_png

    if view.result is None or not view.result.has_plot or view.result.error:
        return None
    try:
        return embed.png_uri(figure_png(service, view.job["id"]))
    except NdifJobsError:
        return None


def _sweep_figure(service: Service, sweep: str) -> str | None:
    """The sweep's own figure (`sweeps.figures.draw_sweep`), where its experiment draws one."""
    from ..collection import collect
    from ..errors import NdifJobsError
    from ..sweeps.figures import draw_sweep

    with tempfile.TemporaryDirectory(prefix="ndif-jobs-report-") as folder:
        try:
            path = draw_sweep(collect(sweep, settings=service.settings), Path(folder) / "sweep.png", title=sweep)
        except NdifJobsError:
            return None
        return embed.png_uri(Path(path).read_bytes())


def render_report(service: Service, job_refs: Sequence[str] | None = None, sweep: str | None = None,
                  tag: str | None = None, title: str | None = None) -> tuple[str, int]:
    """The report's HTML and how many jobs it holds."""
    rows = _rows(service, job_refs, sweep, tag)
    progress = Progress(sweep or tag or "jobs", {s: 0 for s in STATES})
    for row in rows:
        progress.counts[str(row.state)] = progress.counts.get(str(row.state), 0) + 1
    views = [pages.job(service, row.id) for row in rows]
    for view in views:
        view.remote_job_id = None
    figures = {view.job["id"]: _figure(service, view) for view in views}
    heading = title or (f"sweep {sweep}" if sweep else f"tag {tag}" if tag else f"{len(rows)} jobs")
    html = embed.env().get_template("report.html").render(
        title=heading, views=views, figures=figures, progress=progress, states=STATES,
        sweep_figure=_sweep_figure(service, sweep) if sweep else None, style=embed.stylesheet(),
        made=present.when(time.time()),
    )
    return html, len(rows)


def write_report(service: Service, out: Path, job_refs: Sequence[str] | None = None, sweep: str | None = None,
                 tag: str | None = None, title: str | None = None) -> tuple[Path, int]:
    """Write the report to `out` (through a temporary file beside it, renamed over it)."""
    html, count = render_report(service, job_refs, sweep, tag, title)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out, count
