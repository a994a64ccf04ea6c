"""Opening the queue database: connections, SQLite tuning, and migrations on first open.

`open_database` returns a `Database`. The queue's own statements (`queue.py`) run straight on
the driver's connections, which it hands out: on a SQLite file its own small pool of `sqlite3`
connections, anywhere else SQLAlchemy's pool. The SQLAlchemy `Engine` (used by migrations,
housekeeping and scripts) is made only when first needed, so the CLI's read commands never
import SQLAlchemy (a tenth of a second); a `Database` stands in for an Engine wherever one is
expected, as any attribute it lacks is the Engine's.

SQLite runs in WAL mode (readers never block the worker) with a busy timeout, and every write
transaction starts with `BEGIN IMMEDIATE`: it takes the write lock up front, so two workers
wait for each other in SQLite's busy handler instead of failing with "database is locked" when
a read lock cannot be upgraded. Reads run in autocommit mode, one snapshot per statement.

Opening checks the schema version with one cheap query; SQLAlchemy and alembic are loaded only
when a migration must run.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import Engine
    from sqlalchemy.engine import URL, Connection

#: The newest migration in `alembic/versions`; a test checks it equals alembic's head.
SCHEMA_HEAD = "0006"
#: Every revision this code can read, oldest first.
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006")

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Most idle connections a `Database` keeps for a SQLite file (one per thread that used it).
SQLITE_POOL_SIZE = 4

_engines: dict[str, Engine] = {}
_databases: dict[str, Database] = {}

#: Query parameters of a database URL that carry a password (libpq's names, as psycopg takes them).
_PASSWORD_PARAMS = frozenset({"password", "sslpassword"})


def shown_url(url: URL) -> str:
    """`url` as messages and logs show it: every password hidden, the one after the user name
    and those given as query parameters alike (SQLAlchemy hides only the first)."""
    query = {k: ("***" if k.lower() in _PASSWORD_PARAMS else v) for k, v in url.query.items()}
    # SQLAlchemy quotes the mask as it renders the query: shown as typed, like the user's part.
    return url.set(query=query).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def register_url_secrets(url: str) -> None:
    """Have the log redaction and the CLI's error lines hide `url`'s passwords, wherever a
    driver's message or a traceback might repeat them."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    from ..logging import register_secret

    try:
        parsed = make_url(url)
    except ArgumentError:
        return  # reported, without the URL, where it is first used
    register_secret(parsed.password)
    for key, value in parsed.query.items():
        if key.lower() in _PASSWORD_PARAMS:
            for one in value if isinstance(value, tuple) else (value,):
                register_secret(one)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def _plain_sqlite_file(url: str) -> Path | None:
    """The file of a plain `sqlite:///PATH` URL, parsed without SQLAlchemy; None for any other URL
    (in-memory, query options, other drivers), which is then opened through SQLAlchemy."""
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme not in ("sqlite", "sqlite+pysqlite") or not rest or "?" in rest:
        return None
    if rest == ":memory:" or rest.startswith("file:"):
        return None
    return Path(rest)


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


def configure_sqlite(dbapi_connection: sqlite3.Connection) -> None:
    """The settings of every SQLite connection, SQLAlchemy's and the queue's own."""
    # Transactions are begun explicitly (BEGIN / BEGIN IMMEDIATE), never by the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    try:
        # A read-only file or filesystem cannot switch to WAL: it can still be read.
        cursor.execute("PRAGMA journal_mode = WAL").fetchone()
    except sqlite3.OperationalError:
        pass
    # In WAL mode NORMAL is crash-safe for the database: a commit survives the crash of any
    # process; an OS crash or a power cut can take back the last commits, never the file's
    # integrity (README, Reliability). Results are fsynced separately.
    cursor.execute("PRAGMA synchronous = NORMAL")
    # Up to 16 MiB of page cache (the default is 2 MiB): a batch of 100k jobs inserts 15% faster
    # (more did not help), while a full scan (`status`'s stored bytes) grows a reader by 16 MiB
    # at most. The cache grows only as pages are used.
    cursor.execute("PRAGMA cache_size = -16384")
    # ORDER BY and GROUP BY scratch space in memory rather than in temporary files.
    cursor.execute("PRAGMA temp_store = MEMORY")
    # Checkpoint the WAL into the database every 4000 pages (16 MiB) rather than every 1000: a
    # checkpoint syncs the file, and at 1000 pages a queue of single inserts spent two thirds of
    # its time in them. The WAL file is cut back to 64 MiB after a checkpoint.
    cursor.execute("PRAGMA wal_autocheckpoint = 4000")
    cursor.execute("PRAGMA journal_size_limit = 67108864")
    cursor.close()


