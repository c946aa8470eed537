"""spool_segment: exactly-once replay of gateway spool files

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:31:46.680709
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "spool_segment",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spool_segment")),
    )


def downgrade() -> None:
    op.drop_table("spool_segment")
