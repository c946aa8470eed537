"""Database URLs for the store tests, and worker functions for the multi-process tests.

The worker functions live in an importable module because the tests start them with the
'spawn' method (a fresh interpreter, as separate gateway replicas would be).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from core.db import make_engine, session_factory, transaction
from core.quarantine import NewSample, activate_round

POSTGRES_URL = os.environ.get(
    "BQG_TEST_POSTGRES_URL", "postgresql+psycopg://bqg:bqg@127.0.0.1:5432/bqg_test"
)
TABLES = ("active_round", "model_version", "quarantine_sample", "repair_round", "spool_segment")


def postgres_or_skip() -> str:
    """The test server's URL; skips without one, but fails under CI, which starts one."""
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means: no server here
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL must run in CI but is unreachable at {POSTGRES_URL}: {exc}")
        pytest.skip(
            f"no PostgreSQL server reachable at {POSTGRES_URL} (start one: pg_ctlcluster 15 main start)"
        )
    finally:
        engine.dispose()
    return POSTGRES_URL


def empty_tables(engine: Engine) -> None:
    """Delete every row of the store's tables (the PostgreSQL test database is shared)."""
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))


def image(seed: int, shape: tuple[int, int, int] = (28, 28, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def sample(seed: int, **fields: Any) -> NewSample:
    defaults: dict[str, Any] = {
        "badnet_label": 0,
        "goodnet_label": 1,
        "served_round": 0,
        "detector": "goodnet",
    }
    return NewSample.from_image(image(seed), **{**defaults, **fields})


def write_samples(url: str, seeds: list[int], batch: int, barrier: Any) -> None:
    """Add samples for ``seeds`` in transactions of ``batch``, after all writers are ready."""
    from core.quarantine import add_samples

    sessions = session_factory(make_engine(url))
    samples = [sample(s) for s in seeds]
    barrier.wait()
    for i in range(0, len(samples), batch):
        with transaction(sessions) as session:
            add_samples(session=session, samples=samples[i : i + batch])


def flip_active(url: str, rounds: list[int], flips: int, barrier: Any) -> None:
    sessions = session_factory(make_engine(url))
    barrier.wait()
    for i in range(flips):
        with transaction(sessions) as session:
            activate_round(
                session=session, round_no=rounds[i % len(rounds)], activated_by=f"flip {i}"
            )


def watch_active(url: str, seconds: float, barrier: Any, out: Any) -> None:
    """Count active-round rows in a loop; report every distinct (count, round) seen."""
    from sqlalchemy import func, select

    from core.schema import ActiveRound

    sessions = session_factory(make_engine(url))
    seen: set[tuple[int, int | None]] = set()
    reads = 0
    barrier.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with sessions() as session:
            count, low, high = session.execute(
                select(func.count(), func.min(ActiveRound.round), func.max(ActiveRound.round))
            ).one()
            seen.add((int(count), low))
            assert low == high
            reads += 1
    out.put((sorted(seen, key=str), reads))
