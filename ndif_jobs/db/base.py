"""What every set of queue operations stands on: one database, its SQL dialect, a retry window.

`Queue`, `RemoteBundles`, `Sweeps`, `Workers` and the web pages' `Reads` each run their own
statements on the queue's database. Each is an `OnDatabase`: its driver connections (`db`), what
it was opened on (`engine`: a `Database` from `open_database`, or a SQLAlchemy Engine), its
statements put into the database's dialect (`_sql`), and how long each operation rides out an
unreachable database (`db_retry_s`, which `retry.retried` reads off the object along with `engine`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .engine import Database
from .retry import DEFAULT_RETRY_S

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .queue import Runnable

#: Most values bound in one `IN (...)` on SQLite (its limit is 32766; smaller lists plan faster).
_CHUNK = 500


class Dialect:
    """The statements for one dialect: placeholders, and the few spellings that differ."""

    def __init__(self, dialect: str) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise StoreError(f"ndif-jobs keeps its queue in SQLite or PostgreSQL, not {dialect}")
        self.pg = dialect == "postgresql"
        self._cache: dict[str, str] = {}
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if self.pg else ""
        self.max = "GREATEST" if self.pg else "MAX"
        self.chunk = 5000 if self.pg else _CHUNK

    def __call__(self, sql: str, **parts: str) -> str:
        """`sql` with its `{parts}` filled in and its placeholders in the driver's style."""
        key = sql if not parts else sql + repr(sorted(parts.items()))
        out = self._cache.get(key)
        if out is None:
            out = sql.format(**parts) if parts else sql
            if self.pg:
                out = out.replace("?", "%s")
            self._cache[key] = out
        return out

    def runnable(self, r: Runnable) -> tuple[str, list[Any]]:
        """The condition that selects the jobs `r` covers ("" for every job), and what it binds."""
        parts: list[str] = []
        params: list[Any] = []
        if r.backend == "local" and r.standins:
            in_sql, values = self.in_(r.standins)
            parts.append(f"(backend = 'local' OR (backend = 'ndif' AND model {in_sql}))")
            params += values
        elif r.backend is not None:
            parts.append("backend = ?")
            params.append(r.backend)
        if r.experiments is not None:
            in_sql, values = self.in_(r.experiments)
            parts.append(f"experiment {in_sql}")
            params += values
        return " AND ".join(parts), params

    def in_(self, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """`IN (?, ...)` (SQLite) or `= ANY(?)` (PostgreSQL), and what it binds."""
        if self.pg:
            return "= ANY(?)", [list(values)]
        return f"IN ({', '.join('?' * len(values))})", list(values)

    def chunks(self, values: Sequence[Any]) -> Iterable[Sequence[Any]]:
        for start in range(0, len(values), self.chunk):
            yield values[start : start + self.chunk]


class OnDatabase:
    """One database's connections, dialect and retry window, as every set of operations needs them."""

    def __init__(
        self, engine: Database | Engine, db_retry_s: float = DEFAULT_RETRY_S, dialect: Dialect | None = None
    ) -> None:
        #: What the operations were opened on: a `Database` from `open_database`, or an Engine.
        self.engine = engine
        #: How long each operation retries while the database is unreachable (0: not at all).
        self.db_retry_s = db_retry_s
        self.db = engine if isinstance(engine, Database) else Database.wrap(engine)
        self.is_postgres = self.db.dialect_name == "postgresql"
        #: The statements in this database's dialect (shared, with its cache, when given).
        self._sql = dialect or Dialect(self.db.dialect_name)

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one read (`sql` already in the dialect's form)."""
        with self.db.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
