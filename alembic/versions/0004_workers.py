"""Live workers: a `workers` table written by each worker's beat (`ndif-jobs workers`).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("host", sa.String(100), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("backend", sa.String(20)),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_beat", sa.Float, nullable=False),
        sa.Column("bundle_id", sa.String(32)),
        sa.Column("jobs_done", sa.Integer, nullable=False),
        sa.Column("stop_requested", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
