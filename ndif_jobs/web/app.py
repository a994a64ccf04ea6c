"""The results app: Starlette routes over one `Service`, rendered by Jinja2 with autoescape on.

Read-only except for the POST actions (retry, cancel, retry every failed job of a sweep or a
tag), each checked against the CSRF token. Pages that change while workers run (the overview,
an unfinished job) hold a `data-live` element that `static/live.js` refreshes from a fragment
route every few seconds, without reloading the page. Database reads run in Starlette's thread
pool (its sync routes): the queue's connections are made for threads.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import JobNotFound, NdifJobsError, PlotError, ResultMissing
from . import pages, present
from .queries import JobFilter
from .security import Guard, is_loopback, same

if TYPE_CHECKING:
    from ..service import Service

HERE = Path(__file__).parent
LIVE_EVERY_MS = 2000


def template_env() -> Environment:
    """Jinja2 with autoescape on for every template: params and errors are untrusted text."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(ago=present.ago, when=present.when, size=present.size, duration=present.duration,
                       rate=present.rate, pretty=present.pretty)
    return env


@dataclass(frozen=True)
class AppState:
    """What every route reads: the service, the templates, the CSRF token of this run, the
    cached totals, and the context every page gets."""

    service: Service
    templates: Jinja2Templates
    csrf: str
    counts: pages.Counts
    shared: dict[str, Any]


def create_app(service: Service, token: str | None = None, host: str = "127.0.0.1") -> Starlette:
    """The app over `service`. `token`: required on every request when given (see `security`).
    `host`: the address it is bound to; on loopback, requests naming another host are refused."""
    csrf = secrets.token_urlsafe(32)
    state = AppState(service, Jinja2Templates(env=template_env()), csrf, pages.Counts(service),
                     {"csrf": csrf, "live_every": LIVE_EVERY_MS, "guarded": token is not None})
    hosts = {"127.0.0.1", "localhost", "[::1]", host} if is_loopback(host) else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state.counts.prime()
        yield

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(Guard, token=token, hosts=hosts)],
        exception_handlers={JobNotFound: not_found, NdifJobsError: failed},
    )
    app.state.app = state
    return app


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.app
    return state


def render(request: Request, name: str, context: dict[str, Any], status: int = 200,
           headers: dict[str, str] | None = None) -> Response:
    state = _state(request)
    return state.templates.TemplateResponse(request, name, {**state.shared, **context}, status_code=status,
                                            headers=headers)


def overview(request: Request) -> Response:
    state = _state(request)
    return render(request, "overview.html", pages.overview(state.service, state.counts))


def overview_part(request: Request) -> Response:
    state = _state(request)
    return render(request, "_overview.html", pages.overview(state.service, state.counts))


def jobs(request: Request) -> Response:
    q = request.query_params
    try:
        page = max(1, int(q.get("page", "1")))
    except ValueError:
        page = 1
    f = JobFilter(state=q.get("state", ""), experiment=q.get("experiment", ""), tag=q.get("tag", ""),
                  sweep=q.get("sweep", ""), model=q.get("model", ""), text=q.get("text", ""),
                  sort=q.get("sort", "newest"), page=page)
    return render(request, "jobs.html", pages.jobs(_state(request).service, f))


def job(request: Request) -> Response:
    view = pages.job(_state(request).service, request.path_params["job_id"])
    return render(request, "job.html", {"v": view})


def job_part(request: Request) -> Response:
    view = pages.job(_state(request).service, request.path_params["job_id"])
    return render(request, "_job.html", {"v": view}, headers={"X-Live-Final": "1"} if view.final else None)


def figure(request: Request) -> Response:
    from .figures import figure_png

    try:
        png = figure_png(_state(request).service, request.path_params["job_id"])
    except (PlotError, ResultMissing) as exc:
        return PlainTextResponse(present.redact(str(exc)), status_code=404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


def download(request: Request) -> Response:
    from ..store.housekeeping import EXPORT_FORMATS, export

    fmt = request.path_params["fmt"]
    if fmt not in EXPORT_FORMATS:
        return PlainTextResponse(f"unknown format {fmt!r}", status_code=404)
    result = _state(request).service.load_result(request.path_params["job_id"], verify=True)
    folder = Path(tempfile.mkdtemp(prefix="ndif-jobs-export-"))
    path = export(result, fmt, folder)
    return FileResponse(path, filename=f"{result.job['id']}.{fmt}", media_type="application/octet-stream",
                        background=BackgroundTask(_remove_folder, folder))


def sweep(request: Request) -> Response:
    return render(request, "sweep.html", pages.sweep(_state(request).service, request.path_params["name"]))


def sweep_figure(request: Request) -> Response:
    try:
        png = pages.sweep_figure(_state(request).service, request.path_params["name"])
    except PlotError as exc:
        return PlainTextResponse(present.redact(str(exc)), status_code=404)
    return Response(png, media_type="image/png")


def sweep_table(request: Request) -> Response:
    from ..collection import collect

    name = request.path_params["name"]
    frame = collect(name, settings=_state(request).service.settings).frame
    return Response(frame.to_csv(index=False), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{_file_name(name)}.csv"'})


async def act(request: Request) -> Response:
    """Retry or cancel one job, or every failed job of a sweep or a tag: the only writes."""
    state = _state(request)
    form = await request.form()
    token = form.get("csrf")
    if not same(token if isinstance(token, str) else None, state.csrf):
        return PlainTextResponse("403: the form's CSRF token is missing or wrong: reload the page and try again",
                                 status_code=403)
    action = request.path_params["action"]
    if action not in ("retry", "cancel"):
        return PlainTextResponse("404: no such action", status_code=404)
    job_id = request.path_params.get("job_id")
    if job_id is not None:
        ids = [(await run_in_threadpool(state.service.job, job_id)).id]
        back = f"/jobs/{ids[0]}"
    else:
        sweep_name, tag = str(form.get("sweep") or ""), str(form.get("tag") or "")
        ids = await run_in_threadpool(pages.failed_ids, state.service, sweep_name or None, tag or None)
        back = "/jobs?" + ("sweep=" if sweep_name else "tag=") + (sweep_name or tag)
    await run_in_threadpool(state.service.retry if action == "retry" else state.service.cancel, ids)
    state.counts.invalidate()
    return RedirectResponse(back, status_code=303)


async def not_found(request: Request, exc: Exception) -> Response:
    return render(request, "error.html", {"message": present.redact(str(exc))}, status=404)


async def failed(request: Request, exc: Exception) -> Response:
    return render(request, "error.html", {"message": present.redact(str(exc))}, status=400)


ROUTES = [
    Route("/", overview),
    Route("/part/overview", overview_part),
    Route("/jobs", jobs),
    Route("/jobs/{job_id}", job),
    Route("/jobs/{job_id}/part", job_part),
    Route("/jobs/{job_id}/figure.png", figure),
    Route("/jobs/{job_id}/export/{fmt}", download),
    Route("/jobs/{job_id}/{action}", act, methods=["POST"]),
    Route("/failed/{action}", act, methods=["POST"]),
    Route("/sweeps/{name}", sweep),
    Route("/sweeps/{name}/figure.png", sweep_figure),
    Route("/sweeps/{name}/table.csv", sweep_table),
    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
]


def _file_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "sweep"


def _remove_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
