"""The repair watcher: one round for two watchers, a killed task, metrics, operator commands."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import open_store, session_factory, transaction
from core.metrics import PENDING, WATCHER_EXPORTED
from core.quarantine import active_round, list_rounds, pending_count
from core.settings import Settings
from tests.helpers import (
    SHAPE,
    TINY_REPAIR,
    Lab,
    call_cli,
    free_port,
    make_blobs,
    publish_pair,
    quarantine_images,
    run_cli,
)
from tests.store_helpers import empty_tables, postgres_or_skip
from trainer.cyclegan import PRESETS
from trainer.data import save_npz
from trainer.watcher import Watcher

TINY = TINY_REPAIR


def _setup(
    tmp_path: Path, lab: Lab, samples: int, *, url: str | None = None, **settings: Any
) -> tuple[Settings, sessionmaker[Session]]:
    """Round 0 active and ``samples`` pending, in SQLite unless ``url`` names a database,
    which is emptied first."""
    url = url or f"sqlite:///{tmp_path / 'q.db'}"
    engine = open_store(url)
    empty_tables(engine)
    sessions = session_factory(engine)
    publish_pair(sessions, tmp_path, 0, lab.badnet, lab.goodnet, activate=True)
    quarantine_images(sessions, lab.triggered[:samples])
    save_npz(make_blobs(200, shape=SHAPE, classes=4, seed=21), tmp_path / "valid.npz")
    defaults: dict[str, Any] = {
        "store": tmp_path,
        "db": url,
        "valid": f"npz:{tmp_path / 'valid.npz'}",
        "quarantine_threshold": 10,
        "watcher_metrics_port": 0,
        "threads": 1,
        "repair_lease_seconds": 5.0,
        "repair_retry_seconds": 0.0,
    }
    return Settings(**{**defaults, **settings}), sessions


def _slow_round_under_way(settings: Settings) -> tuple[Watcher, threading.Thread, list[Any]]:
    """A watcher polling in a thread, its round's Ray task a few seconds into a CycleGAN
    that would train for minutes; the thread appends the poll's result to the list."""
    # no transplant: a stamp found in the kept samples would skip the CycleGAN, and whether
    # the lab's patch is found depends on the session's lab models
    slow = replace(TINY, transplant=False, cyclegan=replace(TINY.cyclegan, epochs=500))
    watcher = Watcher(settings, slow, use_ray=True)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(watcher.poll_once()))
    thread.start()
    deadline = time.monotonic() + 60
    while watcher.current_ref is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert watcher.current_ref is not None
    time.sleep(3.0)  # into the CycleGAN's training
    return watcher, thread, results


