"""A `.env` configures ndif-jobs only from where the user put it, and never chooses code or hosts.

Each test runs the real CLI as a subprocess in a folder like a cloned repository: a hostile
`.env` beside an `evilmod.py` that leaves a marker file when imported. The repository under
test is put on PYTHONPATH so the subprocess runs this checkout's code from any folder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

SECRET = "ndif-secret-env-trust-0123456789"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


class Recorder(BaseHTTPRequestHandler):
    """An HTTP server standing in for an attacker's NDIF: it notes every request it gets."""

    seen: list[str] = []

    def _answer(self) -> None:
        type(self).seen.append(f"{self.command} {self.path} {dict(self.headers)}")
        body = b'{"deployments": {}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile_server() -> Iterator[tuple[str, list[str]]]:
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hostile_folder(folder: Path, lines: list[str]) -> Path:
    """`folder` with a `.env` of `lines` and an `evilmod.py` that writes `folder/MARKER` on import."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".env").write_text("\n".join(lines) + "\n")
    (folder / "evilmod.py").write_text(f"open({str(folder / 'MARKER')!r}, 'w').write('imported')\n")
    return folder / "MARKER"


@pytest.fixture
def outside_env(env: dict[str, str]) -> dict[str, str]:
    """The CLI environment, running this checkout from any folder, with no proxies of its own."""
    clean = {k: v for k, v in env.items() if k not in PROXY_VARS}
    return {**clean, "PYTHONPATH": str(REPO)}


def test_a_dotenv_in_the_working_folder_neither_imports_code_nor_moves_the_key(
    outside_env, home, tmp_path, hostile_server
) -> None:  # type: ignore[no-untyped-def]
    host, seen = hostile_server
    repo = tmp_path / "cloned-repo"
    marker = hostile_folder(repo, [
        "NDIF_JOBS_IMPORTS=evilmod", f"NDIF_HOST={host}", "NDIF_JOBS_ALLOW_HTTP_LOOPBACK=1",
        f"NDIF_JOBS_DATABASE_URL=sqlite:///{repo / 'evil.db'}",
    ])
    # The real NDIF is out of reach from a test: https goes to a closed local port.
    env = {**outside_env, "NDIF_JOBS_TEST_CWD": str(repo), "NDIF_API_KEY": SECRET,
           "HTTPS_PROXY": f"http://127.0.0.1:{closed_port()}", "NDIF_JOBS_RETRY_BACKOFF_S": "0.01"}

    for args in (["status"], ["list"], ["experiments"]):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
    models = run_cli("models", "--json", env=env)

    assert not marker.exists(), "a module named by the working folder's .env was imported"
    assert seen == [], "the host named by the working folder's .env was contacted"
    # `models` logs its retry on stdout ahead of the JSON (logging is not set up for it).
    assert json.loads(models.stdout[models.stdout.find("{\n"):])["host"] == "https://api.ndif.us"
    assert (home / "queue.db").exists() and not (repo / "evil.db").exists()


def test_the_data_folder_dotenv_is_read_but_cannot_choose_code_hosts_or_databases(
    outside_env, home, tmp_path, hostile_server
) -> None:  # type: ignore[no-untyped-def]
    host, seen = hostile_server
    importable = tmp_path / "on-the-path"
    marker = hostile_folder(importable, [])
    home.mkdir(parents=True)
    (home / ".env").write_text("\n".join([
        "NDIF_JOBS_MAX_SUBMIT_JOBS=1", "NDIF_JOBS_IMPORTS=evilmod", f"NDIF_HOST={host}",
        "NDIF_JOBS_ALLOW_HTTP_LOOPBACK=1", f"NDIF_JOBS_DATABASE_URL=sqlite:///{tmp_path / 'evil.db'}",
    ]) + "\n")
    env = {**outside_env, "NDIF_JOBS_TEST_CWD": str(tmp_path), "NDIF_API_KEY": SECRET,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(importable)])}
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))

    refused = run_cli("submit", "activations", "--params-file", str(two), env=env)
    models = run_cli("--offline", "models", "--json", env=env)

    assert refused.returncode == 2 and "NDIF_JOBS_MAX_SUBMIT_JOBS" in refused.stderr  # the file was read
    warnings = [line for line in refused.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, refused.stderr
    for name in ("NDIF_HOST", "NDIF_JOBS_IMPORTS", "NDIF_JOBS_DATABASE_URL", "ignored", "environment"):
        assert name in warnings[0], warnings[0]
    assert json.loads(models.stdout)["host"] == "https://api.ndif.us"
    assert not marker.exists() and seen == [] and not (tmp_path / "evil.db").exists()


def test_env_file_option_reads_the_named_file_and_only_that(outside_env, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = hostile_folder(tmp_path, ["NDIF_JOBS_MAX_SUBMIT_JOBS=1"])  # the working folder's: not read
    named = tmp_path / "settings" / "ndif.env"
    named.parent.mkdir()
    named.write_text("NDIF_JOBS_MAX_SUBMIT_JOBS=2\nNDIF_JOBS_IMPORTS=evilmod\n")
    env = {**outside_env, "NDIF_JOBS_TEST_CWD": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    two, three = tmp_path / "two.json", tmp_path / "three.json"
    two.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    three.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]))

    ok = run_cli("--env-file", str(named), "submit", "activations", "--params-file", str(two), "--json", env=env)
    over = run_cli("--env-file", str(named), "submit", "activations", "--params-file", str(three), env=env)
    missing = run_cli("--env-file", str(tmp_path / "nope.env"), "status", env=env)

    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2, ok.stderr
    assert over.returncode == 2 and "3 jobs" in over.stderr and "at most 2 (NDIF_JOBS_MAX_SUBMIT_JOBS)" in over.stderr
    assert "NDIF_JOBS_IMPORTS" in ok.stderr and not marker.exists()
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: --env-file {tmp_path / 'nope.env'}: no such file"


PROBE = (
    "from ndif_jobs import experiment, Params\n"
    "class P(Params):\n    prompt: str\n"
    "@experiment('{name}', params=P)\n"
    "def probe(model, p):\n    return {{}}\n"
)


def test_user_modules_come_from_the_paths_named_not_the_working_folder(outside_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_probe.py").write_text(PROBE.format(name="here-probe") + f"open({str(work / 'MARKER')!r}, 'w')\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "lib_probe.py").write_text(PROBE.format(name="lib-probe"))
    env = {**outside_env, "NDIF_JOBS_TEST_CWD": str(work)}

    by_name = run_cli("--import", "my_probe", "experiments", env=env)
    assert by_name.returncode == 2 and not (work / "MARKER").exists()
    assert by_name.stderr.strip().endswith("(to import my_probe.py from this folder: --import ./my_probe.py)")

    names = lambda proc: {e["name"] for e in json.loads(proc.stdout)}  # noqa: E731
    by_file = run_cli("--import", "./my_probe.py", "experiments", "--json", env=env)
    by_folder = run_cli("--import", f"{tmp_path / 'lib'}:lib_probe", "experiments", "--json", env=env)
    from_env = run_cli("experiments", "--json", env={**env, "NDIF_JOBS_IMPORTS": f"../lib/lib_probe.py,{work}:my_probe"})
    assert "here-probe" in names(by_file) and "lib-probe" in names(by_folder)
    assert {"here-probe", "lib-probe"} <= names(from_env)

    taken = run_cli("--import", str(tmp_path / "lib" / "json.py"), "status", env=env)
    (tmp_path / "lib" / "json.py").write_text("")
    shadow = run_cli("--import", str(tmp_path / "lib" / "json.py"), "status", env=env)
    assert taken.returncode == 2 and "does not exist" in taken.stderr
    assert shadow.returncode == 2 and "the name 'json' is already taken" in shadow.stderr
