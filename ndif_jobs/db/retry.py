"""Riding out a queue database that is briefly unreachable or busy.

A PostgreSQL server that restarts, fails over or drops connections, or a SQLite file that stays
locked past its busy timeout, would otherwise crash the worker on its next queue call; its jobs
would come back only when their leases ran out. Instead every queue operation runs through
`call_with_retry`: on an error that means the database cannot be reached *right now* (see
`is_transient`), the whole operation is run again after a short wait, for up to `window_s`
seconds (`NDIF_JOBS_DB_RETRY_S`, default 120; 0 turns retrying off). Each retry logs one warning.
When the window runs out the caller gets a one-line `StoreError` naming the database (password
hidden) and the driver's first line; the CLI prints that and exits 1. Opening the database
(`open_database`) is retried the same way for the worker only: a command a person types while
the database is down fails at once, in one line.

The waits grow exponentially with jitter: 0.05-0.1 s at first, doubling up to 1-2 s (half of
each wait fixed, half random, so workers that lost the server together do not come back in
step); the last wait is cut to end with the window. The first try runs outside tenacity, so a
healthy call costs one `try`, and neither tenacity (50 ms) nor structlog is imported until a
retry is needed: the CLI's read commands import neither.

What is retried, and why only that: lost or refused connections, a server shutting down or
starting up, too many connections, and SQLite's "database is locked / busy". These fail before
or instead of the transaction's work, so running it again is the fix. Constraint violations,
syntax errors, serialization failures, statement timeouts and everything else are bugs or
decisions that a second try would not change; they propagate at once, as they were.

The retry unit is one whole `Queue` / `RemoteBundles` method, which is one transaction. A
transaction that failed part-way was rolled back by the server, so running it again is exact.
The one uncertain case is a COMMIT that the server carried out but whose answer was lost with
the connection: the method then runs again on top of its own committed work. Each method is
safe to run again so (the few that must know are told with `rerun=True`):

- `complete`, `fail`, `close_bundle` (and `in_transaction`, which runs several of them as one),
  `renew_leases`, `release`, `hand_back`, `rebind`, `set_result_bytes`: conditional on the lease
  or plainly idempotent, so the second run changes nothing. The counts they return then say 0,
  which only skews the worker's own tally in its log. `mark_submitted`, `record_status` and
  `abandon` do not append a status twice.
- `claim` and `take_over`: the first run leased jobs to this worker, which never heard of them.
  Each run stamps what it takes with its own time; a re-run first looks for jobs leased to this
  worker at an earlier run's time and returns those, on a fresh lease (their attempt already
  recorded), instead of taking more. Should they be gone by then (another worker requeued them
  after their lease ran out), they are back in the queue: at-least-once holds either way.
- `start_bundle`: the bundle id is chosen once, before the first run; a re-run that finds that
  bundle does not insert it again, so no orphan bundle row is left.
- `enqueue`: job ids are chosen before the first run; a re-run returns the jobs it finds by id
  as queued and inserts only the others (without this, `force=True` and cache-hit jobs would hit
  their own primary keys).
- `cancel`, `retry` and the reads: idempotent.

Connections: on PostgreSQL the pool pings each connection as it is handed out
(`pool_pre_ping=True`) and replaces a dead one, and `Database.cursor` invalidates a connection
that failed under a statement rather than return it to the pool, so a retry always runs on a
live connection (SQLAlchemy's own `Connection`, used by `remote.py`, does the same by itself).
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from ..errors import StoreError

if TYPE_CHECKING:
    from tenacity import RetryCallState

#: Seconds a queue operation keeps retrying by default (`Settings.db_retry_s`).
DEFAULT_RETRY_S = 120.0
#: About the first wait between tries, and the longest.
FIRST_WAIT_S = 0.1
MAX_WAIT_S = 2.0

#: SQLite's words for "another connection holds the lock" (after its own busy timeout).
_SQLITE_BUSY = ("database is locked", "database is busy", "database table is locked")
#: PostgreSQL SQLSTATEs that mean "not now": the server is shutting down or starting up
#: (57P01-57P03), closed an idle session (57P05), or has no connection slot left (53300).
#: Class 08 (connection exceptions) is matched by its prefix.
_PG_NOT_NOW = frozenset({"57P01", "57P02", "57P03", "57P05", "53300"})

T = TypeVar("T")
P = ParamSpec("P")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot be reached or is locked *right now*.

    SQLAlchemy's wrappers are looked through to the driver's error. Psycopg and SQLAlchemy are
    only consulted when already imported: an error can only come from a loaded driver."""
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError):
            # SQLAlchemy saw the connection die and dropped it from the pool.
            return exc.connection_invalidated or (exc.orig is not None and is_transient(exc.orig))
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(_SQLITE_BUSY)
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            # No SQLSTATE: psycopg's own "connection failed / is lost / is closed".
            return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in _PG_NOT_NOW
        if isinstance(exc, psycopg.InterfaceError):
            message = str(exc).lower()
            return "connection" in message and ("closed" in message or "lost" in message)
    return False


