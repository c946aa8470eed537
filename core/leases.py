"""Round numbers and leases: who may run the next repair round, and for how long.

A running round's heartbeat is its lease: a round whose heartbeat is older than the lease
counts as dead, and the next claimer fails it. Every time here comes from the database
server's clock, since runners on different hosts have different clocks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import db_now, transaction
from core.quarantine import open_round
from core.schema import RepairRound


def retry_at(*, session: Session, base_seconds: float, max_factor: int = 64) -> datetime | None:
    """When the next automatic round may start: after k rounds in a row that were rejected
    or failed, ``base_seconds * 2**(k-1)`` (at most ``max_factor`` times) after the last one
    ended; None after a success or before any round. Read from the store, so the back-off
    holds across watchers and restarts, and a flood that keeps failing the gate buys ever
    rarer rounds."""
    rows = session.scalars(
        select(RepairRound)
        .where(RepairRound.round > 0)
        .order_by(RepairRound.round.desc())
        .limit(max_factor.bit_length() + 1)
    )
    misses, last = 0, None
    for row in rows:
        if row.status not in ("rejected", "failed"):
            break
        last = last or row.finished_at or row.heartbeat_at or row.started_at
        misses += 1
    if misses == 0 or last is None:
        return None
    return last + timedelta(seconds=base_seconds * min(2 ** (misses - 1), max_factor))


def next_round_number(*, session: Session) -> int:
    """One more than the highest round ever opened (0 when there is none)."""
    highest = session.scalar(select(func.max(RepairRound.round)))
    return 0 if highest is None else int(highest) + 1


def running_rounds(*, session: Session) -> list[RepairRound]:
    return list(
        session.scalars(
            select(RepairRound).where(RepairRound.status == "running").with_for_update()
        )
    )


def expire_stale_rounds(
    *, session: Session, lease: timedelta, now: datetime | None = None
) -> list[int]:
    """Fail running rounds whose heartbeat is older than ``lease`` (their runner died)."""
    now = now or db_now(session)
    expired = []
    for row in running_rounds(session=session):
        beat = row.heartbeat_at or row.started_at or now
        if now - beat > lease:
            row.status, row.finished_at = "failed", now
            row.error = (
                f"lease expired: {row.owner or 'its runner'} last reported at {beat.isoformat()}"
            )
            expired.append(row.round)
    session.flush()
    return expired


# Any fixed 64-bit number: PostgreSQL's advisory lock that claimers of a round queue for.
CLAIM_LOCK = 0x6271_6700_C1A1  # "bqg" claim


def claim_round(
    *, session: Session, owner: str, lease: timedelta, round_no: int | None = None
) -> int | None:
    """Open the next round (or ``round_no``) for ``owner``, unless another one is running.

    The database is the lock: a running round with a fresh heartbeat means someone else
    holds the lease (None is returned). Claimers queue for the check-and-open: SQLite's
    ``BEGIN IMMEDIATE`` serialises writers, and on PostgreSQL a transaction-scoped advisory
    lock does, since under READ COMMITTED each statement sees a fresh snapshot and two
    claimers would otherwise both find nothing running and open two rounds (a race that
    ``test_racing_claimers_get_one_round_and_the_others_a_clean_no`` showed). Stale running
    rounds are failed first.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK)))
    expire_stale_rounds(session=session, lease=lease)
    if running_rounds(session=session):
        return None
    number = next_round_number(session=session) if round_no is None else round_no
    open_round(session=session, round_no=number, owner=owner)
    return number


def try_claim_round(
    sessions: sessionmaker[Session],
    *,
    owner: str,
    lease: timedelta,
    round_no: int | None = None,
) -> int | None:
    """``claim_round`` in a transaction of its own, committed before it returns."""
    with transaction(sessions) as session:
        return claim_round(session=session, owner=owner, lease=lease, round_no=round_no)


def heartbeat(*, session: Session, round_no: int, owner: str) -> bool:
    """Refresh a running round's lease; False if it is no longer this owner's running round."""
    stmt = (
        update(RepairRound)
        .where(
            RepairRound.round == round_no,
            RepairRound.status == "running",
            RepairRound.owner == owner[:128],
        )
        .values(heartbeat_at=db_now(session))
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
