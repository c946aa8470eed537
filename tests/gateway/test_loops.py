"""The replica's background loops survive faults (issue 31): the quarantine writer and the
round follower catch, count and retry any error; the writer is bounded in memory and on
disk, and keeps what it cannot place. Real SQLite and real files; a real full disk (a
64 KiB tmpfs) where the test runs as root. A bug of ours is the one fault simulated: a
session factory that raises, since no real input makes our code raise on purpose."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, open_store, session_factory
from core.quarantine import pending_count
from gateway.follower import RoundFollower
from gateway.writer import QuarantineWriter
from tests.helpers import Lab, publish_pair
from tests.store_helpers import sample


def _flaky(url: str, failures: int) -> Callable[[], sessionmaker[Session]]:
    """A session factory whose first ``failures`` calls raise an unexpected error."""
    calls = [0]

    def make() -> sessionmaker[Session]:
        calls[0] += 1
        if calls[0] <= failures:
            raise RuntimeError(f"a bug, call {calls[0]}")
        return session_factory(open_store(url))

    return make


def _wait(predicate: Callable[[], bool], seconds: float = 20) -> bool:
    end = time.monotonic() + seconds
    while not predicate() and time.monotonic() < end:
        time.sleep(0.05)
    return predicate()


def test_the_writer_outlives_an_unexpected_error_and_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    errors: list[int] = []
    writer = QuarantineWriter(
        sessions=_flaky(url, 2),
        spool_dir=tmp_path / "spool",
        max_delay=0.05,
        retry_every=0.1,
        on_error=lambda: errors.append(1),
    ).start()
    for i in range(40):
        writer.submit(sample(i))
    assert _wait(lambda: writer.written == 40), (writer.written, writer.errors)
    writer.close()
    assert writer.alive is False and writer.errors == 2 == len(errors) and writer.dropped == 0
    with session_factory(open_store(url))() as s:
        assert pending_count(session=s) == 40


def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    drops: list[int] = []
    writer = QuarantineWriter(  # not started: nothing drains the queue
        sessions=lambda: session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}")),
        spool_dir=tmp_path / "spool",
        max_queue=5,
        on_drop=drops.append,
    )
    for i in range(8):
        writer.submit(sample(i))
    assert writer.dropped == 3 == sum(drops)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, mounted for the test and unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)])
    if done.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _down_then_up(url: str) -> tuple[Callable[[], sessionmaker[Session]], list[bool]]:
    """Sessions to a database that is away (its URL names a missing directory) until the
    switch is flipped."""
    up = [False]
    away = f"sqlite:///{Path(url.removeprefix('sqlite:///')).parent / 'missing' / 'q.db'}"

    def make() -> sessionmaker[Session]:
        return session_factory(open_store(url) if up[0] else make_engine(away))

    return make, up


def test_a_full_spool_disk_holds_samples_in_memory_until_the_database_returns(
    tmp_path: Path, tiny_disk: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    open_store(url)
    make, up = _down_then_up(url)
    writer = QuarantineWriter(
        sessions=lambda: make(), spool_dir=tiny_disk, max_delay=0.05, retry_every=0.1
    ).start()
    for i in range(120):  # about 1.5 KB each as spooled JSON: more than the disk holds
        writer.submit(sample(i))
    assert _wait(lambda: writer._queue.unfinished_tasks == 0)
    assert writer.spooled < 120 and len(writer._held) > 0 and writer.dropped == 0
    assert not [p for p in tiny_disk.iterdir() if p.name.endswith(".tmp")]  # no half files
    up[0] = True
    writer._sessions = None  # the next write makes fresh sessions: the database is back
    assert writer.flush(30)
    assert _wait(lambda: not writer.spool.segments())
    writer.close()
    with session_factory(open_store(url))() as s:
        assert pending_count(session=s) == 120


def test_the_spool_cap_holds_the_rest_in_memory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    make, _ = _down_then_up(url)
    writer = QuarantineWriter(
        sessions=lambda: make(),
        spool_dir=tmp_path / "spool",
        max_delay=0.05,
        max_spool_bytes=100_000,
        max_queue=50,
    ).start()
    for i in range(200):
        writer.submit(sample(i))
        time.sleep(0.002)
    assert _wait(lambda: writer._queue.unfinished_tasks == 0)
    writer._stop.set()
    assert writer.spool.size() <= 100_000 and writer.spooled > 0
    # what the disk refused is in memory, up to max_queue, and the rest counted as dropped
    assert writer.spooled + len(writer._held) + writer.dropped == 200
    assert writer.dropped > 0  # 200 samples of about 1.5 KB pass both bounds
    assert len(writer._held) <= 50


def test_the_follower_outlives_an_unexpected_error(tmp_path: Path, lab: Lab) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    publish_pair(
        session_factory(open_store(url)), tmp_path, 0, lab.badnet, lab.goodnet, activate=True
    )
    errors: list[int] = []
    follower = RoundFollower(
        sessions=_flaky(url, 3), poll_seconds=0.05, on_loop_error=lambda: errors.append(1)
    )
    follower._thread.start()  # start() would poll once in this thread, and raise here
    assert _wait(lambda: follower.current_round == 0), follower.loop_errors
    assert follower.alive and follower.loop_errors == 3 == len(errors)
    follower.stop()


def test_a_fresh_replica_serves_the_newest_round_that_loads_and_says_so(
    tmp_path: Path, lab: Lab
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    sessions = session_factory(open_store(url))
    publish_pair(sessions, tmp_path, 0, lab.badnet, lab.goodnet, activate=True)
    publish_pair(sessions, tmp_path, 1, lab.badnet, lab.goodnet, activate=True)
    weights = next((tmp_path / "rounds" / "1").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")  # round 1 no longer loads
    follower = RoundFollower(sessions=lambda: sessions, poll_seconds=0.05).start()
    assert follower.current_round == 0
    assert follower.fallback is not None and "active round 1 does not load" in follower.fallback
    follower.stop()
