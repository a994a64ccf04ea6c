"""`ndif-jobs pull`: fetch results from the object store into this machine's cache ahead of time,
so that work offline (`NDIF_JOBS_OFFLINE=1`: on a train, with the store down) still finds them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed

import typer

from ..errors import BadInput, NdifJobsError

#: Results fetched at once: each is one manifest request and a transfer of its own.
PULL_PARALLEL = 8


def register(app: typer.Typer) -> None:
    app.command()(pull)


def pull(
    jobs: list[str] = typer.Argument(None, help="Job ids (or unique prefixes, or cache keys)."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Every finished job with this tag."),
    sweep: str | None = typer.Option(None, "--sweep", "-s", help="Every finished job of this sweep."),
) -> None:
    """Fetch results from the shared object store into this machine's cache (for offline work)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..cli.app import console, service
    from ..units import size_text
    from .config import open_store, store_url
    from .remote import ObjectResultStore

    if [bool(jobs), tag is not None, sweep is not None].count(True) != 1:
        raise BadInput("name what to pull: job ids, or --tag TAG, or --sweep SWEEP")
    svc = service()
    if store_url(svc.settings) is None:
        raise BadInput("results are in this machine's folder already: pull is for an object store "
                       "(NDIF_JOBS_STORE_URL=s3://BUCKET/PREFIX)")
    if svc.settings.offline:
        raise BadInput("pull fetches from the object store: run it without NDIF_JOBS_OFFLINE / --offline")
    store = open_store(svc.settings)
    assert isinstance(store, ObjectResultStore)
    ids = list(jobs or ()) if tag is None and sweep is None else svc.done_job_ids(tag=tag, sweep=sweep)
    if not ids:
        raise BadInput(f"no finished jobs with {'tag' if tag else 'sweep'} {tag or sweep!r}")
    keys: dict[str, str] = {}
    for ref in ids:
        row = svc.job(ref)
        if row.result_key is None:
            raise BadInput(f"job {row.id} has no result to pull: it is {row.state}")
        keys.setdefault(row.result_key, row.id)
    out = console(stderr=True)
    failed: list[str] = []
    fetched = 0
    columns = (TextColumn("pull"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=not out.is_terminal) as progress:
        task = progress.add_task("pull", total=len(keys))
        with ThreadPoolExecutor(PULL_PARALLEL) as pool:
            futures = {pool.submit(store.fetch, key): job_id for key, job_id in keys.items()}
            for future in as_completed(futures):
                try:
                    fetched += future.result()
                except NdifJobsError as exc:
                    failed.append(f"{futures[future]}: {exc}")
                progress.advance(task)
    cached = len(keys) - len(failed)
    out.print(f"{cached} of {len(keys)} results in this machine's cache ({size_text(fetched)} fetched)")
    if failed:
        for line in failed:
            out.print(f"  [red]failed[/] {line}", markup=True, highlight=False)
        raise typer.Exit(1)
