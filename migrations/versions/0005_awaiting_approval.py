"""repair_round.status may be awaiting_approval (BQG_REPAIR_APPROVAL=manual)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "('pending', 'running', 'succeeded', 'rejected', 'failed')"
NEW = "('pending', 'running', 'succeeded', 'rejected', 'failed', 'awaiting_approval')"


def _sqlite_swap(old: str, new: str, old_type: str, new_type: str) -> None:
    """Rewrite the table's CHECK in SQLite's schema, the documented way to change a CHECK
    without a copy (a copy would drop repair_round, whose model_version rows cascade)."""
    bind = op.get_bind()
    bind.exec_driver_sql("PRAGMA writable_schema=ON")
    bind.exec_driver_sql(
        "UPDATE sqlite_master SET sql = replace(replace(sql, ?, ?), ?, ?) "
        "WHERE type = 'table' AND name = 'repair_round'",
        (f"status VARCHAR({old_type})", f"status VARCHAR({new_type})", old, new),
    )
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar()
    bind.exec_driver_sql(f"PRAGMA schema_version={int(version) + 1}")  # type: ignore[arg-type]
    bind.exec_driver_sql("PRAGMA writable_schema=OFF")


def _postgres_swap(statuses: str, width: int) -> None:
    op.execute("ALTER TABLE repair_round DROP CONSTRAINT ck_repair_round_status")
    op.execute(f"ALTER TABLE repair_round ALTER COLUMN status TYPE VARCHAR({width})")
    op.execute(
        f"ALTER TABLE repair_round ADD CONSTRAINT ck_repair_round_status CHECK (status IN {statuses})"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_swap(OLD, NEW, "16", "32")
    else:
        _postgres_swap(NEW, 32)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_swap(NEW, OLD, "32", "16")
    else:
        _postgres_swap(OLD, 16)
