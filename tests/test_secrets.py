"""A database password never reaches an error line or a log, wherever the URL carries it.

libpq (and so psycopg, and SQLAlchemy's URL) take a password after the user name or as a
`password` / `sslpassword` query parameter. The database here is a PostgreSQL URL whose port
nobody listens on, so every command meets the real driver's "connection refused".
"""

from __future__ import annotations

import io
import json

import pytest

from .conftest import run_cli

USER_PASSWORD = "user-pw-7c1e"
QUERY_PASSWORD = "query-pw-93fa"
SSL_PASSWORD = "ssl-pw-0b2d"
URL = (f"postgresql+psycopg://postgres:{USER_PASSWORD}@127.0.0.1:1/test"
       f"?password={QUERY_PASSWORD}&sslmode=prefer&sslpassword={SSL_PASSWORD}")
SHOWN = "postgresql+psycopg://postgres:***@127.0.0.1:1/test?password=***&sslmode=prefer&sslpassword=***"


def assert_no_password(text: str) -> None:
    for secret in (USER_PASSWORD, QUERY_PASSWORD, SSL_PASSWORD):
        assert secret not in text, f"{secret} shown in:\n{text}"


def test_query_string_passwords_are_masked_in_error_lines(env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("list", env={**env, "NDIF_JOBS_DATABASE_URL": URL}, timeout=60)
    assert proc.returncode == 1
    assert_no_password(proc.stdout + proc.stderr)
    (line,) = proc.stderr.splitlines()
    assert SHOWN in line and "Connection refused" in line  # still says which database, and why


def test_query_string_passwords_are_masked_in_the_workers_retry_logs(env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("worker", "--until-empty", env={**env, "NDIF_JOBS_DATABASE_URL": URL, "NDIF_JOBS_DB_RETRY_S": "1"},
                   timeout=60)
    assert proc.returncode == 1
    assert_no_password(proc.stdout + proc.stderr)
    retries = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert retries and all(r["database"] == SHOWN for r in retries if r["event"].startswith("queue database"))


def test_database_passwords_are_redacted_from_any_log_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Opening the database registers its passwords as secrets: a driver message or traceback
    that repeats one is redacted like the NDIF API key."""
    from ndif_jobs.db.engine import open_database
    from ndif_jobs.errors import StoreError
    from ndif_jobs.logging import configure_logging, get_logger

    with pytest.raises(StoreError):
        open_database(URL)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger("test").warning("driver said", error=f"bad sslpassword {SSL_PASSWORD} for {QUERY_PASSWORD}")
    get_logger("test").warning(f"auth failed with {USER_PASSWORD}")
    assert_no_password(stream.getvalue())
    assert stream.getvalue().count("***") == 3
