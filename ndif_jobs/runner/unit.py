"""`ndif-jobs worker --print-unit`: a systemd user unit that runs a worker at boot.

    ndif-jobs worker --print-unit > ~/.config/systemd/user/ndif-jobs-worker.service
    systemctl --user enable --now ndif-jobs-worker
    loginctl enable-linger "$USER"     # start it at boot, before anyone logs in

systemd sends SIGTERM to stop it (the worker finishes the bundle in hand) and SIGKILL after
`TimeoutStopSec`; jobs a killed worker held come back when their leases run out. Secrets are
not written into the unit: the API key is read from the data folder's `.env` as always, and
what may only come from the environment (NDIF_HOST, NDIF_JOBS_IMPORTS, NDIF_JOBS_DATABASE_URL)
goes in the optional `EnvironmentFile` named in the unit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

#: Seconds systemd waits for the bundle in hand to finish before it kills the worker.
STOP_TIMEOUT_S = 600


def _escape(value: str) -> str:
    """`%` doubled: systemd expands `%` specifiers in most settings."""
    return value.replace("%", "%%")


def _quote(value: str) -> str:
    """A value as systemd reads it in `Environment=` / `ExecStart=` (double quotes, \\ and \" escaped;
    `%` doubled: systemd expands specifiers)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def exec_start(args: list[str]) -> str:
    """The command line that runs the worker: the installed `ndif-jobs` next to this Python, if any."""
    script = Path(sys.executable).with_name("ndif-jobs")
    found = str(script) if script.exists() else shutil.which("ndif-jobs")
    command = [found, "worker"] if found else [sys.executable, "-m", "ndif_jobs", "worker"]
    return " ".join(_quote(part) if any(c in part for c in ' "\\%\t') else part for part in [*command, *args])


def unit_text(settings: Settings, args: list[str], env_file: Path | None = None) -> str:
    """The unit file's text for a worker with these `worker` options, on this data folder."""
    env_file = env_file or settings.home / "worker.env"
    lines = [
        "[Unit]",
        f"Description=ndif-jobs worker (data folder {_escape(str(settings.home))})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start(args)}",
        f"Environment={_quote('NDIF_JOBS_HOME=' + str(settings.home))} NDIF_JOBS_LOG_FORMAT=json",
        "# NDIF_HOST, NDIF_JOBS_IMPORTS, NDIF_JOBS_DATABASE_URL, NDIF_JOBS_NOTIFY: one NAME=value a line here",
        f"EnvironmentFile=-{_escape(str(env_file))}",
        f"WorkingDirectory={_escape(str(settings.home))}",
        "Restart=on-failure",
        "RestartSec=30",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)
