"""The worker as a service: detached, listed from its heartbeat, stopped, its log followed,
and a systemd unit for it. Real worker processes on a real SQLite queue; signals are real."""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ndif_jobs.errors import NdifJobsError

from .conftest import wait_until


@pytest.fixture
def cli(env):  # type: ignore[no-untyped-def]
    """The runner's commands on a typer app of their own (the CLI wires the same `register`)."""
    from ndif_jobs.runner.commands import register

    app = typer.Typer()

    @app.command("noop", hidden=True)
    def _noop() -> None:  # a second command keeps typer from flattening the app into `logs`
        pass

    register(app)
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        """Exit code and output, a `NdifJobsError` turned into both as the CLI's `main` does."""
        result = runner.invoke(app, list(args))
        if isinstance(result.exception, NdifJobsError):
            return result.exception.exit_code, result.output + str(result.exception)
        return result.exit_code, result.output

    return invoke


@pytest.fixture
def fast_beats(env, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDIF_JOBS_WORKER_BEAT_S", "0.3")
    env["NDIF_JOBS_WORKER_BEAT_S"] = "0.3"
    return env


def _listed(cli) -> list[dict]:  # type: ignore[no-untyped-def]
    code, out = cli("workers", "--json")
    assert code == 0, out
    return json.loads(out)


def _wait_listed(cli, detached, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Until `count` workers are listed; fails at once, with the worker's log, if it exited."""

    def listed() -> bool:
        assert not _gone(detached.pid), Path(detached.log).read_text()[-3000:]
        return len(_listed(cli)) == count

    wait_until(listed, timeout=60, what="the worker's row")


def _gone(pid: int) -> bool:
    from ndif_jobs.owners import process_started

    return process_started(pid) is None


def _detach(**kwargs):  # type: ignore[no-untyped-def]
    from ndif_jobs.runner.detach import detach_worker, worker_args
    from ndif_jobs.settings import Settings

    return detach_worker(Settings(), worker_args(backend="local"), backend="local", **kwargs)


def test_detached_worker_is_listed_stopped_by_workers_stop_and_its_log_shown(fast_beats, cli) -> None:  # type: ignore[no-untyped-def]
    started = _detach()
    try:
        assert Path(started.log).is_file() and Path(started.pid_file).is_file()
        assert os.getsid(started.pid) == started.pid, "the worker leads a session of its own (no SIGHUP from the terminal)"
        _wait_listed(cli, started)
        (row,) = _listed(cli)
        assert row["backend"] == "local" and row["this_host"] and not row["stale"] and row["jobs_done"] == 0
        code, out = cli("workers")
        assert code == 0 and str(started.pid) in out and "live" in out

        code, out = cli("workers", "stop")
        assert code == 0 and "asked worker" in out, out
        wait_until(lambda: _gone(started.pid), timeout=30, what="the worker to exit on `workers stop`")
        assert _listed(cli) == [], "a worker that left removes its row"

        code, out = cli("logs")
        assert code == 0
        assert "worker started" in out and "worker finished" in out and "stopping after the current bundle" in out
    finally:
        if not _gone(started.pid):
            os.kill(started.pid, 9)


def test_a_second_detached_worker_for_the_same_queue_and_backend_is_refused_unless_another(fast_beats, cli) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.runner.detach import AlreadyRunning

    first = _detach()
    pids = [first.pid]
    try:
        with pytest.raises(AlreadyRunning, match="already runs .* --another"):
            _detach()
        second = _detach(another=True)
        pids.append(second.pid)
        assert second.pid != first.pid and second.pid_file != first.pid_file and second.log != first.log
        _wait_listed(cli, second, count=2)
        code, out = cli("workers", "stop")
        assert code == 2 and "2 workers run" in out
        code, out = cli("workers", "stop", "--all", "--now")
        assert code == 0, out
        wait_until(lambda: all(_gone(p) for p in pids), timeout=30, what="both workers to exit on --now")
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, 9)
    # The first one is gone: a new detach takes its place.
    third = _detach()
    os.kill(third.pid, 15)
    wait_until(lambda: _gone(third.pid), timeout=30, what="the third worker to exit")


def test_a_worker_on_another_host_is_marked_and_stops_at_its_next_beat(service, fast_beats) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from ndif_jobs.db.workers import Workers
    from ndif_jobs.runner.registry import list_workers, stop_workers
    from ndif_jobs.worker import Worker

    worker = Worker(service, backend="local")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    table = Workers.of_queue(service.queue)
    wait_until(lambda: len(table.all()) == 1, timeout=30, what="the worker's row")
    (live,) = list_workers(table)
    elsewhere = replace(live, here=False)  # as a worker on another host is seen from here
    signals: list[tuple[int, int]] = []
    report = stop_workers(table, [elsewhere], now=False, kill=lambda pid, sig: signals.append((pid, sig)))
    assert report.marked == [live.id] and not report.signalled and not signals, "no signal crosses hosts"
    thread.join(timeout=30)
    assert not thread.is_alive(), "the worker stops at its next beat"
    assert table.all() == []


def test_a_worker_that_died_is_shown_stale_and_forgotten_on_stop(service, cli) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.db.workers import Workers
    from ndif_jobs.owners import this_host

    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    started = int(time.time())
    table = Workers.of_queue(service.queue)
    dead = f"{this_host()}:{proc.pid}:{started}:beef"
    table.register(dead, this_host(), proc.pid, "local", started)
    table.register("far-host:42:1700000000:cafe", "far-host", 42, None, 1_700_000_000)
    with service.queue.db.cursor(write=True) as cur:
        cur.execute("UPDATE workers SET last_beat = ? WHERE host = 'far-host'", (time.time() - 3600,))
    rows = {w["id"]: w for w in _listed(cli)}
    assert rows[dead]["stale"] and rows["far-host:42:1700000000:cafe"]["stale"]
    code, out = cli("workers", "stop", dead[:20])
    assert code == 0 and "already gone" in out
    code, out = cli("workers", "stop", "far-host")
    assert code == 0 and "another host" in out
    assert [w.id for w in table.all()] == ["far-host:42:1700000000:cafe"]
    assert table.all()[0].stop_requested == 1
    code, out = cli("workers", "stop", "nobody")
    assert code == 2 and "no worker 'nobody'" in out


def test_logs_follow_prints_what_is_appended_until_the_worker_exits(tmp_path: Path) -> None:
    from ndif_jobs.runner.logs import follow

    log = tmp_path / "worker.log"
    log.write_text("".join(f"old {i}\n" for i in range(50)))
    running = threading.Event()
    running.set()

    def write() -> None:
        with open(log, "a") as f:
            for i in range(3):
                time.sleep(0.1)
                f.write(f"new {i}\n")
                f.flush()
        time.sleep(0.3)
        running.clear()

    writer = threading.Thread(target=write)
    writer.start()
    out = io.StringIO()
    follow(log, out, lines=2, alive=running.is_set, poll_s=0.05, stop_after_s=20)
    writer.join()
    assert out.getvalue().splitlines() == ["old 48", "old 49", "new 0", "new 1", "new 2"]


def test_print_unit_is_a_valid_systemd_user_unit(settings, tmp_path: Path) -> None:
    from ndif_jobs.runner.detach import worker_args
    from ndif_jobs.runner.unit import unit_text

    text = unit_text(settings, worker_args(backend="ndif", max_bundle=16))
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(text)
    exec_start = parser["Service"]["ExecStart"]
    assert exec_start.split()[-5:] == ["worker", "--backend", "ndif", "--max-bundle", "16"]
    assert Path(exec_start.split()[0].strip('"')).exists()
    assert parser["Service"]["Restart"] == "on-failure"
    assert parser["Service"]["KillSignal"] == "SIGTERM"
    assert parser["Install"]["WantedBy"] == "default.target"
    assert f"NDIF_JOBS_HOME={settings.home}" in parser["Service"]["Environment"]
    if shutil.which("systemd-analyze") is None:
        return
    unit = tmp_path / "ndif-jobs-worker.service"
    unit.write_text(text)
    runtime = tmp_path / "xdg"  # the user manager's runtime folder, which a container may lack
    runtime.mkdir(mode=0o700)
    proc = subprocess.run(["systemd-analyze", "verify", "--user", str(unit)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
