"""Migrations: the only way the schema is made, the same on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ndif_jobs.db.engine import SCHEMA_HEAD, alembic_config, dispose_engines, open_database
from ndif_jobs.db.models import Base
from ndif_jobs.errors import StoreError

from .conftest import run_cli


def test_schema_head_constant_is_alembics_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_current_head() == SCHEMA_HEAD


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_match_the_models(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_database(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    dispose_engines()
    assert diff == []


def test_first_command_creates_a_private_database_in_wal_mode(env, home) -> None:  # type: ignore[no-untyped-def]
    run_cli("status", env=env, check=True)
    db = home / "queue.db"
    assert db.stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD


def test_db_upgrade_command(env, home) -> None:  # type: ignore[no-untyped-def]
    assert "migrated" in run_cli("db", "upgrade", env=env, check=True).stdout
    assert "already current" in run_cli("db", "upgrade", env=env, check=True).stdout


def test_a_newer_schema_is_refused(env, home) -> None:  # type: ignore[no-untyped-def]
    run_cli("status", env=env, check=True)
    conn = sqlite3.connect(home / "queue.db")
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.commit()
    proc = run_cli("status", env=env)
    assert proc.returncode == 1
    assert "newer than this ndif-jobs knows" in proc.stderr and "upgrade ndif-jobs" in proc.stderr
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "9999"


def test_a_corrupt_database_file_is_a_clear_error(env, home) -> None:  # type: ignore[no-untyped-def]
    home.mkdir(parents=True)
    (home / "queue.db").write_bytes(b"this is not a database" * 100)
    proc = run_cli("status", env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot open the database") and "Traceback" not in proc.stderr


def test_open_database_raises_store_error_for_unreachable_postgres() -> None:
    with pytest.raises(StoreError, match="cannot open the database"):
        open_database("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    dispose_engines()


def test_an_older_schema_is_migrated_on_open_keeping_its_jobs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from alembic import command
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        config = alembic_config(url)
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(text(
            "INSERT INTO jobs (id, key, experiment, model, model_key, backend, params, state, priority, tags, created_at,"
            " updated_at, not_before, attempts, max_attempts) VALUES ('abc123abc123', 'k', 'activations', 'm', 'm', 'local',"
            " '{}', 'queued', 0, '', 1, 1, 0, 0, 3)"))
    engine.dispose()
    database = open_database(url)
    assert database.revision() == SCHEMA_HEAD != "0001"
    from ndif_jobs.db.queue import Queue

    assert Queue(database).get("abc123abc123").state == "queued"
    dispose_engines()
