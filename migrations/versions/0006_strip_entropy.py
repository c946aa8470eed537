"""quarantine_sample.strip_entropy, and goodnet_label may be NULL (single-model rounds)

STRIP records each quarantined input's mean entropy, so a repairer may drop the rows
whose entropy is above sigma; a single-model round (CoDefend) has no goodnet label.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_NULL = "goodnet_label INTEGER NOT NULL"
NULLABLE = "goodnet_label INTEGER"


def _sqlite_swap(old: str, new: str) -> None:
    """Rewrite the column's definition in SQLite's schema, as 0005 does for a CHECK: the
    documented way to relax a constraint without copying the table."""
    bind = op.get_bind()
    bind.exec_driver_sql("PRAGMA writable_schema=ON")
    bind.exec_driver_sql(
        "UPDATE sqlite_master SET sql = replace(sql, ?, ?) "
        "WHERE type = 'table' AND name = 'quarantine_sample'",
        (old, new),
    )
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar()
    bind.exec_driver_sql(f"PRAGMA schema_version={int(version) + 1}")  # type: ignore[arg-type]
    bind.exec_driver_sql("PRAGMA writable_schema=OFF")


def upgrade() -> None:
    op.add_column("quarantine_sample", sa.Column("strip_entropy", sa.Double(), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_swap(NOT_NULL, NULLABLE)
    else:
        op.alter_column("quarantine_sample", "goodnet_label", nullable=True)


def downgrade() -> None:
    # A single-model round's rows get the badnet's label, the only opinion they had.
    op.execute(
        "UPDATE quarantine_sample SET goodnet_label = badnet_label WHERE goodnet_label IS NULL"
    )
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_swap(NULLABLE, NOT_NULL)
    else:
        op.alter_column("quarantine_sample", "goodnet_label", nullable=False)
    op.drop_column("quarantine_sample", "strip_entropy")
