"""Commands on jobs: `submit`, `list`, `show`, `results`, `cancel`, `retry`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from ..errors import BadInput
from ..states import JobState
from ..units import size_text
from .app import ago, console, jobs_table, output, print_json, service, styled_state

T = TypeVar("T")


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add this module's commands to `app` (only the one named `only`, if given)."""
    for name, command in COMMANDS.items():
        if only in (None, name):
            app.command(name)(command)


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
    from .. import experiments
    from ..params_input import parse_pairs, read_params_file
    from ..service import Submission

    svc = service(logs=True)
    exp = experiments.get(experiment)
    from_pairs = parse_pairs(exp.params, param)
    limit = svc.settings.max_submit_jobs
    param_sets = read_params_file(str(params_file), max_jobs=limit) if params_file else [{}]
    subs = [
        Submission(experiment=experiment, params={**base, **from_pairs}, model=model, backend=backend,
                   priority=priority, tags=tag, force=force)
        for base in param_sets
    ]
    results = with_preflight_warnings(lambda: svc.submit_many(subs))
    docs = [{"id": r.id, "state": r.state, **({"joined": True} if r.joined else {})} for r in results]
    if as_json:
        print_json(docs[0] if len(docs) == 1 else docs)
        return
    for doc in docs:
        note = (" (already queued: joined)" if doc.get("joined")
                else " (served from the store)" if doc["state"] == JobState.CACHED else "")
        print(f"{doc['id']}{note}" if sys.stdout.isatty() else doc["id"])


def with_preflight_warnings(call: Callable[[], T]) -> T:
    """Run `call`; then print each distinct pre-flight warning as one `warning:` line on stderr
    (a params file of many jobs with the same answer says it once). Nothing is printed when
    `call` raises: its error is the one line."""
    import warnings

    from ..preflight import PreflightWarning

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


