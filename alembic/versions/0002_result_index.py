"""Index jobs by result key (with its size): `status` sums stored bytes from the index alone.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_result", "jobs", ["result_key", "result_bytes"])


def downgrade() -> None:
    op.drop_index("ix_jobs_result", table_name="jobs")
