"""Sweeps (a `sweeps` table, each job's sweep name and row), a `results` table, and partial
indexes on jobs.

`results` holds each stored result once with its size, filled here from the jobs pointing at
one, so that `status` sums it without reading every job; it replaces `ix_jobs_result`, which
every completion wrote to (`gc` and `verify`, which read the jobs by result, read them all anyway).

Each index of `jobs` holds only the rows its readers look for (queued jobs for the claim, held
ones for the lease checks, those with a result for `status`), so that enqueueing, claiming and
completing a job each touch fewer b-trees. The conditions are written here as `tables.py` and
the queue's statements spell them: SQLite uses a partial index only for a query that repeats them.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

QUEUED = "state = 'queued'"
HELD = "state IN ('claimed', 'submitted', 'running')"
ENDED = "state IN ('cached', 'failed', 'cancelled')"


def _partial(name: str, columns: list[str | sa.TextClause], where: str) -> None:
    op.create_index(name, "jobs", columns, sqlite_where=sa.text(where), postgresql_where=sa.text(where))


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    # Adding nullable columns needs no table copy on either database.
    op.add_column("jobs", sa.Column("sweep", sa.String(200)))
    op.add_column("jobs", sa.Column("sweep_row", sa.Integer))
    _partial("ix_jobs_sweep", ["sweep", "sweep_row"], "sweep IS NOT NULL")
    for name in ("ix_jobs_claim", "ix_jobs_lease", "ix_jobs_result"):
        op.drop_index(name, table_name="jobs")
    _partial("ix_jobs_claim", ["state", sa.text("priority DESC"), "created_at"], QUEUED)
    _partial("ix_jobs_lease", ["state", "lease_expires_at"], HELD)
    _partial("ix_jobs_ended", ["state", "created_at"], ENDED)
    op.create_table(
        "results",
        sa.Column("result_key", sa.String(64), primary_key=True),
        sa.Column("bytes", sa.Integer, nullable=False),
    )
    op.execute(
        "INSERT INTO results (result_key, bytes) SELECT result_key, MAX(result_bytes) FROM jobs"
        " WHERE result_key IS NOT NULL AND result_bytes IS NOT NULL GROUP BY result_key"
    )


def downgrade() -> None:
    op.drop_table("results")
    for name in ("ix_jobs_sweep", "ix_jobs_claim", "ix_jobs_lease", "ix_jobs_ended"):
        op.drop_index(name, table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", ["state", sa.text("priority DESC"), "created_at"])
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_expires_at"])
    op.create_index("ix_jobs_result", "jobs", ["result_key", "result_bytes"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_row")
        batch.drop_column("sweep")
    op.drop_table("sweeps")