def list_(
    state: str | None = typer.Option(None, "--state", "-s", help="Only jobs in this state."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Only jobs with this tag."),
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
    sweep: str | None = typer.Option(None, "--sweep", help="Only the jobs of this sweep."),
    limit: int = typer.Option(50, "--limit", "-n", min=0, help="Most jobs shown (0: all)."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many of the newest first (to page)."),
    show_all: bool = typer.Option(False, "--all", help="Every matching job (same as --limit 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with each job's params)."),
) -> None:
    """Jobs, newest first. When more match than are shown, says how many on stderr."""
    svc = service(read_only=True)
    page = svc.list_jobs(state=state, tag=tag, experiment=experiment, sweep=sweep,
                         limit=None if show_all or limit == 0 else limit, offset=offset)
    if page.left_out:
        shown = f"jobs {offset + 1}-{offset + len(page.jobs)}" if page.jobs else "no jobs"
        sys.stderr.write(f"note: {shown} of {page.total} shown; --offset {offset + len(page.jobs)} for the next"
                         " page, --all for every one\n")
    if as_json:
        print_json([job.summary(with_params=True) for job in page.jobs])
        return
    if not page.jobs:
        print("no jobs")
        return
    out = output()
    out.print(jobs_table(out, page.jobs))


def show(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Everything about one job: state, attempts, timings, error, bundle, result location."""
    svc = service(read_only=True)
    found = svc.job(job)
    doc, provenance_readable = _job_document(svc, found)
    if as_json:
        print_json(doc)
        return
    _print_job(found, doc, provenance_readable)


def _job_document(svc: Any, found: Any) -> tuple[dict[str, Any], bool]:
    """What `show --json` prints, and whether the result's provenance could be read here."""
    attempts = svc.attempts(found.id)
    bundle = svc.bundle(found.bundle_id) if found.bundle_id else None
    result_path = svc.result_location(found)
    readable, made = stored_provenance(svc, found.result_key)
    doc = {
        **found.summary(),
        "key": found.key,
        "model_key": found.model_key,
        "params": found.params,
        "max_attempts": found.max_attempts,
        "started_at": found.started_at,
        "updated_at": found.updated_at,
        "not_before": found.not_before or None,
        "lease_owner": found.lease_owner,
        "lease_expires_at": found.lease_expires_at,
        "result_key": found.result_key,
        "result_path": None if result_path is None else str(result_path),
        "result_bytes": found.result_bytes,
        "time_lost_s": svc.time_lost(attempts),
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
        "provenance": made,
    }
    return doc, readable


def _print_job(found: Any, doc: dict[str, Any], provenance_readable: bool) -> None:
    out = output()
    out.print(f"[bold]job {found.id}[/]  {styled_state(found.state)}")
    out.print(f"  experiment  {found.experiment}")
    out.print(f"  model       {found.model}  ({found.backend})")
    out.print(f"  params      {json.dumps(found.params, sort_keys=True)}")
    if found.tags:
        out.print(f"  tags        {', '.join(found.tags)}")
    if found.sweep is not None:
        out.print(f"  sweep       {found.sweep} (row {found.sweep_row})")
    out.print(f"  key         {found.key}")
    out.print(f"  attempts    {found.attempts}/{found.max_attempts}")
    out.print(f"  created     {ago(found.created_at)}")
    if found.started_at:
        out.print(f"  started     {ago(found.started_at)}")
    if found.finished_at:
        took = f" (took {found.finished_at - found.started_at:.2f}s)" if found.started_at else ""
        out.print(f"  finished    {ago(found.finished_at)}{took}")
    if found.error:
        out.print(f"  error       [red]{found.error}[/]")
    bundle = doc["bundle"]
    if bundle is not None:
        out.print(f"  bundle      {bundle['id']} ({bundle['backend']}, {bundle['jobs']} jobs, {bundle['state']})")
        for entry in bundle["status_history"]:
            out.print(f"     {entry.get('status')}  {ago(entry.get('at'))}  {entry.get('description', '')}")
    if doc["result_path"]:
        out.print(f"  result      {doc['result_path']} ({size_text(found.result_bytes)})")
    if provenance_readable:
        from ..provenance import text_lines

        for line in text_lines(doc["provenance"]):
            out.print(line, markup=False)
    if doc["time_lost_s"] is not None:
        out.print(f"  time lost   {doc['time_lost_s']:.0f}s: a result link expired before the download and the"
                  " jobs were sent again", markup=False)
    for a in doc["attempt_history"]:
        took = f"{a['finished_at'] - a['started_at']:.2f}s" if a["finished_at"] else "running"
        out.print(f"  attempt {a['number']}   {a['outcome'] or '-'} {took} {a['error'] or ''}".rstrip())


def results(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (tensors as nested lists)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash the result files first."),
) -> None:
    """Each saved name with its shape and dtype, or its value."""
    from ..provenance import of_manifest, text_lines

    svc = service()
    # The values are read as numpy arrays (the command starts without torch), except for a
    # table of an own experiment's result: its summary hook is given torch tensors.
    as_numpy = as_json or _summarized_by_ndif_jobs(svc.job(job).experiment)
    result = svc.load_result(job, verify=verify, arrays="numpy" if as_numpy else "torch")
    if as_json:
        from ..store.codec import to_jsonable

        print_json({"job": result.job["id"], "values": to_jsonable(result.to_dict()),
                    "provenance": of_manifest(result.manifest)})
        return
    from rich.table import Table

    table = Table(title=f"{result.job['experiment']} · job {result.job['id']}", title_justify="left",
                  show_edge=False, pad_edge=False)
    table.add_column("name")
    table.add_column("value", overflow="fold")
    for name, value in result.items():
        table.add_row(name, describe(value, _stored_dtype(result.manifest, name)))
    out = console()
    out.print(table)
    from ..summaries import summarize

    for line in summarize(result.job["experiment"], result):
        out.print(f"  {line}", markup=False)
    for line in text_lines(of_manifest(result.manifest)):
        out.print(line, markup=False)


def stored_provenance(svc: Any, result_key: str | None) -> tuple[bool, dict[str, Any] | None]:
    """Whether the result's manifest is on this machine (the data folder, or the object store's
    cache here: `show` never touches the network), and the provenance it records (None for a
    result stored without)."""
    if result_key is None:
        return False, None
    from ..errors import NdifJobsError
    from ..provenance import of_manifest

    here = getattr(svc.store, "cache", None) or svc.store
    try:
        if not here.exists(result_key):
            return False, None
        return True, of_manifest(here.manifest(result_key))
    except NdifJobsError:
        return False, None


def _summarized_by_ndif_jobs(experiment: str) -> bool:
    """Whether the experiment's summary hook is one of ndif-jobs' own (they read numpy arrays
    as well as torch tensors), or there is none to give tensors to."""
    from .. import experiments
    from ..errors import UnknownExperiment

    try:
        hook = experiments.get(experiment).hook("summary")
    except UnknownExperiment:
        return True  # not registered in this process: shown without a summary
    return hook is None or getattr(hook, "__module__", "") == "ndif_jobs.summaries"


def _stored_dtype(manifest: dict[str, Any], name: str) -> str | None:
    """The dtype a top-level tensor was stored as (a numpy read widens bfloat16 and float8)."""
    ref = manifest.get("values", {}).get(name)
    if isinstance(ref, dict) and "$tensor" in ref:
        return manifest.get("tensors", {}).get(ref["$tensor"], {}).get("dtype")
    return None


def describe(value: Any, stored_dtype: str | None = None) -> str:
    """One value of a result, as `results` shows it: a tensor's dtype (as stored) and shape, its
    values when few, a long list cut short. Torch tensors and numpy arrays read alike."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dtype = stored_dtype or str(value.dtype).removeprefix("torch.")
        count = value.numel() if callable(getattr(value, "numel", None)) else value.size
        if count <= 8:
            shown = [round(x, 4) if isinstance(x, float) else x for x in value.reshape(-1).tolist()]
            return f"{dtype}{list(value.shape)} {shown}"
        return f"{dtype}{list(value.shape)}"
    if isinstance(value, list) and len(value) > 10:
        return f"{value[:10]!r} … ({len(value)} items)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def cancel(jobs: list[str] = typer.Argument(..., help="Job ids.")) -> None:
    """Cancel jobs that have not finished."""
    for job_id, state in service().cancel(jobs).items():
        print(f"{job_id} {state}")


def retry(
    jobs: list[str] = typer.Argument(None, help="Job ids."),
    sweep: str | None = typer.Option(None, "--sweep", help="The sweep whose rows to queue again (with --failed)."),
    failed: bool = typer.Option(False, "--failed", help="With --sweep: its failed and cancelled rows."),
) -> None:
    """Queue finished, failed or cancelled jobs again, or a sweep's failed rows."""
    if sweep is not None:
        if jobs or not failed:
            raise BadInput("retry --sweep NAME takes --failed and no job ids")
        from ..sweeps.commands import retry_failed

        again = retry_failed(service(), sweep)
        print(f"sweep {sweep}: {len(again)} failed rows queued again" if again else f"sweep {sweep}: no failed rows")
        return
    if failed:
        raise BadInput("--failed retries a sweep's failed rows: add --sweep NAME")
    if not jobs:
        raise BadInput("name the jobs to retry: job ids, or --sweep NAME --failed")
    for job_id, state in service().retry(jobs).items():
        print(f"{job_id} {state}")


COMMANDS: dict[str, Callable[..., None]] = {
    "submit": submit, "list": list_, "show": show, "results": results, "cancel": cancel, "retry": retry,
}
