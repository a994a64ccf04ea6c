"""Opening the queue database: engine set-up, SQLite tuning, and migrations on first open.

SQLite runs in WAL mode (readers never block the worker) with a busy timeout, and every write
transaction starts with `BEGIN IMMEDIATE`: it takes the write lock up front, so two workers
wait for each other in SQLite's busy handler instead of failing with "database is locked" when
a read lock cannot be upgraded. Plain reads (`status`, `list`) use a deferred `BEGIN`.

Opening checks the schema version with one cheap query; alembic itself (a quarter second to
import) is loaded only when a migration must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DatabaseError

from ..errors import StoreError

#: The newest migration in `alembic/versions`; a test checks it equals alembic's head.
SCHEMA_HEAD = "0001"
#: Every revision this code can read, oldest first.
KNOWN_REVISIONS = ("0001",)

SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def _prepare_sqlite_file(path: Path) -> None:
    """Create the database file readable by its owner only, with a clear error if we cannot."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create the database folder {folder}: {exc.strerror}") from None
    if not path.exists():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create the database {path}: {exc.strerror}") from None
    elif not os.access(path, os.R_OK):
        raise StoreError(f"cannot read the database {path}: permission denied")


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" event, not the driver, decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and str(mode[0]).lower() != "wal":
            # A read-only file or filesystem cannot switch to WAL: it can still be read.
            pass
        # In WAL mode NORMAL is crash-safe for the database; only the last commits before a
        # power cut can be lost, never the file's integrity. Results are fsynced separately.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def get_engine(url: str) -> Engine:
    """The process's engine for `url`, created (and its file made private) on first use."""
    engine = _engines.get(url)
    if engine is not None:
        return engine
    if _is_sqlite(url):
        path = _sqlite_path(url)
        if path is not None:
            _prepare_sqlite_file(path)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    _engines[url] = engine
    return engine


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's write lock from its first statement."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def current_revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return row[0] if row else None


def alembic_folder() -> Path:
    """The migrations: beside the package in a checkout, inside it in an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_alembic", here.parent / "alembic"):
        if (candidate / "env.py").exists():
            return candidate
    raise StoreError("the alembic migrations are missing from this installation of ndif-jobs")


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(alembic_folder()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> bool:
    """Bring the schema to `SCHEMA_HEAD` under a lock; returns whether anything ran."""
    from alembic import command

    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7410563)"))
        revision = current_revision(conn)
        if revision == SCHEMA_HEAD:
            return False
        _refuse_unknown(revision, engine)
        config = alembic_config(str(engine.url.render_as_string(hide_password=False)))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return True


def _refuse_unknown(revision: str | None, engine: Engine) -> None:
    if revision is not None and revision not in KNOWN_REVISIONS:
        raise StoreError(
            f"the database {engine.url.render_as_string(hide_password=True)} has schema version "
            f"{revision}, newer than this ndif-jobs knows ({SCHEMA_HEAD}): upgrade ndif-jobs"
        )


def open_database(url: str) -> Engine:
    """An engine whose schema is current, migrating on first open. Raises `StoreError`."""
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
        if revision == SCHEMA_HEAD:
            return engine
        _refuse_unknown(revision, engine)
        upgrade(engine)
    except DatabaseError as exc:
        shown = engine.url.render_as_string(hide_password=True)
        detail = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise StoreError(f"cannot open the database {shown}: {detail}") from None
    return engine
