"""A round's lease, held by a heartbeat thread, and its loss (issue 31)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.db import db_now, open_store, session_factory, transaction
from core.quarantine import fail_round, open_round
from core.schema import RepairRound
from trainer.lease import LeaseKeeper, LeaseLost


def test_the_keeper_beats_and_a_lost_lease_stops_the_work(tmp_path: Path) -> None:
    sessions = session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}"))
    with transaction(sessions) as s:
        open_round(session=s, round_no=1, owner="runner-a")
    lost: list[int] = []
    with LeaseKeeper(
        sessions, round_no=1, owner="runner-a", lease_seconds=0.9, on_lost=lambda: lost.append(1)
    ) as keeper:
        time.sleep(1.0)
        assert keeper.beats >= 2 and not keeper.lost.is_set()
        keeper.check()  # held: no error
        with sessions() as s:
            beat = s.get(RepairRound, 1).heartbeat_at  # type: ignore[union-attr]
            assert beat is not None and abs((db_now(s) - beat).total_seconds()) < 1.0
        with transaction(sessions) as s:  # an operator (or a claimer) ends the round
            fail_round(session=s, round_no=1, error="ended by an operator")
        deadline = time.monotonic() + 5
        while not keeper.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [1]
        with pytest.raises(LeaseLost, match="round 1 is no longer runner-a's"):
            keeper.check()
