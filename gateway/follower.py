"""Follow the store's active-round pointer and hot-swap the served pair (Ray-free).

The store is the source of truth for which models serve (DESIGN.md). A background thread
reads the pointer every ``poll_seconds``; when it names another round, the thread loads
both bundles off the request path, checks each one's weights against the sha256 the
store registered for it (and the bundle's own manifest, which ``load_bundle`` checks),
and only then replaces the pair in one reference assignment (:func:`core.pair.load_pair`). A request reads
``follower.pair`` once, so it never sees a mixed pair. A round that fails to load leaves
the old pair serving; the failure is logged and counted, and retried after a back-off.
A replica with nothing to serve yet (a fresh one) whose active round cannot load serves the
newest succeeded round that does, and says so (``fallback``). Any other error in the loop
is logged, counted (``on_loop_error``) and retried with a growing back-off, so the thread
never dies and leaves a replica serving an old round unnoticed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.defenses import with_policy
from core.errors import UserError
from core.pair import ModelPair, load_pair, load_round_pair
from core.quarantine import active_round, list_rounds, pending_count

log = logging.getLogger(__name__)


class RoundFollower:
    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        poll_seconds: float = 1.0,
        trusted_modules: Sequence[str] = (),
        max_overlays: int | None = None,
        retry_failed_after: float = 30.0,
        on_swap: Callable[[ModelPair], None] = lambda pair: None,
        on_failure: Callable[[int | None, str], None] = lambda round_no, error: None,
        on_pending: Callable[[int], None] = lambda n: None,
        on_loop_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._make_sessions = sessions
        self._sessions: sessionmaker[Session] | None = None
        self.poll_seconds = poll_seconds
        self.trusted_modules = tuple(trusted_modules)
        self.max_overlays = max_overlays  # a policy running more per input does not serve
        self.retry_failed_after = retry_failed_after
        self._on_swap, self._on_failure, self._on_pending = on_swap, on_failure, on_pending
        self._on_loop_error = on_loop_error
        self.loop_errors = 0
        self.fallback: str | None = None  # why the served round is not the active one
        self.pair: ModelPair | None = None  # read by the request path; replaced, never mutated
        self._failed: dict[int, float] = {}  # round -> when it last failed to load
        self.failures = 0  # loads refused since start (the swap-failure counter's value)
        self.last_failure: str | None = None
        self._db_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-follower", daemon=True)

    def start(self) -> RoundFollower:
        self.poll_once()  # serve the active round from the first request, if there is one
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _db(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = self._make_sessions()
        return self._sessions

    def poll_once(self) -> bool:
        """Read the pointer; swap if it moved. Returns True when a new pair was installed."""
        try:
            with self._db()() as session:
                info = active_round(session=session)
                self._on_pending(pending_count(session=session))
        except (SQLAlchemyError, OSError, UserError) as exc:
            if self._db_error is None:
                log.warning(
                    "cannot read the active round (%s); serving round %s", exc, self.current_round
                )
            self._db_error = str(exc)
            return False
        if self._db_error is not None:
            log.warning("the store answers again")
            self._db_error = None
        if info is None or info.round == self.current_round:
            return False
        failed_at = self._failed.get(info.round)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_failed_after:
            return False
        try:
            pair = with_policy(
                load_pair(info, trusted_modules=self.trusted_modules),
                max_overlays=self.max_overlays,
            )
        except (UserError, OSError) as exc:
            self._failed[info.round] = time.monotonic()
            self.failures += 1
            self.last_failure = f"round {info.round}: {exc}"
            log.error(
                "round %s failed to load, still serving round %s: %s",
                info.round,
                self.current_round,
                exc,
            )
            self._on_failure(info.round, str(exc))
            if self.pair is None:
                return self._fall_back(info.round)
            return False
        self.fallback = None
        self._install(pair)
        return True

    def _fall_back(self, active: int) -> bool:
        """Serve the newest succeeded round older than ``active`` that loads."""
        with self._db()() as session:
            rounds = list_rounds(session=session)
            older = sorted(
                (r.round for r in rounds if r.status == "succeeded" and r.round < active),
                reverse=True,
            )
            for round_no in older:
                try:
                    pair = with_policy(
                        load_round_pair(session, round_no, trusted_modules=self.trusted_modules),
                        max_overlays=self.max_overlays,
                    )
                except (UserError, OSError) as exc:
                    log.error("fallback round %s does not load either: %s", round_no, exc)
                    continue
                self.fallback = (
                    f"serving round {round_no}: the active round {active} does not load "
                    f"({self.last_failure})"
                )
                log.error("%s", self.fallback)
                self._install(pair)
                return True
        return False

    def _install(self, pair: ModelPair) -> None:
        self.pair = pair  # the swap: one reference assignment
        self._failed.pop(pair.round, None)
        log.warning(
            "now serving round %s, defense %s (%s)",
            pair.round,
            pair.defense.name,
            ", ".join(f"{role} {h[:12]}" for role, h in pair.hashes().items()),
        )
        self._on_swap(pair)

    @property
    def current_round(self) -> int | None:
        pair = self.pair
        return None if pair is None else pair.round

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        wait = self.poll_seconds
        while not self._stop.wait(wait):
            try:
                self.poll_once()
                wait = self.poll_seconds
            except Exception:
                self.loop_errors += 1
                self._on_loop_error()
                wait = min(max(2 * wait, self.poll_seconds), 30.0)
                log.exception("the round follower's poll failed; retrying in %.0f s", wait)
