"""`results` as a WITHOUT ROWID table on SQLite: one b-tree per result instead of two.

Every completion writes its result's row (`Outcomes.complete`). As a rowid table with a text
primary key, that row lives in the table and in the key's own index, two pages to write at each
commit; keyed by `result_key` itself it lives in one. PostgreSQL keeps its tables apart from
their indexes whatever the definition says: there nothing changes.

SQLite cannot change a table's kind in place, so the table is made again and its rows copied
(one row per stored result: a few thousand at most).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _remake_results(with_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_table(
        "_results_new",
        sa.Column("result_key", sa.String(64), primary_key=True),
        sa.Column("bytes", sa.Integer, nullable=False),
        sqlite_with_rowid=with_rowid,
    )
    op.execute("INSERT INTO _results_new (result_key, bytes) SELECT result_key, bytes FROM results")
    op.drop_table("results")
    op.rename_table("_results_new", "results")


def upgrade() -> None:
    _remake_results(with_rowid=False)


def downgrade() -> None:
    _remake_results(with_rowid=True)
