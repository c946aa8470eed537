"""quarantine_sample.client: who sent each suspect input (the per-client share cap)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("quarantine_sample", sa.Column("client", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.drop_column("quarantine_sample", "client")
