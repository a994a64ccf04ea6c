"""The first schema: jobs, bundles and attempts.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("model_key", sa.String(1000), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("worker", sa.String(100)),
        sa.Column("remote_job_id", sa.String(100)),
        sa.Column("status_history", sa.Text, nullable=False),
        sa.Column("job_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("submitted_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("deadline", sa.Float),
        sa.Column("payload_bytes", sa.Integer),
        sa.Column("result_bytes", sa.Integer),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("experiment", sa.String(200), nullable=False),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("model_key", sa.String(1000), nullable=False),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(100)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("bundle_id", sa.String(32), sa.ForeignKey("bundles.id")),
        sa.Column("result_key", sa.String(64)),
        sa.Column("result_bytes", sa.Integer),
        sa.Column("estimated_bytes", sa.Integer),
    )
    op.create_index("ix_jobs_key", "jobs", ["key"])
    op.create_index("ix_jobs_claim", "jobs", ["state", sa.text("priority DESC"), "created_at"])
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_expires_at"])
    op.create_index("ix_jobs_created", "jobs", ["created_at"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("bundle_id", sa.String(32), sa.ForeignKey("bundles.id")),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(100)),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("outcome", sa.String(20)),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_attempts_job_id", "attempts", ["job_id"])


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("jobs")
    op.drop_table("bundles")