def _install_sqlite_hooks(engine: Engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def get_engine(url: str) -> Engine:
    """The process's engine for `url`, created (and its file made private) on first use."""
    engine = _engines.get(url)
    if engine is not None:
        return engine
    from sqlalchemy import create_engine

    if _is_sqlite(url):
        path = _sqlite_path(url)
        if path is not None:
            _prepare_sqlite_file(path)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
    else:
        register_url_secrets(url)
        # A server whose host drops packets would otherwise hold each connect for the OS's TCP
        # timeout (minutes), past the retry window (`retry.py`); a URL may set its own.
        connect_args = {"connect_timeout": 10} if url.startswith("postgres") and "connect_timeout" not in url else {}
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    _engines[url] = engine
    return engine


def dispose_engines() -> None:
    for database in _databases.values():
        database.close()
    _databases.clear()
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


class Database:
    """One queue database: its URL, driver connections for the queue, and the SQLAlchemy
    `Engine`, made on first use. Attributes a `Database` lacks are the Engine's, so it can be
    passed wherever an Engine is expected (`write_transaction`, `db.begin()`, alembic)."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self._engine = engine
        if engine is not None:
            self.dialect_name = engine.dialect.name
        else:
            self.dialect_name = "sqlite" if _is_sqlite(url) else url.split(":", 1)[0].split("+", 1)[0]
            if self.dialect_name == "postgres":
                self.dialect_name = "postgresql"
        # A plain SQLite file is opened directly (no SQLAlchemy); anything else through the Engine.
        self.sqlite_file = _plain_sqlite_file(url) if engine is None else None
        if self.sqlite_file is None:
            register_url_secrets(url)
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @classmethod
    def wrap(cls, engine: Engine) -> Database:
        """A `Database` over an Engine made elsewhere (its own pool and settings are kept)."""
        return cls(engine.url.render_as_string(hide_password=False), engine=engine)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = get_engine(self.url)
        return self._engine

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect_name == "sqlite"

    def display_url(self) -> str:
        if self.sqlite_file is not None:
            return self.url  # a plain SQLite file's URL holds no password
        from sqlalchemy import make_url

        return shown_url(make_url(self.url))

    def __repr__(self) -> str:
        return f"Database({self.display_url()!r})"

    # -- driver connections ----------------------------------------------------------------

    def _sqlite_connect(self) -> sqlite3.Connection:
        with self._lock:
            if self._pid != os.getpid():  # a forked child never uses its parent's connections
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        conn = sqlite3.connect(
            str(self.sqlite_file), timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
        configure_sqlite(conn)
        return conn

    def _sqlite_release(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # never hand on a connection mid-transaction
            conn.close()
            return
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < SQLITE_POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def cursor(
        self, write: bool = False, *, one_statement: bool = False, durable: bool = False
    ) -> AbstractContextManager[Any]:
        """A driver cursor. `write=True`: inside one transaction that holds the write lock from
        its first statement (SQLite: `BEGIN IMMEDIATE`), committed on leaving, rolled back on an
        exception. `write=False`: one snapshot per statement.

        `one_statement=True` (with `write=True`): the caller runs a single statement, which on a
        SQLite file is its own transaction, as atomic and as serialized as `BEGIN IMMEDIATE`
        (a writing statement takes the write lock before it reads), without the two round trips
        of BEGIN and COMMIT. Elsewhere it is committed as any write.

        `durable=True` (with `write=True`): on a SQLite file the commit is synced to disk
        (`synchronous = FULL` for this transaction) and so survives an OS crash or a power cut,
        which the queue's other commits (`synchronous = NORMAL`) may not. For the few commits
        whose loss would cost more than a re-run: NDIF's job id, without which a request would
        be sent again. PostgreSQL's commits are durable anyway."""
        if self.sqlite_file is not None:
            return self._sqlite_file_cursor(begin=write and not one_statement, durable=durable)
        return self._engine_cursor(write)

    @contextmanager
    def _sqlite_file_cursor(self, begin: bool, durable: bool) -> Iterator[sqlite3.Cursor]:
        """A cursor on one of this file's own connections (`cursor` on a SQLite file)."""
        conn = self._sqlite_connect()
        try:
            cursor = conn.cursor()
            if durable:
                cursor.execute("PRAGMA synchronous = FULL")
            if begin:
                cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
                if begin:
                    cursor.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if durable and not conn.in_transaction:
                    cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.close()
        finally:
            self._sqlite_release(conn)

    @contextmanager
    def _engine_cursor(self, write: bool) -> Iterator[Any]:
        """A driver cursor on a connection of the Engine's pool (`cursor` on PostgreSQL, and on
        a SQLite database that is not a plain file)."""
        raw = self.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            if dbapi is None:  # only a connection already closed has none
                raise StoreError(f"the connection to {self.display_url()} is closed")
            cursor = dbapi.cursor()
            sqlite = self.is_sqlite
            if sqlite and write:
                cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
                if sqlite:
                    if write:
                        cursor.execute("COMMIT")
                elif write:
                    dbapi.commit()
                else:
                    dbapi.rollback()  # end the read's transaction
            except BaseException:
                try:
                    if not sqlite:
                        dbapi.rollback()
                    elif dbapi.in_transaction:
                        cursor.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - a broken connection: the pool must drop it
                    raw.invalidate()
                else:
                    if _connection_lost(dbapi):
                        raw.invalidate()  # never hand a dead connection to the next (retried) call
                raise
            finally:
                cursor.close()
        finally:
            raw.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- the schema ------------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema's alembic revision; None for a database without one (a new file)."""
        if self.sqlite_file is None:
            with self.engine.connect() as conn:
                return current_revision(conn)
        with self.cursor() as cur:
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
            if cur.fetchone() is None:
                return None
            row = cur.execute("SELECT version_num FROM alembic_version").fetchone()
            return row[0] if row else None


def _connection_lost(dbapi: Any) -> bool:
    """Whether a driver connection died under us (psycopg's `broken` / `closed`; sqlite3 has neither).

    Usually the rollback after the error fails too and the connection is invalidated for that,
    but a driver may make rollback a no-op on a dead connection: this catches that case."""
    return bool(getattr(dbapi, "broken", False) or getattr(dbapi, "closed", False))


@contextmanager
def write_transaction(engine: Engine | Database) -> Iterator[Connection]:
    """A SQLAlchemy transaction that holds the database's write lock from its first statement."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def current_revision(conn: Connection) -> str | None:
    from sqlalchemy import inspect, text

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


def alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(alembic_folder()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine | Database) -> bool:
    """Bring the schema to `SCHEMA_HEAD` under a lock; returns whether anything ran."""
    from alembic import command
    from sqlalchemy import text

    if isinstance(engine, Database):
        engine = engine.engine
    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7410563)"))
        revision = current_revision(conn)
        if revision == SCHEMA_HEAD:
            return False
        _refuse_unknown(revision, shown_url(engine.url))
        config = alembic_config(str(engine.url.render_as_string(hide_password=False)))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return True


def _refuse_unknown(revision: str | None, shown_url: str) -> None:
    if revision is not None and revision not in KNOWN_REVISIONS:
        raise StoreError(
            f"the database {shown_url} has schema version "
            f"{revision}, newer than this ndif-jobs knows ({SCHEMA_HEAD}): upgrade ndif-jobs"
        )


def _database_error(exc: BaseException) -> str | None:
    """The first line of a driver's or SQLAlchemy's database error; None for anything else."""
    if isinstance(exc, sqlite3.DatabaseError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import DatabaseError

        if isinstance(exc, DatabaseError):
            return str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
    return None


def open_database(url: str, *, retry_s: float = 0.0) -> Database:
    """The database at `url` with its schema current, migrating on first open. Raises `StoreError`.

    With `retry_s` > 0 a database that cannot be reached right now (`retry.is_transient`: a
    PostgreSQL server restarting, a SQLite file locked) is tried again for up to that long, as
    every queue operation is: a worker started by a scheduler during a database restart waits
    for it. Commands a person types keep the default, 0, and hear of the outage at once."""
    database = _databases.get(url)
    if database is not None:
        return database
    database = Database(url)

    def prepare(_rerun: bool) -> None:
        # Safe to run again: it reads the schema version before it migrates anything.
        if database.sqlite_file is not None:
            _prepare_sqlite_file(database.sqlite_file)
        revision = database.revision()
        if revision != SCHEMA_HEAD:
            _refuse_unknown(revision, database.display_url())
            upgrade(database.engine)

    try:
        if retry_s > 0:
            from .retry import call_with_retry

            call_with_retry(prepare, window_s=retry_s, database=database, name="open the database")
        else:
            prepare(False)
    except StoreError:
        database.close()
        raise
    except Exception as exc:
        detail = _database_error(exc)
        if detail is None:
            raise
        database.close()
        raise StoreError(f"cannot open the database {database.display_url()}: {detail}") from None
    _databases[url] = database
    return database
