"""The quarantine writer against a real SQLite file, with a real fault: the database and its
WAL made immutable (chattr +i), so every write fails with a disk I/O error, then restored."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import open_store, session_factory
from core.quarantine import pending_count
from core.schema import QuarantineSample, SpoolSegment
from gateway.writer import QuarantineWriter, Spool
from tests.store_helpers import sample


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'db' / 'q.db'}"
    return url, session_factory(open_store(url))


def _writer(url: str, spool: Path, **kw: float) -> QuarantineWriter:
    return QuarantineWriter(
        sessions=lambda: session_factory(open_store(url)), spool_dir=spool, **kw
    ).start()  # type: ignore[arg-type]


@pytest.fixture
def immutable(store: tuple[str, sessionmaker[Session]]) -> Iterator[list[str]]:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    db = Path(store[0].removeprefix("sqlite:///"))
    files = [str(db), f"{db}-wal"]
    yield files
    subprocess.run(["chattr", "-i", *files], check=False)


def test_batches_reach_the_store_and_duplicates_add_hits(
    store: tuple[str, sessionmaker[Session]], tmp_path: Path
) -> None:
    url, sessions = store
    writer = _writer(url, tmp_path / "spool", max_delay=0.05)
    for i in range(300):
        writer.submit(sample(i % 100))
    assert writer.flush()
    writer.close()
    with sessions() as s:
        assert pending_count(session=s) == 100
        assert s.scalar(select(func.sum(QuarantineSample.hit_count))) == 300
    assert writer.spool.segments() == []


def test_an_outage_spools_and_replays_exactly_once(
    store: tuple[str, sessionmaker[Session]], tmp_path: Path, immutable: list[str]
) -> None:
    url, sessions = store
    writer = _writer(url, tmp_path / "spool", max_delay=0.05, retry_every=0.3)
    for i in range(50):
        writer.submit(sample(i))
    assert writer.flush()
    subprocess.run(["chattr", "+i", *immutable], check=True)  # the database goes away
    for i in range(50, 250):
        writer.submit(sample(i))
    assert writer.flush()
    assert not writer.database_up and writer.spool.depth() == 200 and writer.spooled == 200
    subprocess.run(["chattr", "-i", *immutable], check=True)  # and comes back
    for i in range(250, 300):
        writer.submit(sample(i))
    assert writer.flush()
    end = time.monotonic() + 10
    while writer.spool.segments() and time.monotonic() < end:
        time.sleep(0.05)
    writer.close()
    assert writer.spool.segments() == [] and writer.database_up
    with sessions() as s:
        assert pending_count(session=s) == 300
        assert s.scalar(select(func.sum(QuarantineSample.hit_count))) == 300  # none twice
        # everything that went to disk came back through the spool, once
        assert s.scalar(select(func.sum(SpoolSegment.samples))) == writer.spooled >= 200


def test_the_spool_survives_a_restart_and_a_replayed_segment_is_skipped(
    store: tuple[str, sessionmaker[Session]], tmp_path: Path
) -> None:
    url, sessions = store
    spool = Spool(tmp_path / "spool")
    segment = spool.append([sample(i) for i in range(10)])
    copy = segment.read_bytes()
    writer = _writer(url, tmp_path / "spool", retry_every=0.0)
    writer.submit(sample(99))  # wakes the loop, which replays first
    assert writer.flush()
    writer.close()
    assert spool.segments() == []
    segment.write_bytes(copy)  # as if the replica died after commit, before unlink
    writer = _writer(url, tmp_path / "spool", retry_every=0.0)
    writer.submit(sample(98))
    assert writer.flush()
    writer.close()
    with sessions() as s:
        assert pending_count(session=s) == 12
        assert s.scalar(select(func.sum(QuarantineSample.hit_count))) == 12
    assert spool.segments() == []


def test_a_half_written_segment_is_never_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([sample(1), sample(2)])
    (tmp_path / ".000-abc-n5.jsonl.tmp").write_text('{"png": "trunc')  # a crash mid-write
    assert len(spool.segments()) == 1 and spool.depth() == 2
    assert [s.pixel_sha256 for s in spool.read(spool.segments()[0])] == [
        sample(1).pixel_sha256,
        sample(2).pixel_sha256,
    ]
