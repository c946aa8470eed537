"""Repository functions for the quarantine store: keyword-only, typed, one transaction each
at the caller's choice (pass a session inside :func:`core.db.transaction`).

Deduplication: the same pixels, while pending, are one row whose ``hit_count`` grows; an
``INSERT ... ON CONFLICT`` on the partial unique index over pending rows makes that safe
under concurrent writers on SQLite and PostgreSQL alike. Pending counts count rows, that
is distinct images, so one replayed image can never trigger a round by itself.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db import db_now
from core.errors import UserError
from core.images import encode_png
from core.schema import (
    ActiveRound,
    ModelVersion,
    QuarantineSample,
    RepairRound,
    SpoolSegment,
    utcnow,
)

Role = Literal["badnet", "goodnet"]
FinalStatus = Literal["succeeded", "rejected", "awaiting_approval"]


class StoreInputError(UserError):
    """A repository call was given something it must not write; nothing was written."""


def pixel_sha256(image: NDArray[np.uint8]) -> str:
    """sha256 over the shape and the raw pixels: equal images, equal digests."""
    digest = hashlib.sha256(f"{image.shape}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class NewSample:
    """A suspect input as the gateway hands it to the store."""

    png: bytes
    height: int
    width: int
    channels: int
    pixel_sha256: str
    badnet_label: int
    goodnet_label: int | None  # None: a single-model round has no second opinion
    served_round: int
    detector: str
    badnet_score: float | None = None
    goodnet_score: float | None = None
    strip_entropy: float | None = None  # STRIP's mean entropy, where the policy measured it
    received_at: datetime = field(default_factory=utcnow)
    hits: int = 1
    client: str | None = None  # the sender: the trusted client header, else the peer

    @classmethod
    def from_image(cls, image: NDArray[np.uint8], **fields: Any) -> NewSample:
        h, w, c = image.shape
        return cls(
            png=encode_png(image),
            height=h,
            width=w,
            channels=c,
            pixel_sha256=pixel_sha256(image),
            **fields,
        )


CLIENT_CHARS = 128  # the stored client identity's length


def _check(sample: NewSample) -> None:
    try:
        with Image.open(io.BytesIO(sample.png), formats=["PNG"]) as img:
            width, height, mode = img.width, img.height, img.mode
    except (OSError, ValueError) as exc:
        raise StoreInputError(
            f"sample {sample.pixel_sha256[:12]}: png is not a PNG ({exc})"
        ) from None
    channels = {"L": 1, "RGB": 3}.get(mode)
    if (height, width, channels) != (sample.height, sample.width, sample.channels):
        raise StoreInputError(
            f"sample {sample.pixel_sha256[:12]}: its PNG is {height}x{width} mode {mode}, "
            f"but its stored shape says {sample.height}x{sample.width}x{sample.channels}"
        )
    if len(sample.pixel_sha256) != 64 or sample.hits < 1:
        raise StoreInputError(f"sample {sample.pixel_sha256[:12]}: bad digest or hit count")


def _merge_duplicates(samples: Sequence[NewSample]) -> list[dict[str, Any]]:
    """One row per digest: a single INSERT may not touch the same conflict row twice."""
    rows: dict[str, dict[str, Any]] = {}
    for s in samples:
        row = rows.get(s.pixel_sha256)
        if row is None:
            rows[s.pixel_sha256] = {
                "pixel_sha256": s.pixel_sha256,
                "png": s.png,
                "height": s.height,
                "width": s.width,
                "channels": s.channels,
                "badnet_label": s.badnet_label,
                "goodnet_label": s.goodnet_label,
                "badnet_score": s.badnet_score,
                "goodnet_score": s.goodnet_score,
                "strip_entropy": s.strip_entropy,
                "served_round": s.served_round,
                "detector": s.detector,
                "received_at": s.received_at,
                "last_seen_at": s.received_at,
                "hit_count": s.hits,
                "client": None if s.client is None else s.client[:CLIENT_CHARS],
            }
        else:
            row["hit_count"] += s.hits
            row["last_seen_at"] = max(row["last_seen_at"], s.received_at)
    return list(rows.values())


def _upsert(session: Session, model: type[Any]) -> Any:
    """The dialect's INSERT, which supports ON CONFLICT (both SQLite and PostgreSQL do)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def add_samples(*, session: Session, samples: Sequence[NewSample]) -> int:
    """Insert a batch; a pending duplicate gains hits instead of a row. Returns rows touched.

    The whole batch is checked before anything is written, so a bad sample writes nothing.
    """
    for sample in samples:
        _check(sample)
    rows = _merge_duplicates(samples)
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = _upsert(session, QuarantineSample)
    table = QuarantineSample.__table__
    stmt = insert.on_conflict_do_update(
        index_elements=[table.c.pixel_sha256],
        index_where=table.c.consumed_by_round.is_(None),
        set_={
            "hit_count": table.c.hit_count + insert.excluded.hit_count,
            "last_seen_at": func.max(table.c.last_seen_at, insert.excluded.last_seen_at)
            if dialect == "sqlite"
            else func.greatest(table.c.last_seen_at, insert.excluded.last_seen_at),
        },
    )
    session.execute(stmt, rows)
    return len(rows)


