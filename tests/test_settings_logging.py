"""Settings from the environment and .env; logs as JSON lines; the API key never shows."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from ndif_jobs.logging import configure_logging, get_logger, register_secret
from ndif_jobs.settings import Settings

from .conftest import REPO, run_cli

SECRET = "ndif-secret-0123456789abcdef"


def test_every_setting_is_documented_in_env_example() -> None:
    text = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_]+)=", text, flags=re.M))
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = {c.upper() for c in getattr(alias, "choices", [])} if alias else {f"NDIF_JOBS_{name.upper()}"}
        assert names & documented, f"{name} is not in .env.example"


def test_settings_from_the_data_folder_env_file(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("NDIF_JOBS_MAX_BUNDLE=9\n")  # the working folder's: never read
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text(f"NDIF_JOBS_MAX_BUNDLE=7\nNDIF_API_KEY={SECRET}\nNDIF_HOST=http://127.0.0.1:9\n")
    settings = Settings(home=home)
    assert settings.max_bundle == 7 and settings.ndif_host == "https://api.ndif.us"  # NDIF_HOST: environment only
    assert "NDIF_HOST: ignored" in capsys.readouterr().err
    assert settings.ndif_api_key.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert settings.db_url == f"sqlite:///{home / 'queue.db'}"


def test_json_logs_redact_the_key() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    register_secret(SECRET)
    log = get_logger().bind(job="abc123", bundle="def456")
    log.info("submitting", url=f"http://x/?key={SECRET}", api_key=SECRET)
    try:
        raise RuntimeError(f"server said: bad key {SECRET}")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["job"] == "abc123" and lines[0]["bundle"] == "def456"
    assert lines[0]["api_key"] == "***"
    assert SECRET not in stream.getvalue()
    assert "***" in lines[1]["exception"]


def test_worker_logs_carry_job_and_bundle_ids_and_no_key(env, home) -> None:  # type: ignore[no-untyped-def]
    env = {**env, "NDIF_API_KEY": SECRET}
    job = json.loads(run_cli("submit", "activations", "--json", "-p", "prompt=Hi", "-p", "layers=[0]", env=env, check=True).stdout)
    proc = run_cli("worker", "--until-empty", env=env, check=True)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "job completed"]
    assert done and done[0]["job"] == job["id"] and done[0]["bundle"]
    everything = proc.stdout + proc.stderr + run_cli("show", job["id"], "--json", env=env).stdout
    for path in home.rglob("*"):
        if path.is_file():
            everything += path.read_bytes().decode("latin-1")
    assert SECRET not in everything
