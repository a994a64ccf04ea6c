"""The `workers`, `workers stop` and `logs` commands (wired into the CLI by `register`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import BadInput

if TYPE_CHECKING:
    from ..db.workers import Workers
    from ..settings import Settings
    from .registry import LiveWorker


def register(app: typer.Typer, settings: Callable[[], Settings] | None = None) -> None:
    """Add `workers`, `workers stop` and `logs` to `app`; `settings` builds the settings (by
    default the CLI's, with its --env-file and --import applied)."""

    def get_settings() -> Settings:
        if settings is not None:
            return settings()
        from ..cli.app import settings as cli_settings

        return cli_settings()

    workers_app = typer.Typer(help="Live workers: list them, stop them.", invoke_without_command=True)

    @workers_app.callback()
    def workers(
        ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")
    ) -> None:
        """Every live worker from its heartbeat (stale ones marked)."""
        if ctx.invoked_subcommand is not None:
            return
        from .registry import list_workers, worker_summary

        found = list_workers(_table(get_settings()))
        if as_json:
            typer.echo(json.dumps([worker_summary(w) for w in found], indent=2))
            return
        _print_workers(found)

    @workers_app.command("stop")
    def stop(
        worker: str | None = typer.Argument(None, help="A worker's id (a unique prefix) or its pid on this host."),
        all_: bool = typer.Option(False, "--all", help="Every worker of this queue."),
        now: bool = typer.Option(False, "--now", help="Release held jobs and exit now (a second SIGTERM)."),
    ) -> None:
        """Stop workers: after the bundle in hand, or --now. Workers on other hosts stop at their next beat."""
        from .registry import list_workers, stop_workers

        table = _table(get_settings())
        found = list_workers(table)
        chosen = _choose(found, worker, all_)
        report = stop_workers(table, chosen, now)
        how = "now" if now else "after the bundle in hand"
        for wid in report.signalled:
            typer.echo(f"asked worker {wid} to stop {how} (SIGTERM{' twice' if now else ''})")
        for wid in report.marked:
            typer.echo(f"marked worker {wid} on another host to stop {how} at its next beat")
        for wid in report.forgotten:
            typer.echo(f"worker {wid} was already gone: its row removed")

    app.add_typer(workers_app, name="workers")

    @app.command()
    def logs(
        follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing what the worker writes."),
        lines: int = typer.Option(40, "--lines", "-n", min=0, help="How many of the last lines to print first."),
        backend: str | None = typer.Option(None, "--backend", "-b", help="The detached worker of this backend."),
        file: Path | None = typer.Option(None, "--log", help="This log file instead (a worker's --log FILE)."),
    ) -> None:
        """The detached worker's log (its last lines; --follow: until the worker exits, or Ctrl-C)."""
        from .logs import follow, tail

        path, alive = _log_of(get_settings(), backend, file)
        if not follow_:
            for line in tail(path, lines)[0]:
                typer.echo(line)
            return
        follow(path, sys.stdout, lines, alive=alive)


def _table(settings: Settings) -> Workers:
    from ..db.workers import Workers
    from ..service import Service

    return Workers.of_queue(Service(settings).queue)


def _choose(found: list[LiveWorker], ref: str | None, all_: bool) -> list[LiveWorker]:
    if all_:
        if ref is not None:
            raise BadInput("give a worker or --all, not both")
        if not found:
            raise BadInput("no worker is registered for this queue: nothing to stop")
        return found
    if ref is None:
        live = [w for w in found if not w.stale]
        if len(live) == 1:
            return live
        if not live:
            raise BadInput("no live worker for this queue: nothing to stop (`ndif-jobs workers` lists them)")
        raise BadInput(f"{len(live)} workers run: name one (`ndif-jobs workers` lists them) or give --all")
    matches = [w for w in found if w.id.startswith(ref) or (ref.isdigit() and w.here and w.row.pid == int(ref))]
    if not matches:
        raise BadInput(f"no worker {ref!r}: `ndif-jobs workers` lists them")
    if len(matches) > 1:
        raise BadInput(f"{ref!r} names {len(matches)} workers: give more of the id")
    return matches


def _print_workers(found: list[LiveWorker]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not found:
        console.print("no workers registered (start one: ndif-jobs worker --detach)")
        return
    table = Table(show_header=True, header_style="bold")
    for title in ("worker", "host", "pid", "backend", "since", "last beat", "bundle", "jobs done", "state"):
        table.add_column(title)
    t = time.time()
    for w in found:
        row = w.row
        state = "[red]stale[/red]" if w.stale else "[yellow]stopping[/yellow]" if row.stop_requested else "[green]live"
        table.add_row(row.id, row.host, str(row.pid), row.backend or "any",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(row.started_at)),
                      f"{t - row.last_beat:.0f} s ago", row.bundle_id or "-", str(row.jobs_done), state)
    console.print(table)


def _log_of(settings: Settings, backend: str | None, file: Path | None) -> tuple[Path, Callable[[], bool] | None]:
    """The log to show, and whether its worker still runs (None: not known)."""
    from .detach import detached_workers

    if file is not None:
        if not file.is_file():
            raise BadInput(f"--log {file}: no such file")
        return file, None
    found = [d for d in detached_workers(settings) if backend is None or d.backend == backend]
    if not found:
        which = f" of backend {backend}" if backend else ""
        raise BadInput(f"no detached worker{which} in {settings.home}: start one with `ndif-jobs worker --detach`")
    running = [d for d in found if d.alive()]
    chosen = (running or found)[0]
    if not Path(chosen.log).is_file():
        raise BadInput(f"the worker's log {chosen.log} is gone")
    return Path(chosen.log), chosen.alive


