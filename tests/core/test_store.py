"""The quarantine store, run against a SQLite file and again against a real PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    StoreError,
    alembic_config,
    make_engine,
    migrate,
    open_store,
    session_factory,
    transaction,
)
from core.leases import try_claim_round
from core.quarantine import (
    NewSample,
    StoreInputError,
    activate_round,
    active_round,
    active_round_number,
    add_samples,
    decode_sample,
    fail_round,
    finish_round,
    list_rounds,
    open_round,
    pending_count,
    pending_samples,
    prune_consumed,
    register_model,
    replay_segment,
    take_pending,
)
from core.schema import ActiveRound, QuarantineSample
from tests.store_helpers import (
    TABLES,
    empty_tables,
    flip_active,
    image,
    postgres_or_skip,
    sample,
    watch_active,
    write_samples,
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('store') / 'quarantine.db'}"
    return postgres_or_skip()


@pytest.fixture(scope="module")
def engine(url: str) -> Iterator[Engine]:
    engine = open_store(url, apply_migrations=True)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    empty_tables(engine)  # every test starts from empty tables
    return session_factory(engine)


def _ready_round(sessions: sessionmaker[Session], round_no: int) -> None:
    with transaction(sessions) as s:
        open_round(session=s, round_no=round_no)
        for role in ("badnet", "goodnet"):
            register_model(
                session=s,
                round_no=round_no,
                role=role,
                bundle_path=f"/b/{round_no}/{role}",
                sha256="0" * 64,
            )  # type: ignore[arg-type]
        finish_round(
            session=s, round_no=round_no, status="succeeded", samples_used=0, metrics={"ca": 0.9}
        )


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas only")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_samples_round_trip_with_their_fields(sessions: sessionmaker[Session]) -> None:
    img = image(1, (28, 28, 3))
    new = NewSample.from_image(
        img,
        badnet_label=0,
        goodnet_label=7,
        served_round=2,
        detector="goodnet",
        badnet_score=0.99,
        goodnet_score=0.8,
    )
    with transaction(sessions) as s:
        assert add_samples(session=s, samples=[new]) == 1
    with sessions() as s:
        (row,) = pending_samples(session=s)
        assert (row.badnet_label, row.goodnet_label, row.served_round, row.detector) == (
            0,
            7,
            2,
            "goodnet",
        )
        assert (
            row.badnet_score == pytest.approx(0.99)
            and row.hit_count == 1
            and row.consumed_by_round is None
        )
        assert np.array_equal(decode_sample(row), img)
        assert row.received_at.tzinfo is not None


def test_a_pending_duplicate_adds_hits_not_rows(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        add_samples(session=s, samples=[sample(1), sample(1), sample(2)])
    with transaction(sessions) as s:
        add_samples(session=s, samples=[sample(1)])
    with sessions() as s:
        assert pending_count(session=s) == 2
        hits = dict(
            s.execute(select(QuarantineSample.pixel_sha256, QuarantineSample.hit_count)).all()
        )
        assert sorted(hits.values()) == [1, 3]
    # once consumed, the same image arriving again is a new pending row
    _ready_round(sessions, 0)
    with transaction(sessions) as s:
        open_round(session=s, round_no=1)
        assert len(take_pending(session=s, round_no=1)) == 2
    with transaction(sessions) as s:
        add_samples(session=s, samples=[sample(1)])
    with sessions() as s:
        assert pending_count(session=s) == 1
        assert s.scalar(select(func.count()).select_from(QuarantineSample)) == 3


def test_a_spool_segment_replays_exactly_once(sessions: sessionmaker[Session]) -> None:
    batch = [sample(i) for i in range(5)]
    with transaction(sessions) as s:
        assert replay_segment(session=s, segment_id="seg-1", samples=batch)
    with transaction(sessions) as s:  # e.g. a replica crashed before deleting the file
        assert not replay_segment(session=s, segment_id="seg-1", samples=batch)
    with sessions() as s:
        assert pending_count(session=s) == 5
        assert sorted(s.scalars(select(QuarantineSample.hit_count))) == [1] * 5


def test_take_pending_consumes_oldest_first(sessions: sessionmaker[Session]) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with transaction(sessions) as s:
        add_samples(
            session=s,
            samples=[sample(i, received_at=base + timedelta(seconds=10 - i)) for i in range(5)],
        )
    _ready_round(sessions, 0)
    with transaction(sessions) as s:
        open_round(session=s, round_no=1)
        taken = take_pending(session=s, round_no=1, limit=3)
    assert [t.received_at for t in taken] == sorted(t.received_at for t in taken)
    with sessions() as s:
        assert pending_count(session=s) == 2
        consumed = s.scalars(
            select(QuarantineSample.consumed_by_round).where(
                QuarantineSample.consumed_by_round.is_not(None)
            )
        ).all()
        assert consumed == [1, 1, 1]


def test_rounds_lifecycle_and_activation(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert active_round(session=s) is None and active_round_number(session=s) is None
    _ready_round(sessions, 0)
    with transaction(sessions) as s:
        activate_round(session=s, round_no=0, activated_by="prepare")
    with transaction(sessions) as s:
        open_round(session=s, round_no=1)
        fail_round(session=s, round_no=1, error="killed")
        open_round(session=s, round_no=2)
        finish_round(
            session=s, round_no=2, status="rejected", samples_used=200, metrics={"ca": 0.5}
        )
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round == 0 and set(info.models) == {"badnet", "goodnet"}
        assert [(r.round, r.status) for r in list_rounds(session=s)] == [
            (0, "succeeded"),
            (1, "failed"),
            (2, "rejected"),
        ]
        r1 = list_rounds(session=s)[1]
        assert r1.error == "killed" and r1.finished_at is not None


@pytest.mark.parametrize(
    ("round_no", "message"),
    [(9, "round 9 does not exist"), (1, "round 1 is failed"), (3, "round 3 is running")],
)
def test_activation_refuses_bad_rounds_and_changes_nothing(
    sessions: sessionmaker[Session], round_no: int, message: str
) -> None:
    _ready_round(sessions, 0)
    with transaction(sessions) as s:
        activate_round(session=s, round_no=0)
        open_round(session=s, round_no=1)
        fail_round(session=s, round_no=1, error="boom")
        open_round(session=s, round_no=3)
    with pytest.raises(StoreInputError, match=message), transaction(sessions) as s:
        activate_round(session=s, round_no=round_no)
    with sessions() as s:
        assert active_round_number(session=s) == 0


def test_a_round_without_its_badnet_cannot_be_activated(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        open_round(session=s, round_no=0)
        register_model(session=s, round_no=0, role="goodnet", bundle_path="/g", sha256="0" * 64)
        finish_round(session=s, round_no=0, status="succeeded", samples_used=0, metrics={})
    with (
        pytest.raises(StoreInputError, match="lacks a registered badnet"),
        transaction(sessions) as s,
    ):
        activate_round(session=s, round_no=0)


def test_a_single_model_round_can_be_activated(sessions: sessionmaker[Session]) -> None:
    """CoDefend's rounds register the badnet alone; whether a round's members suit its
    defense is checked where it loads (core.defenses.with_policy)."""
    with transaction(sessions) as s:
        open_round(session=s, round_no=0)
        register_model(session=s, round_no=0, role="badnet", bundle_path="/b", sha256="0" * 64)
        finish_round(session=s, round_no=0, status="succeeded", samples_used=0, metrics={})
    with transaction(sessions) as s:
        activate_round(session=s, round_no=0)
    with sessions() as s:
        assert active_round_number(session=s) == 0


def test_round_misuse_is_refused(sessions: sessionmaker[Session]) -> None:
    _ready_round(sessions, 0)
    with pytest.raises(StoreInputError, match="already exists"), transaction(sessions) as s:
        open_round(session=s, round_no=0)
    with pytest.raises(StoreInputError, match="not running"), transaction(sessions) as s:
        fail_round(session=s, round_no=0, error="x")
    with pytest.raises(StoreInputError, match="does not exist"), transaction(sessions) as s:
        register_model(session=s, round_no=5, role="badnet", bundle_path="/b", sha256="0" * 64)


def test_a_sample_whose_shape_does_not_match_its_png_writes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    good = sample(1)
    lying = NewSample(**{**good.__dict__, "pixel_sha256": "f" * 64, "height": 32})
    not_png = NewSample(**{**good.__dict__, "pixel_sha256": "e" * 64, "png": b"GIF89a...."})
    for bad, message in [(lying, "stored shape says 32x28x1"), (not_png, "not a PNG")]:
        with pytest.raises(StoreInputError, match=message), transaction(sessions) as s:
            add_samples(session=s, samples=[good, bad])
    with sessions() as s:
        assert pending_count(session=s) == 0


def test_prune_deletes_old_consumed_samples_only(sessions: sessionmaker[Session]) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    with transaction(sessions) as s:
        add_samples(session=s, samples=[sample(i, received_at=old) for i in range(3)])
    _ready_round(sessions, 0)
    with transaction(sessions) as s:
        open_round(session=s, round_no=1)
        take_pending(session=s, round_no=1, limit=2)
        add_samples(session=s, samples=[sample(10)])  # consumed later, but recent
    with transaction(sessions) as s:
        assert prune_consumed(session=s, older_than=timedelta(days=30)) == 2
    with sessions() as s:
        assert pending_count(session=s) == 2


def _spawn_all(targets: list[tuple[object, tuple[object, ...]]]) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=t, args=a) for t, a in targets]  # type: ignore[arg-type]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"{p.name} exited {p.exitcode}"


def test_four_writers_add_exactly_4000_distinct_rows(
    url: str, sessions: sessionmaker[Session]
) -> None:
    barrier = multiprocessing.get_context("spawn").Barrier(4)
    _spawn_all(
        [
            (write_samples, (url, list(range(w * 1000, (w + 1) * 1000)), 50, barrier))
            for w in range(4)
        ]
    )
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(QuarantineSample)) == 4000
        assert pending_count(session=s) == 4000


def test_four_writers_of_one_image_make_one_row_with_4000_hits(
    url: str, sessions: sessionmaker[Session]
) -> None:
    barrier = multiprocessing.get_context("spawn").Barrier(4)
    _spawn_all([(write_samples, (url, [7] * 1000, 50, barrier)) for _ in range(4)])
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(QuarantineSample)) == 1
        assert s.scalar(select(QuarantineSample.hit_count)) == 4000


def test_activation_under_concurrent_writers_keeps_exactly_one_active(
    url: str, sessions: sessionmaker[Session]
) -> None:
    for r in (0, 1, 2):
        _ready_round(sessions, r)
    with transaction(sessions) as s:
        activate_round(session=s, round_no=0)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    _spawn_all(
        [
            (write_samples, (url, list(range(2000)), 20, barrier)),
            (write_samples, (url, list(range(2000, 4000)), 20, barrier)),
            (flip_active, (url, [1, 2, 0], 300, barrier)),
            (watch_active, (url, 4.0, barrier, out)),
        ]
    )
    seen, reads = out.get(timeout=10)
    assert reads > 20
    assert {count for count, _ in seen} == {1}  # never zero, never two
    assert {r for _, r in seen} <= {0, 1, 2}
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ActiveRound)) == 1
        assert active_round_number(session=s) == 0  # the last flip (299) set rounds[299 % 3] = 0


def test_migrations_up_down_up_and_no_drift(url: str) -> None:
    from alembic import command

    engine = make_engine(url)
    cfg = alembic_config(url)
    command.downgrade(cfg, "base")
    with engine.connect() as conn:
        names = set(conn.dialect.get_table_names(conn))
    assert not names & set(TABLES)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    migrate(engine)
    command.check(cfg)  # raises if the models and the migrations disagree
    with engine.connect() as conn:
        assert set(TABLES) <= set(conn.dialect.get_table_names(conn))
    engine.dispose()


def test_alembic_command_line_uses_the_settings_url(url: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BQG_DB": url}
    for args in (["upgrade", "head"], ["check"], ["current"]):
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "alembic"), *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    head = sorted(p.name[:4] for p in (root / "migrations" / "versions").glob("0*.py"))[-1]
    assert f"{head} (head)" in proc.stdout


def test_bad_urls_and_unreachable_databases(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="malformed database URL"):
        make_engine("not a url")
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        make_engine("mysql://u:p@localhost/db")
    with pytest.raises(StoreError) as info:
        open_store("postgresql+psycopg://alice:s3cret@127.0.0.1:1/nowhere")
    assert "cannot reach database postgresql+psycopg://alice:***@127.0.0.1:1/nowhere" in str(
        info.value
    )
    assert "s3cret" not in str(info.value)
    blocker = tmp_path / "q.db"
    blocker.touch()  # a file where the database's directory would have to be
    with pytest.raises(StoreError, match="cannot reach database sqlite"):
        open_store(f"sqlite:///{blocker}/inside/q.db")


def test_racing_claimers_get_one_round_and_the_others_a_clean_no(
    sessions: sessionmaker[Session],
) -> None:
    """Eight claimers at once, twenty times: each race opens exactly one round, and every
    loser is told no (None), never an error from the database."""
    import threading

    lease = timedelta(seconds=60)
    for race in range(20):
        barrier = threading.Barrier(8)
        results: list[object] = []

        def claim(i: int, barrier: threading.Barrier = barrier, results: list = results) -> None:
            barrier.wait()
            try:
                results.append(try_claim_round(sessions, owner=f"claimer {i}", lease=lease))
            except Exception as exc:  # the test reports it below
                results.append(exc)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, f"race {race}: {errors[0]!r}"
        assert sorted(results, key=str) == [race] + [None] * 7, f"race {race}: {results}"
        with transaction(sessions) as s:  # the winner's round ends; the next race opens one more
            fail_round(session=s, round_no=race, error="test")


def test_migration_0006_keeps_single_model_rows_both_ways(url: str) -> None:
    """Up: goodnet_label may be NULL and strip_entropy exists. Down: a NULL goodnet label
    takes the badnet's (the only opinion such a row had), and strip_entropy goes."""
    from alembic import command

    cfg = alembic_config(url)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    engine = make_engine(url)
    row = (
        "INSERT INTO quarantine_sample (pixel_sha256, png, height, width, channels, "
        "badnet_label, goodnet_label, served_round, detector, received_at, last_seen_at, "
        "hit_count, strip_entropy) VALUES ('{d}', :png, 1, 1, 1, 7, NULL, 0, 'strip', "
        ":now, :now, 1, 0.25)"
    )
    now = datetime(2026, 12, 4, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(text(row.format(d="a" * 64)), {"png": b"x", "now": now})
    command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT goodnet_label FROM quarantine_sample")).scalar() == 7
        columns = {c["name"] for c in inspect(conn).get_columns("quarantine_sample")}
        assert "strip_entropy" not in columns
        with pytest.raises(IntegrityError):  # NOT NULL again
            conn.execute(
                text(row.format(d="b" * 64).replace(", strip_entropy", "").replace(", 0.25", "")),
                {"png": b"x", "now": now},
            )
    command.upgrade(cfg, "head")
    with engine.begin() as conn:
        conn.execute(text(row.format(d="c" * 64)), {"png": b"x", "now": now})
        assert (
            conn.execute(
                text("SELECT count(*) FROM quarantine_sample WHERE goodnet_label IS NULL")
            ).scalar()
            == 1
        )
    engine.dispose()
