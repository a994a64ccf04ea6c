"""Migrations: the only way the schema is made, the same on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ndif_jobs.db.engine import SCHEMA_HEAD, alembic_config, dispose_engines, open_database
from ndif_jobs.db.tables import metadata
from ndif_jobs.errors import StoreError

from .conftest import run_cli


def test_the_queues_rows_and_states_follow_the_tables() -> None:
    from ndif_jobs.db import queue, tables

    for table, row in ((tables.jobs, queue.JobRow), (tables.bundles, queue.BundleRow),
                       (tables.attempts, queue.AttemptRow)):
        assert tuple(table.c.keys()) == row._fields, f"queue.py's row of {table.name} differs from tables.py's"
    assert queue.JOB_STATES == tuple(s.value for s in tables.JobState)


def test_schema_head_constant_is_alembics_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_current_head() == SCHEMA_HEAD


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_match_the_models(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_database(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
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


_JOBS_AT_0002 = [
    # id, key, state, lease_expires_at, result_key, result_bytes
    ("a00000000001", "1" * 64, "queued", None, None, None),
    ("a00000000002", "2" * 64, "claimed", 9e9, None, None),
    ("a00000000003", "3" * 64, "completed", None, "3" * 64, 300),
    ("a00000000004", "4" * 64, "failed", None, None, None),
    ("a00000000005", "3" * 64, "cached", None, "3" * 64, 300),
]


def _insert_jobs_at_0002(conn: Any) -> None:
    """`_JOBS_AT_0002` into the `jobs` table as it was at revision 0002 (later revisions keep its columns)."""
    from sqlalchemy import text

    for job_id, key, state, lease, result_key, result_bytes in _JOBS_AT_0002:
        conn.execute(text(
            "INSERT INTO jobs (id, key, experiment, model, model_key, backend, params, state, priority, tags,"
            " created_at, updated_at, not_before, attempts, max_attempts, lease_owner, lease_expires_at,"
            " result_key, result_bytes) VALUES (:id, :key, 'activations', 'm', 'm', 'local', '{}', :state, 0, '',"
            " :t, :t, 0, 0, 3, :owner, :lease, :result_key, :result_bytes)"),
            {"id": job_id, "key": key, "state": state, "t": float(job_id[-1]), "lease": lease,
             "owner": "w" if lease else None, "result_key": result_key, "result_bytes": result_bytes})


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_queue_at_0002_is_upgraded_keeping_every_row_and_matches_the_tables(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    from alembic import command
    from sqlalchemy import create_engine, text
    from sqlalchemy.schema import CreateIndex

    from ndif_jobs.db.queue import Queue

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        config = alembic_config(url)
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        _insert_jobs_at_0002(conn)
        before = conn.execute(text("SELECT * FROM jobs ORDER BY id")).all()
    engine.dispose()

    database = open_database(url)
    assert database.revision() == SCHEMA_HEAD
    with database.engine.connect() as conn:
        after = conn.execute(text("SELECT * FROM jobs ORDER BY id")).all()
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        if backend == "sqlite":  # alembic compares index columns, not their WHERE: compare the whole definitions
            made = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")).all())
            assert made == {index.name: str(CreateIndex(index).compile(conn)).strip()
                            for table in metadata.sorted_tables for index in table.indexes}
    assert [tuple(row)[:24] for row in after] == [tuple(row) for row in before]
    assert all(row.sweep is None and row.sweep_row is None for row in after)
    queue = Queue(database)
    assert queue.counts() == {"queued": 1, "claimed": 1, "submitted": 0, "running": 0, "completed": 1, "cached": 1,
                              "failed": 1, "cancelled": 0}
    assert [j.id for j in queue.list_jobs(state="failed")] == ["a00000000004"]
    assert queue.stored_bytes() == 300
    assert [j.id for j in queue.claim("w2", limit=5, lease_s=60)] == ["a00000000001"]
    dispose_engines()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_queue_before_0005_is_upgraded_keeping_its_results_in_one_btree(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    from alembic import command
    from sqlalchemy import create_engine, text

    from ndif_jobs.db.queue import Queue

    previous = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision("0005").down_revision
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        config = alembic_config(url)
        config.attributes["connection"] = conn
        command.upgrade(config, str(previous))
        _insert_jobs_at_0002(conn)
        conn.execute(text("INSERT INTO results (result_key, bytes) VALUES (:k, 300), (:j, 7)"),
                     {"k": "3" * 64, "j": "9" * 64})
    engine.dispose()

    database = open_database(url)
    assert database.revision() == SCHEMA_HEAD
    with database.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert sorted(conn.execute(text("SELECT result_key, bytes FROM results")).all()) == [("3" * 64, 300), ("9" * 64, 7)]
        if backend == "sqlite":
            made = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'results'")).scalar_one()
            assert made.rstrip().endswith("WITHOUT ROWID")
            assert conn.execute(text("SELECT count(*) FROM sqlite_master WHERE tbl_name = 'results'")).scalar_one() == 1
    queue = Queue(database)
    assert queue.stored_bytes() == 307
    (claimed,) = queue.claim("w2", limit=5, lease_s=60)
    assert queue.complete("w2", [(claimed.id, "1" * 64, 11)]) == 1
    assert queue.stored_bytes() == 318
    dispose_engines()
