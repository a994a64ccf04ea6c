"""`ndif-jobs worker --detach`: a worker in the background, with a pid file and a log file.

The worker is started as its own process in a new session (`start_new_session`), so closing
the terminal (SIGHUP to its session) does not reach it; its output goes to a log file under
the data folder, and a pid file records its pid, its process start time, its log and its
queue. One detached worker per queue and backend: a second is refused while the first lives
(its pid is alive and started when the file says), unless `another` asks for one more.

A pid file whose process is gone is stale: the next `--detach` replaces it. The pid and start
time are checked together so that a pid the system gave to another process meanwhile does not
count as the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import owners
from ..errors import BadInput, NdifJobsError

if TYPE_CHECKING:
    from ..settings import Settings

#: Seconds a fresh detached worker is watched for an early exit (bad input, an unreachable database).
STARTUP_WATCH_S = 3.0


class AlreadyRunning(BadInput):
    """A detached worker already runs for this queue and backend."""


@dataclass(frozen=True)
class Detached:
    """A detached worker as its pid file describes it."""

    pid: int
    started: int
    log: str
    backend: str | None
    queue: str
    pid_file: str

    def alive(self) -> bool:
        started = owners.process_started(self.pid)
        return started is not None and abs(started - self.started) <= 1

    def message(self) -> str:
        return f"worker started in the background: pid {self.pid}, log {self.log} (follow it: ndif-jobs logs --follow)"


def runner_dir(settings: Settings) -> Path:
    """Where pid files live: `<home>/workers`."""
    from ..settings import ensure_private_dir

    return ensure_private_dir(settings.home / "workers")


def queue_label(settings: Settings) -> str:
    """A short name for the queue database (its URL, password left out)."""
    url = settings.db_url
    if settings.database_url is None:
        return url
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def _slot(settings: Settings, backend: str | None) -> str:
    """The pid file name's stem: one per queue and backend."""
    digest = hashlib.sha256(settings.db_url.encode()).hexdigest()[:8]
    return f"worker-{backend or 'any'}-{digest}"


def read_pid_file(path: Path) -> Detached | None:
    try:
        return Detached(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def detached_workers(settings: Settings) -> list[Detached]:
    """Every detached worker whose pid file lies in the data folder, newest first (live or not)."""
    folder = settings.home / "workers"
    found = [d for d in (read_pid_file(p) for p in folder.glob("*.pid")) if d is not None] if folder.is_dir() else []
    return sorted(found, key=lambda d: (d.started, d.pid), reverse=True)


def worker_args(
    backend: str | None = None, max_bundle: int | None = None, device: str | None = None, until_empty: bool = False
) -> list[str]:
    """The `worker` command's own options, as the detached process is given them."""
    args: list[str] = []
    if backend is not None:
        args += ["--backend", backend]
    if max_bundle is not None:
        args += ["--max-bundle", str(max_bundle)]
    if device is not None:
        args += ["--device", device]
    if until_empty:
        args.append("--until-empty")
    return args


def detach_worker(
    settings: Settings,
    args: list[str],
    backend: str | None = None,
    log_file: Path | None = None,
    another: bool = False,
    env_file: Path | None = None,
) -> Detached:
    """Start `ndif-jobs worker ARGS` in the background; returns its pid file's record.

    Raises `AlreadyRunning` when a detached worker lives for this queue and backend (unless
    `another`), and `NdifJobsError` when the new worker exits at once (its log's last line says why)."""
    folder = runner_dir(settings)
    stem = _slot(settings, backend)
    pid_file = folder / f"{stem}.pid"
    running = read_pid_file(pid_file)
    if running is not None and running.alive():
        if not another:
            raise AlreadyRunning(
                f"a detached worker already runs for this queue and backend {backend or 'any'} (pid {running.pid},"
                f" log {running.log}): stop it with `ndif-jobs workers stop`, or start one more with --another"
            )
        pid_file = _free_slot(folder, stem)
    log_path = (log_file or settings.home / "logs" / f"{pid_file.stem}.log").expanduser().absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    command = [sys.executable, "-m", "ndif_jobs"]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    command += ["worker", *args]
    env = {**os.environ, "NDIF_JOBS_HOME": str(settings.home)}
    if settings.imports:
        env["NDIF_JOBS_IMPORTS"] = settings.imports
    with open(log_path, "ab", buffering=0) as log:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)
    detached = Detached(pid=proc.pid, started=owners.process_started(proc.pid) or int(time.time()),
                        log=str(log_path), backend=backend, queue=queue_label(settings), pid_file=str(pid_file))
    _write_private(pid_file, json.dumps(asdict(detached)))
    _watch_startup(proc, detached)
    return detached


def _free_slot(folder: Path, stem: str) -> Path:
    """The first pid file `stem-N.pid` no live worker holds."""
    n = 2
    while True:
        path = folder / f"{stem}-{n}.pid"
        held = read_pid_file(path)
        if held is None or not held.alive():
            return path
        n += 1


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _watch_startup(proc: subprocess.Popen[bytes], detached: Detached) -> None:
    """A worker that exits at once (bad input, no database) is an error here, not a silent log line."""
    deadline = time.monotonic() + STARTUP_WATCH_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            Path(detached.pid_file).unlink(missing_ok=True)
            last = _last_line(Path(detached.log))
            raise NdifJobsError(f"the detached worker exited at once (code {code}): {last or 'no output'}"
                                f" (log: {detached.log})")
        time.sleep(0.05)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
