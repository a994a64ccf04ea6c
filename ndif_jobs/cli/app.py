"""The typer app, its global options, and what every command shares: settings, the service,
output (JSON, tables, times and sizes).

Commands that only read the queue (`status`, `list`, `show`) import neither torch, nnsight,
pydantic nor, off a terminal, rich (`service(read_only=True)`, `output()`, `coercion.py`): they
answer in a few times the time Python takes to start.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import typer

from ..errors import BadInput
from ..states import JobState

if TYPE_CHECKING:
    from ..domain import Job
    from ..service import Service
    from ..settings import Settings

STATE_STYLES: dict[str, str] = {
    JobState.QUEUED: "cyan",
    JobState.CLAIMED: "blue",
    JobState.SUBMITTED: "blue",
    JobState.RUNNING: "yellow",
    JobState.COMPLETED: "green",
    JobState.CACHED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "dim",
}


class _Options:
    """The global options of this invocation (set by the app's callback)."""

    imports: list[str] = []
    offline: bool = False
    env_file: Path | None = None


options = _Options()


def new_app() -> typer.Typer:
    """The `ndif-jobs` app with its global options and no commands yet."""
    app = typer.Typer(
        name="ndif-jobs",
        help="Queue nnsight experiments, run them in bundles on NDIF or locally, keep every tensor.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(main_options)
    return app


def main_options(
    import_: list[str] = typer.Option(
        [], "--import",
        help="Your own @experiment functions: a module name, path/to/file.py or path/to/folder:module (repeatable).",
    ),
    offline: bool = typer.Option(False, "--offline", help="Serve from the store only: no network, no model."),
    env_file: Path | None = typer.Option(
        None, "--env-file", help="Read settings from this .env file instead of <data folder>/.env.",
    ),
) -> None:
    options.imports = list(import_)
    options.offline = offline
    options.env_file = env_file


# -- settings and the service ----------------------------------------------------------------


def settings() -> Settings:
    """The settings of this invocation: environment, `.env`, then the global options."""
    from ..settings import Settings

    _check_env_file()
    try:
        # `_env_file` is pydantic-settings' own argument, which its class signature does not show.
        found = Settings(_env_file=options.env_file) if options.env_file is not None else Settings()  # type: ignore[call-arg]  # `_env_file`: an init argument pydantic-settings' types leave out
    except Exception as exc:  # noqa: BLE001 - pydantic's error, made one line
        raise BadInput(f"bad configuration: {_validation_line(exc)}") from None
    updates: dict[str, Any] = {}
    if options.imports:
        updates["imports"] = ",".join(filter(None, [found.imports, *options.imports]))
    if options.offline:
        updates["offline"] = True
    return found.model_copy(update=updates) if updates else found


def _check_env_file() -> None:
    if options.env_file is not None and not options.env_file.is_file():
        raise BadInput(f"--env-file {options.env_file}: no such file")


def _validation_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for error in errors():
            where = ".".join(str(x) for x in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return "; ".join(parts)
    return str(exc).splitlines()[0]


def service(logs: bool = False, wait_for_database: bool = False, read_only: bool = False) -> Service:
    """The application service. `logs=True` for commands that log (structlog's import is not
    free), `wait_for_database=True` for the worker (see `Service`), `read_only=True` for the
    commands that only read the queue: their settings skip pydantic where nothing needs it
    (`read_settings`)."""
    from ..service import Service

    if read_only and not options.imports:
        from ..read_settings import read_settings

        _check_env_file()
        light = read_settings(options.env_file)
        if light is not None:
            if options.offline:
                from dataclasses import replace

                light = replace(light, offline=True)
            # A read command's service touches only the fields `ReadSettings` has.
            return Service(cast("Settings", light))
    found = settings()
    if logs:
        from ..logging import configure_logging, register_secret

        configure_logging(found.log_level, found.log_format)
        if found.ndif_api_key is not None:
            register_secret(found.ndif_api_key.get_secret_value())
    return Service(found, wait_for_database=wait_for_database)


# -- output ----------------------------------------------------------------------------------


def console(stderr: bool = False) -> Any:
    """A rich console; off a terminal 160 columns wide (rich assumes 80: job tables read better
    unwrapped in logs)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


def output() -> Any:
    """Where a read command prints: rich on a terminal; off one (a pipe, a log, `watch`), the same
    lines and tables as plain text, without importing rich (it costs such a command as much as
    all the rest of its work)."""
    return console() if sys.stdout.isatty() else PlainOutput()


def table(out: Any, title: str | None = None) -> Any:
    """An empty table of the kind `out` (from `output()`) prints."""
    if isinstance(out, PlainOutput):
        return PlainTable(title)
    from rich.table import Table

    return Table(title=title, title_justify="left", show_edge=False, pad_edge=False)


_MARKUP = re.compile(r"\[(?:/|/?(?:bold|dim|red|green|yellow|blue|cyan))\]")


class PlainOutput:
    """rich's `Console.print` for text and `PlainTable`s, with the styles left out."""

    def print(self, item: Any = "", markup: bool = True) -> None:
        text = item.render() if isinstance(item, PlainTable) else str(item)
        sys.stdout.write((_MARKUP.sub("", text) if markup else text) + "\n")


class PlainTable:
    """A table as aligned columns of text (rich's `Table`, for `PlainOutput`)."""

    def __init__(self, title: str | None = None) -> None:
        self.title = title
        self.columns: list[str] = []
        self.right: list[bool] = []
        self.rows: list[list[str]] = []

    def add_column(self, name: str, justify: str = "left", **_style: Any) -> None:
        self.columns.append(name)
        self.right.append(justify == "right")

    def add_row(self, *cells: str) -> None:
        self.rows.append([_MARKUP.sub("", cell) for cell in cells])

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if right else c.ljust(w)
                             for c, w, right in zip(cells, widths, self.right, strict=True)).rstrip()

        lines = ([self.title] if self.title else []) + [line(self.columns), line(["-" * w for w in widths])]
        return "\n".join(lines + [line(row) for row in self.rows])


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def ago(t: float | None) -> str:
    if not t:
        return "-"
    seconds = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"




def styled_state(state: str) -> str:
    return f"[{STATE_STYLES.get(JobState(state), '')}]{state}[/]"


def jobs_table(out: Any, jobs: list[Job], title: str | None = None) -> Any:
    """The jobs as a table for `out` (from `output()`): one row each, newest first."""
    found = table(out, title)
    for column in ("id", "state", "experiment", "model", "tags", "created", "note"):
        found.add_column(column, overflow="fold" if column == "note" else "ellipsis", no_wrap=column != "note")
    for job in jobs:
        note = (job.error or "").splitlines()[0][:60] if job.error else ""
        model = job.model if len(job.model) <= 28 else "…" + job.model[-27:]
        found.add_row(job.id, styled_state(job.state), job.experiment, model, ",".join(job.tags), ago(job.created_at),
                      note)
    return found
