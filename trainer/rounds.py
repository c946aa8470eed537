"""Round artifacts on disk and their rows in the store, kept consistent.

A round's files live in ``<store>/rounds/<K>/`` (``badnet/``, ``goodnet/``, reports). They
are written to a temporary sibling and renamed into place before the round's rows are
registered, so a registered bundle path always exists; if registering fails, the files
are removed again and nothing points at them. Files the store registers are never removed
or overwritten here: when a commit's outcome is unknown (the connection broke as it
committed), the store is asked, and if it cannot answer, the files stay.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import read_manifest
from core.db import transaction
from core.pair import ROLES, RoundDefense, write_round_manifest
from core.quarantine import (
    FinalStatus,
    StoreInputError,
    activate_round,
    fail_round,
    finish_round,
    open_round,
    register_model,
    round_models,
)
from core.schema import RepairRound

log = logging.getLogger(__name__)


def round_dir(store: Path, round_no: int) -> Path:
    return Path(store) / "rounds" / str(round_no)


@contextmanager
def running_round(
    sessions: sessionmaker[Session],
    round_no: int,
    *,
    owner: str | None = None,
    opened: bool = False,
) -> Iterator[None]:
    """Open ``round_no`` as running (unless the caller ``opened`` it already, as the watcher
    does when it claims a round); if the body raises, mark it failed (and re-raise)."""
    if not opened:
        with transaction(sessions) as session:
            open_round(session=session, round_no=round_no, owner=owner)
    try:
        yield
    except BaseException as exc:
        mark_failed(sessions, round_no, f"{type(exc).__name__}: {exc}")
        raise


def mark_failed(sessions: sessionmaker[Session], round_no: int, error: str) -> bool:
    """Fail ``round_no`` if it is still running; False if it had already finished."""
    with transaction(sessions) as session:
        row = session.get(RepairRound, round_no)
        if row is None or row.status != "running":
            return False
        fail_round(session=session, round_no=round_no, error=error[:4000])
    return True


def publish_round(
    *,
    sessions: sessionmaker[Session],
    store: Path,
    round_no: int,
    write: Callable[[Path], None],
    metrics: dict[str, Any],
    samples_used: int = 0,
    activate: bool = True,
    activated_by: str = "trainer",
    after_register: Callable[[Session], None] = lambda s: None,
    defense: RoundDefense | None = None,
    status: FinalStatus = "succeeded",
) -> Path:
    """Write the round's files (``write`` fills a directory with a badnet/ bundle, a goodnet/
    one unless the round has a single model, and any reports; the round's manifest names ``defense``, NNoculation by default), then
    register the bundles, finish the round as ``status`` (succeeded, or awaiting_approval)
    and, if asked, activate it, all in one transaction. Returns the round directory."""
    final = round_dir(store, round_no)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{round_no}.", dir=final.parent))
    try:
        write(tmp)
        write_round_manifest(tmp, defense or RoundDefense())
        if final.exists():  # left by an earlier attempt that the store does not know
            if _registered(sessions, round_no):
                raise StoreInputError(
                    f"round {round_no}'s files in {final} are registered in the store; "
                    "they are never overwritten"
                )
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with transaction(sessions) as session:
            for role in [r for r in ROLES if (final / r).is_dir()]:  # badnet, and any goodnet
                manifest = read_manifest(final / role)
                register_model(
                    session=session,
                    round_no=round_no,
                    role=role,  # type: ignore[arg-type]
                    bundle_path=str((final / role).resolve()),
                    sha256=manifest.weights_sha256,
                    metrics=manifest.meta.get("metrics", {}),
                )
            after_register(session)
            finish_round(
                session=session,
                round_no=round_no,
                status=status,
                samples_used=samples_used,
                metrics=metrics,
            )
            if activate:
                activate_round(session=session, round_no=round_no, activated_by=activated_by)
    except BaseException:
        if not _registered(sessions, round_no):
            shutil.rmtree(final, ignore_errors=True)
        else:
            log.error("round %d was committed before the error; its files stay", round_no)
        raise
    return final


def publish_round_zero(
    sessions: sessionmaker[Session],
    store: Path,
    write: Callable[[Path], None],
    metrics: dict[str, Any],
    defense: RoundDefense,
) -> Path:
    """A pre-deployment step's round 0: opened, published and activated by 'trainer
    prepare' (a failure marks it failed)."""
    with running_round(sessions, 0):
        return publish_round(
            sessions=sessions,
            store=store,
            round_no=0,
            write=write,
            metrics=metrics,
            activated_by="trainer prepare",
            defense=defense,
        )


def _registered(sessions: sessionmaker[Session], round_no: int) -> bool:
    """Whether the store registers models for ``round_no``; True when it cannot say, since
    an orphan directory costs disk and a deleted registered one costs a round."""
    try:
        with sessions() as session:
            return bool(round_models(session=session, round_no=round_no))
    except (SQLAlchemyError, OSError):
        return True