def error_line(exc: BaseException) -> str:
    """The driver's own first line for `exc` (SQLAlchemy's wrapper and its SQL left out)."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def display_url(database: Any) -> str:
    """`database`'s URL with any password hidden: a `Database` or a SQLAlchemy Engine."""
    try:
        if hasattr(database, "display_url"):
            return str(database.display_url())
        return str(database.url.render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - naming the database must not hide the real error
        return "(its URL could not be shown)"


def call_with_retry(operation: Callable[[bool], T], *, window_s: float, database: Any, name: str) -> T:
    """`operation(rerun)`, run again while the database is unreachable, for up to `window_s` s.

    `rerun` is False on the first try and True on every later one: the previous try failed on
    a lost connection, so it may or may not have committed (see the module docstring).
    `database` (a `Database` or Engine) and `name` only label the log lines and the error.
    Raises `StoreError` when the window runs out; any other error propagates as it was."""
    try:
        return operation(False)
    except Exception as exc:
        if not is_transient(exc):
            raise
        first = exc
    started = time.monotonic()
    if window_s <= 0:
        raise StoreError(_gave_up_message(database, name, first, window_s, 0.0)) from first
    try:
        return _retry(operation, first, window_s, database, name)
    except Exception as exc:
        if not is_transient(exc):
            raise
        elapsed = time.monotonic() - started
        raise StoreError(_gave_up_message(database, name, exc, window_s, elapsed)) from exc


def call_stamped_with_retry(
    operation: Callable[[float, list[float]], T], *, window_s: float, database: Any, name: str
) -> T:
    """`call_with_retry` for a transaction that stamps the rows it takes with its own time.

    Each run gets its time and the times of the runs before it, so that it can find what an
    earlier run committed unseen (rows stamped with one of those times) instead of taking more:
    `claim` and `take_over`."""
    runs: list[float] = []

    def run(_rerun: bool) -> T:
        t = time.time()
        earlier = list(runs)
        runs.append(t)
        return operation(t, earlier)

    return call_with_retry(run, window_s=window_s, database=database, name=name)


def _retry(operation: Callable[[bool], T], first: BaseException, window_s: float, database: Any, name: str) -> T:
    """The tries after the first failure, under tenacity (imported only now: 50 ms)."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random_exponential

    # Half of each wait fixed, half random: 0.05-0.1 s first, doubling to 1-2 s.
    half = FIRST_WAIT_S / 2
    backoff = wait_exponential(multiplier=half, max=MAX_WAIT_S / 2) + wait_random_exponential(
        multiplier=half, max=MAX_WAIT_S / 2
    )

    def wait(state: RetryCallState) -> float:
        # The last wait is cut short so that the last try falls at the end of the window: the
        # window is used whole, and the error that ends it is at most one try late.
        return max(0.0, min(backoff(state), window_s - (state.seconds_since_start or 0.0)))

    pending: list[BaseException] = [first]

    def attempt() -> T:
        # tenacity's first "attempt" replays the failure already seen, so that its wait, its
        # warning and its clock apply to it like to every later one.
        if pending:
            raise pending.pop()
        return operation(True)

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait,
        stop=stop_after_delay(window_s),
        before_sleep=functools.partial(_log_retry, database=database, name=name, window_s=window_s),
        reraise=True,
    )
    return retrying(attempt)


def _log_retry(state: RetryCallState, *, database: Any, name: str, window_s: float) -> None:
    """One warning per retry: what failed, on which database, and when the next try runs."""
    from ..logging import ensure_logging, get_logger

    # A command or script that never set up logging must not get this on stdout (structlog's
    # default): it goes to stderr. Where logging is set up (the worker), it is left as it is.
    ensure_logging()
    exc = state.outcome.exception() if state.outcome is not None else None
    get_logger("ndif_jobs.db").warning(
        "queue database unreachable: retrying",
        operation=name,
        database=display_url(database),
        error=error_line(exc) if exc is not None else "",
        attempt=state.attempt_number,
        retry_in_s=round(state.upcoming_sleep, 2),
        gives_up_in_s=round(max(window_s - (state.seconds_since_start or 0.0), 0.0), 1),
    )


def _gave_up_message(database: Any, name: str, exc: BaseException, window_s: float, elapsed: float) -> str:
    where = f"the queue database {display_url(database)}"
    if window_s <= 0:
        return f"{where} was unreachable ({name}; retrying is off, NDIF_JOBS_DB_RETRY_S=0): {error_line(exc)}"
    return (
        f"{where} was unreachable for {elapsed:.0f} s ({name}; NDIF_JOBS_DB_RETRY_S={window_s:g}): "
        f"{error_line(exc)}"
    )


class _OnDatabase(Protocol):
    """What `retried` needs of the object whose method it wraps."""

    engine: Any
    db_retry_s: float


S = TypeVar("S", bound=_OnDatabase)


def retried(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """Run a one-transaction method through `call_with_retry`, re-running it whole.

    For methods that are safe to run again as they are; one that must know it is a re-run
    calls `call_with_retry` itself."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        return call_with_retry(
            lambda _rerun: method(self, *args, **kwargs), window_s=self.db_retry_s, database=self.engine, name=name
        )

    return wrapper
