"""Commands on stored results: `export`, `plot`, `verify`, `gc`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..errors import BadInput
from ..units import size_text
from .app import ago, console, print_json, service


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add this module's commands to `app` (only the one named `only`, if given)."""
    for name, command in COMMANDS.items():
        if only in (None, name):
            app.command(name)(command)


def export(
    job: str = typer.Argument(..., help="Job id (or a unique prefix, or a cache key)."),
    fmt: str = typer.Option("npz", "--format", "-f", help="npz, pt, safetensors or json."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (or a folder: JOB.FORMAT in it)."),
) -> None:
    """Write a job's result for other tools."""
    from ..store.housekeeping import EXPORT_FORMATS
    from ..store.housekeeping import export as export_result

    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r} (choose from: {', '.join(EXPORT_FORMATS)})")
    svc = service()
    # JSON needs only the values: read as numpy arrays, without importing torch.
    result = svc.load_result(job, verify=True, arrays="numpy" if fmt == "json" else "torch")
    path = export_result(result, fmt, out)
    from ..store.codec import is_sealed

    if not is_sealed(result.manifest):
        sys.stderr.write(f"note: job {result.job['id']}'s result was stored before values were checksummed: only its"
                         " tensors were checked (ndif-jobs retry it to have every value checked)\n")
    print(path)


def plot(
    jobs: list[str] = typer.Argument(None, help="Job ids of one experiment (several overlay or tile)."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Plot the finished jobs with this tag."),
    sweep: str | None = typer.Option(None, "--sweep", help="Draw this sweep's figure (prompts x layers, ...)."),
    value: str | None = typer.Option(None, "--value", help="With --sweep: a histogram of this scalar result."),
    out: Path | None = typer.Option(None, "--out", "-o", help="PNG to write (default: derived from the jobs)."),
    title: str | None = typer.Option(None, "--title", help="Figure title."),
) -> None:
    """Draw the figure for one or more results (logit-lens heatmap, patching sweep, ...) or a sweep."""
    from ..plots import default_plot_name, plot_results

    if sweep is not None:
        if jobs or tag is not None:
            raise BadInput("plot takes job ids, --tag or --sweep: one of them")
        from ..sweeps.commands import plot_sweep

        print(plot_sweep(service(), sweep, value=value, out=out))
        return
    if value is not None:
        raise BadInput("--value draws a histogram over a sweep: add --sweep NAME")
    if not jobs and tag is None:
        raise BadInput("name the jobs to plot: job ids, --tag TAG or --sweep NAME")
    svc = service()
    refs = list(jobs or [])
    if tag is not None:
        refs += svc.done_job_ids(tag=tag)
        if not refs:
            raise BadInput(f"no finished jobs with tag {tag!r}: `ndif-jobs list --tag {tag}` shows its jobs")
    loaded = [svc.load_result(j) for j in refs]
    if out is not None and not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    try:
        path = plot_results(loaded, out or Path(default_plot_name(loaded)), title=title)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    print(path)


def verify_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Re-check every stored result's checksums; exit 1 if any is corrupt or missing."""
    from ..store.housekeeping import verify as run_verify

    report = run_verify(service())
    if as_json:
        print_json({"checked": report.checked, "ok": report.ok, "problems": report.problems,
                    "unsealed": report.unsealed})
    else:
        out = console()
        for problem in report.problems:
            out.print(f"[red]{problem['problem']}[/] {problem['key'][:12]}  "
                      f"jobs {' '.join(problem['jobs'])}: {problem['detail']}")
        for entry in report.unsealed:
            out.print(f"[yellow]tensors only[/] {entry['key'][:12]}  jobs {' '.join(entry['jobs'])}: stored before"
                      " values were checksummed, so its other values cannot be checked")
        out.print(f"checked {report.checked} results: {report.ok} ok, {len(report.problems)} bad"
                  + (f", {len(report.unsealed)} with only their tensors checked" if report.unsealed else ""))
        if report.unsealed:
            ids = " ".join(j for e in report.unsealed for j in e["jobs"])
            out.print(f"to have every value checked, run them again with: ndif-jobs retry {ids}")
        if report.problems:
            ids = " ".join(j for p in report.problems for j in p["jobs"])
            out.print(f"run them again with: ndif-jobs retry {ids}")
    if report.problems:
        raise typer.Exit(1)


def gc(
    older_than: float | None = typer.Option(None, "--older-than", min=0, help="Remove results older than DAYS."),
    max_size: str | None = typer.Option(
        None, "--max-size", help="Remove oldest results until the store is under SIZE (e.g. 20GiB)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be removed, with its jobs and tags; remove nothing."
    ),
    ignore_other_queues: bool = typer.Option(
        False, "--ignore-other-queues",
        help="Remove results even though other queues keep results in this store (only once they are gone).",
    ),
    forget_queue: str | None = typer.Option(
        None, "--forget-queue", metavar="ID",
        help="Only remove the record of another queue that is gone (its id as gc names it); nothing else.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove stored results by age or size, never one that a queued or running job needs.

    Always removes results that no job points at; with neither --older-than nor --max-size,
    only those. Refused while other queues keep results in the same store.
    """
    from ..store import housekeeping
    from ..store.housekeeping import parse_size, plan_gc, require_own_store, run_gc

    limit = parse_size(max_size) if max_size is not None else None
    svc = service()
    if forget_queue is not None:
        gone = housekeeping.forget_queue(svc, forget_queue)
        if as_json:
            print_json({"forgot": {"id": gone.id, "label": gone.label}})
        else:
            console().print(f"forgot queue {gone.id[:12]} ({gone.label}) in {svc.store.location()}", markup=False)
        return
    if not ignore_other_queues:
        require_own_store(svc)
    plan = plan_gc(svc, older_than, limit)
    outcome = None if dry_run else run_gc(svc, plan)
    freed = plan.freed if outcome is None else outcome.freed
    removed = len(plan.remove) if outcome is None else outcome.removed
    failed = [] if outcome is None else outcome.failed
    doc = {"removed": removed, "freed_bytes": freed, "dry_run": dry_run, "kept_in_use": plan.kept_in_use,
           "keys": [item.key for item in plan.remove],
           "results": [{"key": i.key, "bytes": i.bytes, "created_at": i.created_at, "jobs": list(i.jobs)}
                       for i in plan.remove],
           "failed": [{"key": key, "error": why} for key, why in failed]}
    if as_json:
        print_json(doc)
    else:
        out = console()
        if dry_run:
            for item in plan.remove:
                out.print(f"  {item.key[:12]}  {size_text(item.bytes):>10}  {ago(item.created_at):>8}  "
                          f"{_gc_jobs(item.jobs)}", markup=False)
        verb = "would free" if dry_run else "freed"
        out.print(f"{'would remove' if dry_run else 'removed'} {removed} results, {verb} {size_text(freed)}"
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


COMMANDS: dict[str, Callable[..., None]] = {"export": export, "plot": plot, "verify": verify_, "gc": gc}
