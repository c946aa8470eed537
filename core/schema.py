"""The SQL tables (SQLAlchemy 2): the quarantine, model versions, repair rounds, the active pointer.

These rows are the contract between processes (STYLE.md): gateway replicas write
``quarantine_sample``; the repair watcher reads and consumes it and writes
``repair_round`` and ``model_version``; replicas poll ``active_round`` and hot-swap.
Migrations in ``migrations/`` must match these classes (a test runs ``alembic check``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("badnet", "goodnet")
ROUND_STATUSES = ("pending", "running", "succeeded", "rejected", "failed", "awaiting_approval")
# A BIGINT primary key that is still SQLite's auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer, "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}  # noqa: RUF012


class QuarantineSample(Base):
    """One suspect input. The same pixels, while pending, are one row with a hit count."""

    __tablename__ = "quarantine_sample"
    __table_args__ = (
        # Deduplication: one *pending* row per image. Consumed rows may repeat an image.
        Index(
            "ix_quarantine_sample_pending_sha",
            "pixel_sha256",
            unique=True,
            sqlite_where=text("consumed_by_round IS NULL"),
            postgresql_where=text("consumed_by_round IS NULL"),
        ),
        CheckConstraint("channels IN (1, 3)", name="channels"),
        CheckConstraint("hit_count >= 1", name="hit_count"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    pixel_sha256: Mapped[str] = mapped_column(String(64))
    png: Mapped[bytes] = mapped_column(LargeBinary)
    height: Mapped[int]
    width: Mapped[int]
    channels: Mapped[int]
    badnet_label: Mapped[int]
    goodnet_label: Mapped[int | None]  # None: a single-model round (0006)
    badnet_score: Mapped[float | None]
    goodnet_score: Mapped[float | None]
    strip_entropy: Mapped[float | None]  # STRIP's mean entropy, when measured (0006)
    served_round: Mapped[int]
    detector: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    hit_count: Mapped[int] = mapped_column(default=1)
    consumed_by_round: Mapped[int | None] = mapped_column(index=True)
    # who sent it: the trusted client header, else the peer address (None: before 0004)
    client: Mapped[str | None] = mapped_column(String(128))


class RepairRound(Base):
    """One round of models: 0 is the pre-deployment pair, K >= 1 a post-deployment repair."""

    __tablename__ = "repair_round"
    __table_args__ = (
        CheckConstraint(f"status IN {ROUND_STATUSES}", name="status"),
        CheckConstraint("round >= 0", name="round"),
    )

    round: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(32), default="pending")
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    samples_used: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(128))  # the watcher or command running it
    heartbeat_at: Mapped[datetime | None]  # refreshed while it runs; a stale one is dead


class ModelVersion(Base):
    """A bundle registered as the badnet or goodnet of a round."""

    __tablename__ = "model_version"
    __table_args__ = (
        UniqueConstraint("round", "role"),
        CheckConstraint(f"role IN {ROLES}", name="role"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    round: Mapped[int] = mapped_column(ForeignKey("repair_round.round", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    bundle_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class ActiveRound(Base):
    """The pointer to the round that serves: at most one row (id = 1), flipped by one UPDATE."""

    __tablename__ = "active_round"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False, default=1)
    round: Mapped[int] = mapped_column(ForeignKey("repair_round.round"))
    activated_at: Mapped[datetime]
    activated_by: Mapped[str] = mapped_column(String(128))


class SpoolSegment(Base):
    """A gateway spool file that was replayed into the quarantine.

    Recorded in the same transaction as the replayed samples, so a replica that crashes
    between the commit and deleting the file skips it next time: replay is exactly once.
    """

    __tablename__ = "spool_segment"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    samples: Mapped[int]
    replayed_at: Mapped[datetime]
