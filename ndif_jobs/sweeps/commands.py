"""The sweep commands of `ndif-jobs`: `sweep`, `sweeps`, `collect`.

`register(app)` adds them to the Typer app. Each imports what it needs inside its body (pandas
only in `collect`), so the CLI starts light. `retry_failed` and `plot_sweep` are the parts
`retry --sweep NAME --failed` and `plot --sweep NAME [--value NAME]` call.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import BadInput
from ..units import short_duration, size_text

if TYPE_CHECKING:
    from ..db.sweeps import Progress
    from ..service import Service


def _default_service() -> Service:
    """The CLI's own service: its --import, --offline and --env-file apply."""
    from ..cli.app import service

    return service()


def register(app: typer.Typer, make_service: Callable[[], Service] | None = None) -> None:
    """Add the sweep commands to `app`; `make_service` builds the service each command uses."""
    service_of = make_service or _default_service

    @app.command("sweep")
    def sweep_(
        file: Path = typer.Argument(..., help="The sweep file (.toml, .yaml): experiment, models, grid, dataset."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and count; queue nothing."),
        force: bool = typer.Option(False, "--force", help="Reuse the sweep's name for a changed file."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Queue every row of a sweep file (each validated first; rows queued before are skipped)."""
        from .spec import load
        from .submit import plan, submit

        service = service_of()
        sweep = load(file)
        planned = plan(service, sweep, force=force)
        for note in planned.warnings:
            sys.stderr.write(f"warning: {note}\n")
        summary = _plan_summary(planned)
        if not dry_run:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                done = submit(service, planned, force=force)
            summary.update(queued=done.queued, cached=done.cached)
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
            return
        _print_plan(summary, dry_run)

    @app.command("sweeps")
    def sweeps_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Every sweep with its progress: completed / failed / total, rate and ETA."""
        from ..db.sweeps import Sweeps

        store = Sweeps(service_of().queue)
        out = [_progress_dict(store.progress(record.name)) for record in store.all()]
        if as_json:
            sys.stdout.write(json.dumps(out, indent=2) + "\n")
            return
        if not out:
            print("no sweeps yet: ndif-jobs sweep FILE")
        for item in out:
            print(progress_line(item))

    @app.command("collect")
    def collect_(
        sweep: str = typer.Argument(..., help="The sweep's name."),
        out: Path = typer.Option(..., "--out", "-o", help="Table to write: .csv, .jsonl or .parquet."),
        all_rows: bool = typer.Option(False, "--all-rows", help="Every job, not one per sweep row."),
    ) -> None:
        """Write a sweep's results as one table: a row per job, params and scalar results as columns."""
        from ..collection import TABLE_FORMATS, collect

        if out.suffix.lower() not in TABLE_FORMATS:
            raise BadInput(f"cannot write {out}: name a .csv, .jsonl or .parquet file")
        table = collect(sweep=sweep, all_rows=all_rows, settings=service_of().settings)
        path = table.write(out)
        frame = table.frame
        states = frame["state"].value_counts().to_dict() if len(frame) else {}
        shown = ", ".join(f"{n} {s}" for s, n in states.items())
        print(f"{path}: {len(frame)} rows ({shown}), {len(frame.columns)} columns")


def retry_failed(service: Service, sweep: str) -> list[str]:
    """Queue the failed and cancelled jobs of `sweep` again; their ids."""
    from ..db.sweeps import Sweeps

    store = Sweeps(service.queue)
    store.require(sweep)
    ids = store.failed_jobs(sweep)
    if ids:
        service.queue.retry(ids)
    return ids


def plot_sweep(service: Service, sweep: str, *, value: str | None = None, out: Path | None = None) -> Path:
    """The sweep's figure written to `out` (default `SWEEP.png`, or `SWEEP-VALUE.png`)."""
    from ..collection import collect
    from .figures import draw_sweep

    target = out or Path(f"{sweep}{'-' + value if value else ''}.png")
    if not target.parent.exists():
        raise BadInput(f"cannot write {target}: folder {target.parent} does not exist")
    table = collect(sweep=sweep, settings=service.settings)
    return draw_sweep(table, target, value=value, title=sweep)


def _plan_summary(planned: Any) -> dict[str, Any]:
    sweep = planned.sweep
    return {
        "sweep": sweep.name, "experiment": sweep.experiment, "jobs": len(planned.rows),
        "already_in_sweep": len(planned.present), "stored": len(planned.stored), "to_run": len(planned.to_run),
        "requests": planned.requests, "estimated_bytes": planned.estimated_bytes,
    }


def _print_plan(s: dict[str, Any], dry_run: bool) -> None:
    requests = ", ".join(f"{n} on {model}" for model, n in s["requests"].items()) or "none"
    print(f"sweep {s['sweep']}: {s['jobs']} jobs of {s['experiment']}")
    print(f"  already in the sweep: {s['already_in_sweep']}")
    print(f"  stored already (served cached): {s['stored']}")
    print(f"  to run: {s['to_run']} (requests: {requests})")
    print(f"  estimated result bytes: {size_text(s['estimated_bytes'])}")
    if dry_run:
        print("dry run: nothing queued")
    else:
        print(f"queued {s['queued']}, cached {s['cached']}; progress: ndif-jobs sweeps")


def _progress_dict(p: Progress) -> dict[str, Any]:
    return {"sweep": p.name, "total": p.total, "done": p.done, "failed": p.failed, "remaining": p.remaining,
            "counts": {k: v for k, v in p.counts.items() if v}, "rate_per_min": None if p.rate is None
            else round(p.rate * 60, 2), "eta_s": None if p.eta_s is None else round(p.eta_s, 1),
            "last_finished": p.last_finished}


def progress_line(item: dict[str, Any]) -> str:
    """`name  12/3/40 done/failed/total  5.0 jobs/min  ETA 5m` for one sweep."""
    rate = f"{item['rate_per_min']:g} jobs/min" if item["rate_per_min"] is not None else "rate -"
    eta = item["eta_s"]
    if item["remaining"] == 0:
        eta_text = "finished"
    elif eta is None:
        eta_text = "ETA -"
    else:
        eta_text = f"ETA {short_duration(eta)}"
    stamp = ""
    if item["last_finished"]:
        stamp = f"  last finished {time.strftime('%H:%M', time.localtime(item['last_finished']))}"
    return (f"{item['sweep']}  {item['done']}/{item['failed']}/{item['total']} done/failed/total"
            f"  {rate}  {eta_text}{stamp}")
