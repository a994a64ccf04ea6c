"""The `ndif-jobs` command.

Exit codes: 0 success, 2 bad input (nothing was written), 1 any other failure. `--json` prints
one JSON document on stdout for scripts.

Each module here adds its commands to the app through `register(app)`; so does each module named
in `EXTENSIONS`, from elsewhere in the package. A command built in here is run
by an app of that command alone (`BUILTIN` says which module defines it; each built-in module's
`register` takes `only`): building every command, and importing the extensions, would cost a
read command (`status`, `list`, `show`) more than its queries.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import typer

from ..errors import NdifJobsError, clip_error

#: The built-in commands and the module (in this package) that defines each.
BUILTIN = {
    "submit": "jobs", "list": "jobs", "show": "jobs", "results": "jobs", "cancel": "jobs", "retry": "jobs",
    "worker": "worker",
    "status": "info", "models": "info", "experiments": "info",
    "export": "store", "plot": "store", "verify": "store", "gc": "store",
    "db": "db",
    "usage": "usage",
}
#: Modules elsewhere in ndif_jobs that add their commands with `register(app)`.
EXTENSIONS = (
    "ndif_jobs.sweeps.commands",
    "ndif_jobs.web.commands",
    "ndif_jobs.store.commands",
    "ndif_jobs.runner.commands",
)
#: The app's own options that take a value (the command's name is the first word after them).
_VALUED_OPTIONS = ("--import", "--env-file")


def build_app(command: str | None = None) -> typer.Typer:
    """The app that runs `command`: for a built-in command, the commands of its module alone;
    otherwise (another command, `--help`, none) every built-in and every extension's command."""
    from .app import new_app

    app = new_app()
    if command in BUILTIN:
        importlib.import_module(f".{BUILTIN[command]}", __name__).register(app, only=command)
        return app
    for module in dict.fromkeys(BUILTIN.values()):
        importlib.import_module(f".{module}", __name__).register(app)
    for name in EXTENSIONS:
        _register_extension(app, name)
    return app


def _register_extension(app: typer.Typer, name: str) -> None:
    """Each extension's commands build the CLI's own service and settings (`cli.app`), so the
    app's --import, --offline and --env-file apply to them too."""
    importlib.import_module(name).register(app)


def command_name(args: Sequence[str]) -> str | None:
    """The command `args` name: the first word that is not one of the app's own options."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUED_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _convert_plainly(command: Any) -> None:
    """`coercion.plain_values`, where this typer has the parts it uses (else typer converts)."""
    try:
        from .coercion import plain_values
    except ImportError:
        return
    plain_values(command)


def main() -> None:
    args = sys.argv[1:]
    try:
        command = typer.main.get_command(build_app(command_name(args)))
        _convert_plainly(command)
        code = command.main(args, prog_name="ndif-jobs", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NdifJobsError as exc:
        from ..logging import scrub

        sys.stderr.write(f"error: {clip_error(scrub(str(exc)))}\n")
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.exceptions.TyperException as exc:
        # A usage error (unknown option, missing argument, bad value): one line, exit 2. With
        # no arguments at all the help was shown, and there is nothing more to say.
        message = exc.format_message()
        if message:
            sys.stderr.write(f"error: {message}\n")
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - any other failure is one scrubbed line and exit 1
        from ..logging import scrub

        sys.stderr.write(f"error: {clip_error(scrub(f'{type(exc).__name__}: {exc}'.splitlines()[0]))}\n")
        sys.exit(1)


__all__ = ["BUILTIN", "EXTENSIONS", "build_app", "command_name", "main"]