def replay_segment(*, session: Session, segment_id: str, samples: Sequence[NewSample]) -> bool:
    """Add a spooled segment's samples unless that segment was replayed before.

    Returns False (and adds nothing) for a segment already recorded: exactly-once replay.
    """
    if session.get(SpoolSegment, segment_id) is not None:
        return False
    add_samples(session=session, samples=samples)
    session.add(SpoolSegment(id=segment_id, samples=len(samples), replayed_at=utcnow()))
    session.flush()
    return True


def pending_count(*, session: Session) -> int:
    """Distinct pending images."""
    stmt = (
        select(func.count())
        .select_from(QuarantineSample)
        .where(QuarantineSample.consumed_by_round.is_(None))
    )
    return int(session.scalar(stmt) or 0)


def pending_by_client(*, session: Session) -> dict[str | None, int]:
    """Distinct pending images per client (None: samples stored before clients were)."""
    stmt = (
        select(QuarantineSample.client, func.count())
        .where(QuarantineSample.consumed_by_round.is_(None))
        .group_by(QuarantineSample.client)
    )
    return {client: int(n) for client, n in session.execute(stmt)}


def client_quota(counts: dict[str | None, int], share: float) -> int:
    """The most samples one client may give a round in which no client gives more than
    ``share`` of the whole: the largest m with m <= share * sum(min(c, m)).

    The cap keeps any one sender from deciding what the repair learns (issue 31's
    poisoning threat): with share 1 it is off; a lone client gets 0 below 1.
    """
    if share >= 1:
        return max(counts.values(), default=0)
    low, high = 0, max(counts.values(), default=0)
    while low < high:  # the condition holds for m = 0 and, once false, stays false
        m = (low + high + 1) // 2
        if m <= share * sum(min(c, m) for c in counts.values()):
            low = m
        else:
            high = m - 1
    return low


def eligible_count(counts: dict[str | None, int], share: float) -> int:
    """Pending samples a round may use under the per-client ``share`` cap."""
    quota = client_quota(counts, share)
    return sum(min(c, quota) for c in counts.values())


