"""`read_settings`: the read commands' settings without pydantic, the same as `Settings` reads
them, or None whenever it cannot be sure (then the command builds `Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ndif_jobs import read_settings as rs
from ndif_jobs.settings import Settings


def _both(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, env_file: Path | None = None) -> tuple[Any, Any]:
    for name in list(__import__("os").environ):
        if name.startswith("NDIF_JOBS_") or name in ("NDIF_HOST", "NDIF_API_KEY"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    light = rs.read_settings(env_file)
    full = Settings(_env_file=env_file) if env_file is not None else Settings()
    return light, full


def _same(light: rs.ReadSettings, full: Settings) -> None:
    for name in ("home", "database_url", "db_retry_s", "offline", "results_dir", "db_url", "import_modules"):
        assert getattr(light, name) == getattr(full, name), name


def test_it_reads_what_settings_reads_from_the_environment_and_the_data_folders_env(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text("# mine\nNDIF_JOBS_DB_RETRY_S=7.5\nNDIF_API_KEY=abcd1234\nndif_jobs_offline=true\n\n")
    light, full = _both({"NDIF_JOBS_HOME": str(home), "NDIF_JOBS_POLL_S": "0.2", "NDIF_JOBS_LOG_FORMAT": "json",
                         "NDIF_JOBS_MODELS_CACHE": "/somewhere"}, monkeypatch)
    assert light is not None and light.db_retry_s == 7.5 and light.offline
    _same(light, full)


def test_an_env_file_named_replaces_the_data_folders(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    named = tmp_path / "my.env"
    named.write_text(f"NDIF_JOBS_HOME={tmp_path / 'elsewhere'}\nNDIF_JOBS_DATABASE_URL=sqlite:///{tmp_path / 'q.db'}\n")
    light, full = _both({}, monkeypatch, env_file=named)
    assert light is None  # a .env may not choose the database: Settings refuses it, and says so
    named.write_text(f"NDIF_JOBS_HOME={tmp_path / 'elsewhere'}\n")
    light, full = _both({}, monkeypatch, env_file=named)
    assert light is not None and light.home == tmp_path / "elsewhere"
    _same(light, full)


@pytest.mark.parametrize("environ", [
    {"NDIF_JOBS_IMPORTS": "mymodule"},             # imports run code: Service must import them
    {"NDIF_JOBS_MAX_BUNDLE": "64"},                # a setting it does not check
    {"NDIF_JOBS_SOMETHING_NEW": "1"},              # a setting it does not know
    {"NDIF_JOBS_DB_RETRY_S": "1e3"},               # not a plain number
    {"NDIF_JOBS_POLL_S": "0"},                     # Settings refuses it
    {"NDIF_JOBS_LOG_LEVEL": "loud"},               # Settings refuses it
    {"NDIF_JOBS_OFFLINE": "maybe"},                # Settings refuses it
    {"NDIF_JOBS_HOME": ""},
])
def test_it_gives_up_on_what_it_does_not_read_exactly(environ, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    environ = {"NDIF_JOBS_HOME": str(tmp_path), **environ}
    for name in list(__import__("os").environ):
        if name.startswith("NDIF_JOBS_"):
            monkeypatch.delenv(name)
    assert rs.read_settings(environ=environ) is None


@pytest.mark.parametrize("line", ['NDIF_JOBS_DB_RETRY_S="5"', "export NDIF_JOBS_DB_RETRY_S=5",
                                  "NDIF_JOBS_DB_RETRY_S=${RETRY}", "NDIF_JOBS_DB_RETRY_S=5 # five", "NDIF_HOST=x"])
def test_it_leaves_a_dotenv_it_cannot_parse_plainly_to_settings(line, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text(line + "\n")
    assert rs.read_settings(environ={"NDIF_JOBS_HOME": str(tmp_path)}) is None


def test_every_name_it_checks_is_a_setting_of_that_kind() -> None:
    fields = Settings.model_fields

    def field(name: str) -> Any:
        return fields[name.removeprefix(rs.PREFIX)]

    for name in rs._POSITIVE:
        assert field(name).annotation is float, name
        bounds = [getattr(m, "le", None) for m in field(name).metadata if getattr(m, "le", None) is not None]
        assert bounds == ([rs._AT_MOST[name]] if name in rs._AT_MOST else []), name
        assert not any(getattr(m, "lt", None) for m in field(name).metadata), name
    for name, choices in rs._CHOICES.items():
        assert set(field(name).annotation.__args__) == choices, name
    for name in rs._FLAGS:
        assert field(name).annotation is bool, name
    for name in rs._ANY_TEXT:
        assert name.removeprefix(rs.PREFIX) in fields, name
    assert {n.lower() for n in rs.ENV_ONLY} <= {rs.PREFIX + f for f in fields} | {"ndif_host"}
