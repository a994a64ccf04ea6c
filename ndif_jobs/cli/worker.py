"""The `worker` command: run queued jobs until stopped (or until the queue is drained)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import BadInput
from .app import console, options, service, settings

if TYPE_CHECKING:
    from ..worker import Worker, WorkerStats


def register(app: typer.Typer, only: str | None = None) -> None:
    app.command()(worker)


def worker(
    until_empty: bool = typer.Option(False, "--until-empty", help="Exit once the queue is drained."),
    backend: str | None = typer.Option(
        None, "--backend", "-b",
        help="local: local jobs, and NDIF jobs whose model has a stand-in (NDIF_JOBS_LOCAL_STANDINS); "
        "ndif: only NDIF jobs."
    ),
    max_bundle: int | None = typer.Option(None, "--max-bundle", min=1, help="Most jobs per bundle."),
    device: str | None = typer.Option(None, "--device", help="Torch device for local runs (cpu, cuda, cuda:1)."),
    detach: bool = typer.Option(
        False, "--detach", help="Run in the background (pid and log files under the data folder) and return."
    ),
    log_file: Path | None = typer.Option(
        None, "--log", help="With --detach: the log file (default: <data folder>/logs/worker-BACKEND-QUEUE.log)."
    ),
    another: bool = typer.Option(
        False, "--another", help="With --detach: start one more even though one runs for this queue and backend."
    ),
    print_unit: bool = typer.Option(
        False, "--print-unit", help="Print a systemd user unit that runs this worker at boot, and exit."
    ),
) -> None:
    """Run queued jobs: claim, bundle by model, run, store the results."""
    from ..backends import REGISTRY
    from ..worker import Worker

    if backend is not None and backend not in REGISTRY:
        raise BadInput(f"unknown backend {backend!r} (choose from: {', '.join(REGISTRY)})")
    if (log_file is not None or another) and not detach:
        raise BadInput("--log and --another go with --detach")
    if detach or print_unit:
        from ..runner.detach import detach_worker, worker_args

        args = worker_args(backend=backend, max_bundle=max_bundle, device=device, until_empty=until_empty)
        if print_unit:
            from ..runner.unit import unit_text

            typer.echo(unit_text(settings(), args), nl=False)
        else:
            typer.echo(detach_worker(settings(), args, backend=backend, log_file=log_file, another=another,
                                     env_file=options.env_file).message())
        return
    svc = service(logs=True, wait_for_database=True)
    if device:
        svc.settings = svc.settings.model_copy(update={"device": device})
    if svc.settings.offline:
        raise BadInput("the worker runs models: it cannot run with --offline / NDIF_JOBS_OFFLINE=1")
    queued = svc.queued_count()
    from ..store.config import require_shared

    require_shared(svc.settings)  # a shared queue's results go where every machine can read them
    w = Worker(svc, backend=backend, max_bundle=max_bundle)
    w.install_signal_handlers()
    if sys.stderr.isatty() and until_empty and queued:
        stats = _run_with_progress_bar(w, queued)
    else:
        stats = w.run(until_empty=until_empty)
    if stats.failed:
        console(stderr=True).print(f"{stats.failed} job(s) failed: ndif-jobs list --state failed")


def _run_with_progress_bar(w: Worker, queued: int) -> WorkerStats:
    """`w.run(until_empty=True)` under a progress bar of the `queued` jobs (on a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(), console=console(stderr=True), transient=False,
    ) as progress:
        task = progress.add_task("jobs", total=queued, note="")

        def update(stats: WorkerStats) -> None:
            progress.update(
                task,
                completed=stats.completed + stats.failed,
                note=f"{stats.completed} ok, {stats.failed} failed, {stats.retried} retrying",
            )

        w.on_progress = update
        return w.run(until_empty=True)