def pending_samples(*, session: Session, limit: int | None = None) -> list[QuarantineSample]:
    """Pending samples, oldest first."""
    stmt = (
        select(QuarantineSample)
        .where(QuarantineSample.consumed_by_round.is_(None))
        .order_by(QuarantineSample.received_at, QuarantineSample.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def mark_consumed(*, session: Session, sample_ids: Sequence[int], round_no: int) -> int:
    """Mark these pending samples as used by ``round_no``; returns how many were still pending."""
    if not sample_ids:
        return 0
    stmt = (
        update(QuarantineSample)
        .where(QuarantineSample.id.in_(sample_ids), QuarantineSample.consumed_by_round.is_(None))
        .values(consumed_by_round=round_no)
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def take_pending(
    *, session: Session, round_no: int, limit: int | None = None
) -> list[QuarantineSample]:
    """The pending samples for ``round_no``, marked consumed in the caller's transaction."""
    samples = pending_samples(session=session, limit=limit)
    mark_consumed(session=session, sample_ids=[s.id for s in samples], round_no=round_no)
    for s in samples:
        s.consumed_by_round = round_no
    return samples


def decode_sample(sample: QuarantineSample) -> NDArray[np.uint8]:
    """A stored sample's pixels as uint8 (H, W, C)."""
    with Image.open(io.BytesIO(sample.png), formats=["PNG"]) as img:
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(sample.height, sample.width, sample.channels)


def prune_consumed(*, session: Session, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete consumed samples last seen before ``now - older_than``; pending ones stay."""
    cutoff = (now or utcnow()) - older_than
    stmt = delete(QuarantineSample).where(
        QuarantineSample.consumed_by_round.is_not(None), QuarantineSample.last_seen_at < cutoff
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ rounds


def open_round(*, session: Session, round_no: int, owner: str | None = None) -> RepairRound:
    """Create round ``round_no`` as running; refuses a round that exists."""
    if round_no < 0:
        raise StoreInputError(f"round {round_no} must be 0 or more")
    existing = session.get(RepairRound, round_no)
    if existing is not None:
        raise StoreInputError(f"round {round_no} already exists (status {existing.status})")
    now = db_now(session)
    row = RepairRound(
        round=round_no,
        status="running",
        started_at=now,
        samples_used=0,
        metrics={},
        owner=owner[:128] if owner else None,
        heartbeat_at=now,
    )
    session.add(row)
    session.flush()
    return row


def _running(session: Session, round_no: int) -> RepairRound:
    row = session.get(RepairRound, round_no)
    if row is None:
        raise StoreInputError(f"round {round_no} does not exist")
    if row.status != "running":
        raise StoreInputError(f"round {round_no} is {row.status}, not running")
    return row


def finish_round(
    *,
    session: Session,
    round_no: int,
    status: FinalStatus,
    samples_used: int,
    metrics: dict[str, Any],
) -> RepairRound:
    """Close a running round as succeeded (may be activated), rejected by its gate, or
    awaiting an operator's approval (``BQG_REPAIR_APPROVAL=manual``)."""
    if status not in ("succeeded", "rejected", "awaiting_approval"):
        raise StoreInputError(
            f"a round finishes as succeeded, rejected or awaiting_approval, not {status!r}"
        )
    row = _running(session, round_no)
    row.status, row.finished_at, row.samples_used, row.metrics = (
        status,
        utcnow(),
        samples_used,
        metrics,
    )
    session.flush()
    return row


def decide_approval(*, session: Session, round_no: int, approve: bool, by: str) -> RepairRound:
    """An operator's verdict on a round awaiting approval: approved, it is succeeded and
    active; declined, it is rejected (its samples stay set aside)."""
    row = session.get(RepairRound, round_no)
    if row is None or row.status != "awaiting_approval":
        state = "does not exist" if row is None else f"is {row.status}"
        raise StoreInputError(
            f"round {round_no} {state}; only a round awaiting approval can be decided"
        )
    if approve:
        row.status = "succeeded"
        session.flush()
        activate_round(session=session, round_no=round_no, activated_by=by)
    else:
        row.status, row.error = "rejected", f"declined by {by}"[:4000]
        session.flush()
    return row


def awaiting_rounds(*, session: Session) -> list[int]:
    """Rounds that passed their gate and wait for an operator (oldest first)."""
    stmt = select(RepairRound.round).where(RepairRound.status == "awaiting_approval")
    return sorted(session.scalars(stmt))


def fail_round(*, session: Session, round_no: int, error: str) -> RepairRound:
    """Close a running round as failed, keeping the error text."""
    row = _running(session, round_no)
    row.status, row.finished_at, row.error = "failed", utcnow(), error
    session.flush()
    return row


def register_model(
    *,
    session: Session,
    round_no: int,
    role: Role,
    bundle_path: str,
    sha256: str,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record a bundle as the ``role`` model of ``round_no`` (the round must exist)."""
    if role not in ("badnet", "goodnet"):
        raise StoreInputError(f"role must be badnet or goodnet, not {role!r}")
    if session.get(RepairRound, round_no) is None:
        raise StoreInputError(f"round {round_no} does not exist; open it first")
    row = ModelVersion(
        round=round_no,
        role=role,
        bundle_path=bundle_path,
        sha256=sha256,
        metrics=metrics or {},
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class ActiveInfo:
    round: int
    activated_at: datetime
    activated_by: str
    models: dict[str, ModelVersion]


def activate_round(*, session: Session, round_no: int, activated_by: str = "operator") -> None:
    """Point the active-round row at ``round_no``: one upsert, so never zero or two active.

    Only a succeeded round with its badnet registered (and its goodnet, unless it is a
    single-model round) can be activated.
    """
    row = session.get(RepairRound, round_no)
    if row is None:
        raise StoreInputError(f"round {round_no} does not exist")
    if row.status != "succeeded":
        raise StoreInputError(
            f"round {round_no} is {row.status}; only a succeeded round can be activated"
        )
    roles = set(session.scalars(select(ModelVersion.role).where(ModelVersion.round == round_no)))
    if "badnet" not in roles:  # a single-model round registers only the badnet
        raise StoreInputError(f"round {round_no} lacks a registered badnet")
    insert = _upsert(session, ActiveRound)
    values = {
        "id": 1,
        "round": round_no,
        "activated_at": utcnow(),
        "activated_by": activated_by[:128],
    }
    session.execute(
        insert.values(**values).on_conflict_do_update(
            index_elements=[ActiveRound.id], set_={k: v for k, v in values.items() if k != "id"}
        )
    )


def active_round(*, session: Session) -> ActiveInfo | None:
    """The serving round and its models, or None before round 0 is activated."""
    row = session.get(ActiveRound, 1, populate_existing=True)
    if row is None:
        return None
    models = {
        m.role: m
        for m in session.scalars(select(ModelVersion).where(ModelVersion.round == row.round))
    }
    return ActiveInfo(row.round, row.activated_at, row.activated_by, models)


def active_round_number(*, session: Session) -> int | None:
    """Just the active round's number: the cheap query replicas poll."""
    return session.scalar(select(ActiveRound.round).where(ActiveRound.id == 1))


def list_rounds(*, session: Session) -> list[RepairRound]:
    return list(session.scalars(select(RepairRound).order_by(RepairRound.round)))


def round_models(*, session: Session, round_no: int) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.round == round_no).order_by(ModelVersion.role)
        )
    )
