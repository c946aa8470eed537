"""publish_round never removes or overwrites the files of a round the store registers."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import trainer.rounds
from core.quarantine import StoreInputError, round_models
from tests.helpers import Lab, lab_store
from trainer.rounds import publish_round, running_round


def _copy(lab: Lab) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        shutil.copytree(lab.badnet, out / "badnet")
        shutil.copytree(lab.goodnet, out / "goodnet")

    return write


def test_a_commit_whose_answer_was_lost_keeps_its_files(
    tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks as the commit returns (a fault we cannot cause on demand, so
    the transaction is wrapped): the store has the round, so its files must stay."""
    sessions = lab_store(tmp_path, lab)
    real = trainer.rounds.transaction

    @contextmanager
    def answer_lost(s: sessionmaker[Session]) -> Iterator[Session]:
        with real(s) as session:
            yield session
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    with pytest.raises(OperationalError), running_round(sessions, 1):
        monkeypatch.setattr(trainer.rounds, "transaction", answer_lost)
        publish_round(sessions=sessions, store=tmp_path, round_no=1, write=_copy(lab), metrics={})
    with sessions() as s:
        assert len(round_models(session=s, round_no=1)) == 2
    assert (tmp_path / "rounds" / "1" / "badnet").is_dir()
    assert (tmp_path / "rounds" / "1" / "goodnet").is_dir()


def test_a_failed_registration_removes_its_files(tmp_path: Path, lab: Lab) -> None:
    sessions = lab_store(tmp_path, lab)

    def refuse(session: Session) -> None:
        raise StoreInputError("refused inside the transaction")

    with pytest.raises(StoreInputError), running_round(sessions, 1):
        publish_round(
            sessions=sessions,
            store=tmp_path,
            round_no=1,
            write=_copy(lab),
            metrics={},
            after_register=refuse,
        )
    assert not (tmp_path / "rounds" / "1").exists()


def test_registered_files_are_never_overwritten(tmp_path: Path, lab: Lab) -> None:
    sessions = lab_store(tmp_path, lab)  # round 0 is registered
    before = sorted(p.name for p in (tmp_path / "rounds" / "0").rglob("*"))
    with pytest.raises(StoreInputError, match="never overwritten"):
        publish_round(sessions=sessions, store=tmp_path, round_no=0, write=_copy(lab), metrics={})
    assert sorted(p.name for p in (tmp_path / "rounds" / "0").rglob("*")) == before