def test_below_the_threshold_nothing_runs(tmp_path: Path, lab: Lab) -> None:
    settings, sessions = _setup(tmp_path, lab, 5)
    result = Watcher(settings, TINY, use_ray=False).poll_once()
    assert result.pending == 5 and result.round is None
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_watchers_against_one_database_start_one_round(
    tmp_path: Path, lab: Lab, database: str
) -> None:
    url = postgres_or_skip() if database == "postgresql" else None
    settings, sessions = _setup(tmp_path, lab, 20, url=url)
    watchers = [Watcher(settings, TINY, use_ray=False, owner=f"w{i}") for i in range(4)]
    results: list[Any] = [None] * len(watchers)
    barrier = threading.Barrier(len(watchers))

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = watchers[i].poll_once()
        except Exception as exc:  # asserted below: a losing watcher must not crash
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(watchers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not [r for r in results if isinstance(r, Exception)], results
    ran = [r for r in results if r.round is not None]
    assert len(ran) == 1 and ran[0].status == "succeeded"
    with sessions() as s:
        assert [(r.round, r.status) for r in list_rounds(session=s)] == [
            (0, "succeeded"),
            (1, "succeeded"),
        ]
        assert active_round(session=s).round == 1  # type: ignore[union-attr]
        assert pending_count(session=s) == 0


@pytest.mark.integration
def test_a_killed_round_task_fails_the_round_and_the_next_one_runs(
    tmp_path: Path, lab: Lab, ray_session: Any
) -> None:
    import ray

    settings, sessions = _setup(tmp_path, lab, 20, watcher_metrics_port=free_port())
    watcher, thread, results = _slow_round_under_way(settings)
    ray.cancel(watcher.current_ref, force=True)  # kills the worker process running the task
    thread.join(timeout=120)
    (result,) = results
    assert result.round == 1 and result.status == "failed"
    with sessions() as s:
        (r0, r1) = list_rounds(session=s)
        assert r1.status == "failed" and r1.error
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 20  # nothing consumed
    text = httpx.get(f"http://127.0.0.1:{settings.watcher_metrics_port}/metrics").text
    assert 'bqg_repair_rounds_total{outcome="failed"} 1.0' in text
    assert f"{WATCHER_EXPORTED[PENDING]} 20.0" in text
    watcher.cfg = TINY
    again = watcher.poll_once()
    assert again.round == 2 and again.status == "succeeded"
    watcher.metrics.close()


@pytest.mark.integration
def test_stopping_the_watcher_mid_round_fails_the_round_at_once(
    tmp_path: Path, lab: Lab, ray_session: Any
) -> None:
    """Ctrl-C on ``gateway serve`` while a round trains: the round ends as failed within
    seconds (not a lease later), its task is cancelled, and nothing is consumed."""
    settings, sessions = _setup(tmp_path, lab, 20, repair_lease_seconds=300.0)
    watcher, thread, results = _slow_round_under_way(settings)
    stopped = time.monotonic()
    watcher.stop()
    thread.join(timeout=60)
    assert time.monotonic() - stopped < 10
    (result,) = results
    assert result.round == 1 and result.status == "failed"
    with sessions() as s:
        r1 = list_rounds(session=s)[1]
        assert r1.status == "failed" and "stopped while the round trained" in (r1.error or "")
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 20
    watcher.metrics.close()


def test_status_rollback_and_retrain_refusals(tmp_path: Path, lab: Lab) -> None:
    settings, sessions = _setup(tmp_path, lab, 3)
    env = {"BQG_STORE": str(tmp_path), "BQG_DB": settings.db_url, "BQG_VALID": settings.valid}
    r = run_cli("trainer", "retrain", "--round", "1", env=env)  # the real entry point once
    assert r.returncode == 2 and "3 samples are pending, fewer than N = 200" in r.stderr
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    r = call_cli("trainer", "retrain", "--round", "0", env=env)
    assert r.returncode == 2 and "repair rounds are 1 or more" in r.stderr
    r = call_cli("trainer", "rollback", "--round", "7", env=env)
    assert r.returncode == 2 and "round 7 does not exist" in r.stderr
    r = call_cli("trainer", "watch", "--threshold", "0", env=env)
    assert r.returncode == 2 and "N must be at least 1" in r.stderr
    r = call_cli("trainer", "retrain", "--round", "1", "--quarantine-views", "-1", env=env)
    assert r.returncode == 2 and "quarantine_views must be 0 or more, got -1" in r.stderr
    r = call_cli("trainer", "retrain", "--round", "1", "--pixel-curve", "9", env=env)
    assert r.returncode == 2 and "pixel_curve must lie in 0..5" in r.stderr
    r = call_cli("trainer", "retrain", "--round", "1", "--borderline", "-3", env=env)
    assert r.returncode == 2 and "borderline must be 0 or more images, got -3" in r.stderr
    bad = tmp_path / "repair.json"
    bad.write_text('{"quarantine_views": -1}')
    r = call_cli(
        "trainer", "retrain", "--round", "1", "--force", env={**env, "BQG_REPAIR_CONFIG": str(bad)}
    )
    assert r.returncode == 2 and "quarantine_views must be 0 or more, got -1" in r.stderr
    r = call_cli("trainer", "status", env={**env, "BQG_POLICY": "reject"})
    assert r.returncode == 2 and "trainer prepare --defense" in r.stderr
    assert "Traceback" not in r.stderr
    with transaction(sessions) as s:  # a failed round 1
        from core.quarantine import fail_round, open_round

        open_round(session=s, round_no=1)
        fail_round(session=s, round_no=1, error="killed")
    r = call_cli("trainer", "rollback", "--round", "1", env=env)
    assert r.returncode == 2 and "round 1 is failed; only a succeeded round" in r.stderr
    r = call_cli("trainer", "retrain", "--round", "1", "--force", env=env)
    assert r.returncode == 2 and "round 1 already exists (failed)" in r.stderr
    r = call_cli("trainer", "status", env=env)
    assert r.returncode == 0
    assert "killed" in r.stdout and "pending quarantined samples: 3" in r.stdout
    empty = {**env, "BQG_DB": f"sqlite:///{tmp_path / 'empty.db'}"}
    r = call_cli("trainer", "retrain", "--round", "1", "--force", env=empty)
    assert r.returncode == 2 and "no round is active" in r.stderr


def test_retrain_runs_a_round_and_rollback_returns_to_round_zero(tmp_path: Path, lab: Lab) -> None:
    settings, sessions = _setup(tmp_path, lab, 12)
    # the watcher's file, too; short, as the CLI path is under test here, not the recipe
    (tmp_path / "repair.json").write_text('{"preset": "tiny", "epochs": 2, "clean_images": 64}')
    env = {
        "BQG_STORE": str(tmp_path),
        "BQG_DB": settings.db_url,
        "BQG_VALID": settings.valid,
        "BQG_QUARANTINE_THRESHOLD": "10",
        "BQG_REPAIR_CONFIG": str(tmp_path / "repair.json"),
    }
    r = run_cli(
        "trainer",
        "retrain",
        *("--round", "1", "--no-replay", "--no-transplant", "--quarantine-views", "2"),
        *("--pixel-curve", "1", "--borderline", "8"),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "CycleGAN epoch" in r.stderr and "round 1 is active" in r.stderr
    with sessions() as s:
        assert active_round(session=s).round == 1  # type: ignore[union-attr]
        config = list_rounds(session=s)[1].metrics["config"]
        assert config["replay"] is False and config["quarantine_views"] == 2
        assert config["transplant"] is False and config["pixel_curve"] == 1
        assert config["borderline"] == 8 and "cyclegan" not in config
        assert list_rounds(session=s)[1].metrics["cyclegan"]["ngf"] == PRESETS["tiny"].ngf
    r = run_cli("trainer", "rollback", "--round", "0", env=env)
    assert r.returncode == 0 and "round 0 is active" in r.stdout
    with sessions() as s:
        assert active_round(session=s).round == 0  # type: ignore[union-attr]


def test_retrain_beside_a_watcher_holds_its_5_s_lease_and_runs_alone(
    tmp_path: Path, lab: Lab
) -> None:
    """``trainer retrain`` beats from a thread: a round that runs well past its 5 s lease
    stays alive, and a watcher polling beside it all along never starts a second one."""
    settings, sessions = _setup(tmp_path, lab, 12, repair_lease_seconds=5.0)
    (tmp_path / "repair.json").write_text('{"preset": "tiny", "epochs": 8, "clean_images": 64}')
    env = {
        "BQG_STORE": str(tmp_path),
        "BQG_DB": settings.db_url,
        "BQG_VALID": settings.valid,
        "BQG_QUARANTINE_THRESHOLD": "10",
        "BQG_REPAIR_LEASE_SECONDS": "5",
        "BQG_REPAIR_CONFIG": str(tmp_path / "repair.json"),
    }
    watcher = Watcher(settings, TINY, use_ray=False, owner="beside")
    running: list[list[int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() and not _running(sessions):
            time.sleep(0.05)  # the watcher joins once retrain has claimed round 1
        while not done.is_set():
            watcher.poll_once()
            with sessions() as s:
                running.append([r.round for r in list_rounds(session=s) if r.status == "running"])
            time.sleep(0.3)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        r = run_cli("trainer", "retrain", "--round", "1", env=env)
    finally:
        done.set()
        thread.join(timeout=60)
        watcher.metrics.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(len(now) <= 1 for now in running) and [1] in running, running
    with sessions() as s:
        rounds = list_rounds(session=s)
    assert [(x.round, x.status) for x in rounds] == [(0, "succeeded"), (1, "succeeded")]
    assert rounds[1].owner is not None and rounds[1].owner.startswith("trainer retrain")
    seconds = (rounds[1].finished_at - rounds[1].started_at).total_seconds()  # type: ignore[operator]
    assert seconds > 10, f"round 1 took {seconds:.1f} s: too short to outlive its 5 s lease"


def _running(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as s:
        return [r.round for r in list_rounds(session=s) if r.status == "running"]
