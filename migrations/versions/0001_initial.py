"""initial store: quarantine_sample, repair_round, model_version, active_round

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:13:02.759855
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quarantine_sample",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("pixel_sha256", sa.String(length=64), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("badnet_label", sa.Integer(), nullable=False),
        sa.Column("goodnet_label", sa.Integer(), nullable=False),
        sa.Column("badnet_score", sa.Double(), nullable=True),
        sa.Column("goodnet_score", sa.Double(), nullable=True),
        sa.Column("served_round", sa.Integer(), nullable=False),
        sa.Column("detector", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hit_count", sa.Integer(), nullable=False),
        sa.Column("consumed_by_round", sa.Integer(), nullable=True),
        sa.CheckConstraint("channels IN (1, 3)", name=op.f("ck_quarantine_sample_channels")),
        sa.CheckConstraint("hit_count >= 1", name=op.f("ck_quarantine_sample_hit_count")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine_sample")),
    )
    with op.batch_alter_table("quarantine_sample", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_quarantine_sample_consumed_by_round"),
            ["consumed_by_round"],
            unique=False,
        )
        batch_op.create_index(
            "ix_quarantine_sample_pending_sha",
            ["pixel_sha256"],
            unique=True,
            sqlite_where=sa.text("consumed_by_round IS NULL"),
            postgresql_where=sa.text("consumed_by_round IS NULL"),
        )

    op.create_table(
        "repair_round",
        sa.Column("round", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("samples_used", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'rejected', 'failed')",
            name=op.f("ck_repair_round_status"),
        ),
        sa.CheckConstraint("round >= 0", name=op.f("ck_repair_round_round")),
        sa.PrimaryKeyConstraint("round", name=op.f("pk_repair_round")),
    )
    op.create_table(
        "active_round",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_by", sa.String(length=128), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_active_round_single_row")),
        sa.ForeignKeyConstraint(
            ["round"], ["repair_round.round"], name=op.f("fk_active_round_round_repair_round")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_active_round")),
    )
    op.create_table(
        "model_version",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("bundle_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('badnet', 'goodnet')", name=op.f("ck_model_version_role")),
        sa.ForeignKeyConstraint(
            ["round"],
            ["repair_round.round"],
            name=op.f("fk_model_version_round_repair_round"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_version")),
        sa.UniqueConstraint("round", "role", name=op.f("uq_model_version_round_role")),
    )


def downgrade() -> None:
    op.drop_table("model_version")
    op.drop_table("active_round")
    op.drop_table("repair_round")
    with op.batch_alter_table("quarantine_sample", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_quarantine_sample_pending_sha",
            sqlite_where=sa.text("consumed_by_round IS NULL"),
            postgresql_where=sa.text("consumed_by_round IS NULL"),
        )
        batch_op.drop_index(batch_op.f("ix_quarantine_sample_consumed_by_round"))

    op.drop_table("quarantine_sample")
