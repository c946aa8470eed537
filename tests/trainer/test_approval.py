"""BQG_REPAIR_APPROVAL=manual: a round that passes its gate waits for an operator."""

from __future__ import annotations

from pathlib import Path

from core.quarantine import active_round, list_rounds, pending_count
from core.settings import Settings
from tests.helpers import SHAPE, TINY_REPAIR, Lab, call_cli, lab_store, make_blobs, quarantine_lab
from trainer.data import save_npz
from trainer.watcher import Watcher


def test_a_passed_round_waits_for_trainer_approve(tmp_path: Path, lab: Lab) -> None:
    sessions = lab_store(tmp_path, lab)
    save_npz(make_blobs(200, shape=SHAPE, classes=4, seed=21), tmp_path / "valid.npz")
    settings = Settings(
        store=tmp_path,
        db=f"sqlite:///{tmp_path / 'q.db'}",
        valid=f"npz:{tmp_path / 'valid.npz'}",
        quarantine_threshold=10,
        watcher_metrics_port=0,
        threads=1,
        repair_retry_seconds=0.0,
        repair_approval="manual",
    )
    env = {"BQG_DB": settings.db_url, "BQG_STORE": str(tmp_path)}
    watcher = Watcher(settings, TINY_REPAIR, use_ray=False)
    try:
        quarantine_lab(sessions, lab, 20)
        assert watcher.poll_once().status == "awaiting_approval"
        with sessions() as s:
            assert active_round(session=s).round == 0  # type: ignore[union-attr]
            assert [r.status for r in list_rounds(session=s)] == ["succeeded", "awaiting_approval"]
            assert pending_count(session=s) == 0  # its samples are the round's
        status = call_cli("trainer", "status", env=env)
        assert "awaiting_approval" in status.stdout and "trainer approve --round 1" in status.stdout
        quarantine_lab(sessions, lab, 20, start=20)
        assert watcher.poll_once().round is None  # no new round while one awaits a decision
        approved = call_cli("trainer", "approve", "--round", "1", env=env)
        assert approved.returncode == 0 and "approved and active" in approved.stdout
        with sessions() as s:
            assert active_round(session=s).round == 1  # type: ignore[union-attr]
        again = call_cli("trainer", "approve", "--round", "1", env=env)
        assert again.returncode == 2 and "round 1 is succeeded" in again.stderr
        assert watcher.poll_once().status == "awaiting_approval"  # round 2, on round 1
        declined = call_cli("trainer", "approve", "--round", "2", "--decline", env=env)
        assert declined.returncode == 0, declined.stderr
    finally:
        watcher.metrics.close()
    with sessions() as s:
        rounds = list_rounds(session=s)
        assert [r.status for r in rounds] == ["succeeded", "succeeded", "rejected"]
        assert rounds[2].error is not None and rounds[2].error.startswith("declined by")
        assert active_round(session=s).round == 1  # type: ignore[union-attr]
