"""The `ui` and `report` commands, added to the CLI by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from ..service import Service


def register(app: typer.Typer) -> None:
    app.command()(ui)
    app.command()(report)


def _service() -> Service:
    """The CLI's own service: its --import, --offline and --env-file apply."""
    from ..cli.app import service

    return service()


def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any but loopback needs a token."),
    port: int = typer.Option(8787, "--port", min=0, max=65535, help="Port to listen on."),
    open_browser: bool = typer.Option(False, "--open", help="Open the overview in the default browser."),
    token: str | None = typer.Option(
        None, "--token", envvar="NDIF_JOBS_UI_TOKEN",
        help="Token every request must show (default: none on loopback, a generated one elsewhere).",
    ),
) -> None:
    """Serve the results pages: overview, jobs, a job with its figure, sweeps; retry and cancel."""
    import uvicorn

    from .app import create_app
    from .security import require_token

    token, generated = require_token(host, token)
    service = _service()
    service.queue.counts()  # opens (and migrates) the database before the first page asks
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    # A generated token is printed once, here, in the address to open; the server never logs it
    # (its access log is off). A token given with --token is the user's to keep.
    shown_address = f"{address}?token={token}" if generated else address
    note = "the token is shown only here; " if generated else "it needs the token given; " if token else ""
    typer.echo(f"ndif-jobs ui on {shown_address}  ({note}Ctrl-C stops it)")
    if open_browser:
        import webbrowser

        webbrowser.open(address)
    uvicorn.run(create_app(service, token=token, host=host), host=host, port=port, access_log=False,
                log_level="warning")


def report(
    jobs: list[str] = typer.Argument(None, help="Job ids (or unique prefixes)."),
    sweep: str | None = typer.Option(None, "--sweep", help="Every job of this sweep."),
    tag: str | None = typer.Option(None, "--tag", help="Every job with this tag."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write."),
    title: str | None = typer.Option(None, "--title", help="Heading of the report."),
) -> None:
    """Write one self-contained HTML file (figures embedded) for a sweep, a tag or some jobs."""
    from ..errors import BadInput
    from .report import write_report

    chosen = sum(bool(x) for x in (jobs, sweep, tag))
    if chosen != 1:
        raise BadInput("report takes one of: job ids, --sweep NAME or --tag TAG")
    if not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    path, count = write_report(_service(), out, job_refs=jobs or None, sweep=sweep, tag=tag, title=title)
    typer.echo(f"{path} ({count} jobs)")
