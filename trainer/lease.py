"""Hold a claimed round's lease while its work runs: a heartbeat from a thread of its own.

A running round whose heartbeat is older than the lease counts as dead, and the next
claimer fails it and starts its own (``core.leases.claim_round``). So every path that
runs a round (the watcher's Ray task, its in-process fallback, ``trainer retrain``)
beats from a thread, independent of how long a training step takes; and when a beat finds
the round no longer this owner's (failed by another claimer, or by an operator), the work
is cancelled rather than left to publish over a round that is no longer its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.leases import heartbeat

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The round is no longer this runner's: another claimer or an operator ended it."""


class LeaseKeeper:
    """Beats every ``lease_seconds / 3`` until closed; ``lost`` is set (and ``on_lost``
    called, once) when a beat finds the round gone. A database error skips one beat."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        round_no: int,
        owner: str,
        lease_seconds: float,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions, self.round_no, self.owner = sessions, round_no, owner
        self.period = max(lease_seconds / 3, 0.2)
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{round_no}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone: call it between steps of work."""
        if self.lost.is_set():
            raise LeaseLost(f"round {self.round_no} is no longer {self.owner}'s; work stopped")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                with transaction(self.sessions) as session:
                    held = heartbeat(session=session, round_no=self.round_no, owner=self.owner)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("round %d: heartbeat failed (%s); retrying", self.round_no, exc)
                continue
            if not held:
                log.error("round %d: the lease is lost; cancelling the work", self.round_no)
                self.lost.set()
                self.on_lost()
                return
            self.beats += 1
