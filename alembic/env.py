"""Alembic environment for ndif-jobs.

ndif-jobs runs migrations itself (`ndif_jobs.db.engine.upgrade`, on first open or through
`ndif-jobs db upgrade`) and hands alembic a connection that already holds the database's write
lock, so two processes opening a new database at once cannot both migrate it. Run by hand
(`alembic -x url=sqlite:///path upgrade head` from the repo root) it opens its own connection.
"""

from alembic import context
from sqlalchemy import create_engine

from ndif_jobs.db.tables import metadata

config = context.config
target_metadata = metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
