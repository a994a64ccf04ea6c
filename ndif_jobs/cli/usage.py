"""`ndif-jobs usage`: requests sent to NDIF, bytes up and down, time queued and running there."""

from __future__ import annotations

from collections.abc import Callable

import typer

from .app import output, print_json, service, table


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add this module's commands to `app` (only the one named `only`, if given)."""
    for name, command in COMMANDS.items():
        if only in (None, name):
            app.command(name)(command)


def usage(
    by: str | None = typer.Option(None, "--by", help="Group by tag, sweep or model."),
    since: str | None = typer.Option(None, "--since", help="Only requests sent since: 2026-11-29, "
                                     "2026-11-29T18:00, or an age (90m, 12h, 7d, 2w)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """What this queue has asked of NDIF: requests, bytes up and down, time queued and running there."""
    from ..provenance import seconds_text
    from ..units import size_text
    from ..usage import check_by, parse_since, read_requests, tally

    by = check_by(by)
    start = parse_since(since)
    report = tally(read_requests(service(read_only=True).queue, start), by, start)
    if as_json:
        print_json(report.as_dict())
        return
    out = output()
    shown = table(out)
    shown.add_column(by or "", no_wrap=True)
    for column in ("requests", "jobs", "sent", "downloaded", "queued at NDIF", "running at NDIF"):
        shown.add_column(column, justify="right", no_wrap=True)
    rows = [*report.groups.items(), ("total", report.total)] if by else [("total", report.total)]
    for name, u in rows:
        shown.add_row(name, str(u.requests), str(u.jobs), size_text(u.bytes_up), size_text(u.bytes_down),
                      seconds_text(u.queued_s), seconds_text(u.running_s))
    out.print(shown)
    if report.overlapping:
        out.print(f"a request that carried jobs of several {by}s counts for each; the total counts it once")


COMMANDS: dict[str, Callable[..., None]] = {"usage": usage}
