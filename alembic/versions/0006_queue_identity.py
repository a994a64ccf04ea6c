"""The queue's own identity: one row with a random id, made with the table.

A result store can be shared by more than one queue (two machines' SQLite files on one bucket,
or a SQLite queue and a PostgreSQL one on one data folder). Each queue names itself in the store
by this id (`StoreBackend.record_queue`), and `gc` refuses to remove results while the store
names another queue than its own: it cannot see which of them that queue's jobs point at.

Revision ID: 0006
Revises: 0005
"""

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    identity = op.create_table(
        "queue_identity",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.bulk_insert(identity, [{"id": uuid.uuid4().hex, "created_at": time.time()}])


def downgrade() -> None:
    op.drop_table("queue_identity")
