"""How a `Result`, a `collect` table and a submitted job show themselves in Jupyter (`_repr_html_`).

A result: its one-glance summary, its figure (embedded) and its names with kinds and shapes. A
collection: its sweep figure, where its experiment draws one, and its first rows. A job: its
state now (read from the queue), and while it is unfinished, how to wait for it.
Everything is escaped by Jinja2's autoescape: params and values are the user's text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import embed, pages

if TYPE_CHECKING:
    from ..service import Result


def result_html(result: Result) -> str:
    """`Result._repr_html_`: summary, figure, names. A figure that cannot be drawn is left out."""
    from ..errors import PlotError

    view = pages.result_view(result)
    figure = None
    if view.has_plot:
        try:
            figure = embed.png_uri(embed.draw_png([result]))
        except (PlotError, ImportError):
            figure = None
    return embed.env().get_template("_notebook_result.html").render(job=result.job, r=view, figure=figure)


def job_html(job: Any, settings: Any = None) -> str:
    """`Job._repr_html_` (of `ndif_jobs.submit`/`run`): its state as the queue has it now."""
    from ..errors import NdifJobsError
    from ..service import Service

    state, error = str(job.state), None
    try:
        row = Service(settings).queue.get(job.id)
        state, error = str(row.state), row.error
    except NdifJobsError:
        pass
    from ..states import ACTIVE_STATES

    active = state in {str(s) for s in ACTIVE_STATES}
    return embed.env().get_template("_notebook_job.html").render(
        id=job.id, state=state, error=error, active=active, done=state in ("completed", "cached"))


#: Rows of a collection's table shown inline; `.frame` holds them all.
COLLECTION_ROWS = 50


def collection_html(collection: Any) -> str:
    """`Collection._repr_html_`: the sweep figure (if its experiment has one) and the first rows."""
    import tempfile
    from pathlib import Path

    from ..errors import NdifJobsError
    from ..sweeps.figures import draw_sweep

    frame = collection.frame
    figure = None
    with tempfile.TemporaryDirectory(prefix="ndif-jobs-notebook-") as folder:
        try:
            figure = embed.png_uri(Path(draw_sweep(collection, Path(folder) / "sweep.png")).read_bytes())
        except (NdifJobsError, ImportError):
            figure = None
    table = frame.head(COLLECTION_ROWS).to_html(index=False, border=0, escape=True, na_rep="")
    return embed.env().get_template("_notebook_collection.html").render(
        figure=figure, table=table, shown=min(len(frame), COLLECTION_ROWS), total=len(frame))
