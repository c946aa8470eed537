"""repair_round lease: which watcher runs a round, and its last heartbeat

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE (SQLite has ADD and DROP COLUMN since 3.35): a batch "move and copy"
# would drop repair_round, which model_version's foreign key forbids once rounds exist.
def upgrade() -> None:
    op.add_column("repair_round", sa.Column("owner", sa.String(length=128), nullable=True))
    op.add_column(
        "repair_round", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("repair_round", "heartbeat_at")
    op.drop_column("repair_round", "owner")
