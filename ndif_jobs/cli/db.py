"""`ndif-jobs db upgrade`: the queue database's schema."""

from __future__ import annotations

import typer

from .app import settings


def register(app: typer.Typer, only: str | None = None) -> None:
    db_app = typer.Typer(help="The queue database.", no_args_is_help=True)
    db_app.command("upgrade")(db_upgrade)
    app.add_typer(db_app, name="db")


def db_upgrade() -> None:
    """Apply the schema migrations (also done automatically on first open)."""
    from ..db.engine import SCHEMA_HEAD, get_engine, upgrade

    found = settings()
    if found.database_url is None:
        from ..settings import ensure_private_dir

        ensure_private_dir(found.home)
    ran = upgrade(get_engine(found.db_url))
    print(f"schema at {SCHEMA_HEAD}" + (" (migrated)" if ran else " (already current)"))
