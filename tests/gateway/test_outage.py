"""Nothing lost: 2,000 requests, 500 of them disagreeing, while the database goes away and
comes back. SQLite: the file and its WAL made immutable (chattr +i), then restored.
PostgreSQL: the cluster stopped, then started."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.db import open_store
from core.images import encode_png
from core.quarantine import pending_count
from tests.gateway.conftest import Gateway, Lab, disagreeing_images
from tests.store_helpers import POSTGRES_URL

pytestmark = pytest.mark.integration
TOTAL, SUSPECT, CLIENTS = 2000, 500, 8


def _stream(
    gw: Gateway, bodies: list[bytes], outage: Callable[[], None], restore: Callable[[], None]
) -> list[str]:
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=gw.url, timeout=60) as http:
            for i in range(worker, len(bodies), CLIENTS):
                r = http.post("/predict", content=bodies[i], headers={"content-type": "image/png"})
                with lock:
                    done[0] += 1
                    if r.status_code != 200:
                        failures.append(r.text)

    def operator() -> None:
        while done[0] < len(bodies) // 4:
            time.sleep(0.01)
        outage()
        while done[0] < 3 * len(bodies) // 4:
            time.sleep(0.01)
        restore()

    with ThreadPoolExecutor(CLIENTS + 1) as pool:
        op = pool.submit(operator)
        for f in [pool.submit(client, w) for w in range(CLIENTS)]:
            f.result()
        op.result()
    return failures


def _bodies(lab: Lab) -> list[bytes]:
    suspects, _, _ = disagreeing_images(lab, SUSPECT)
    clean = [lab.clean[i % len(lab.clean)] for i in range(TOTAL - SUSPECT)]
    images = list(suspects) + clean
    order = np.random.default_rng(0).permutation(len(images))
    return [encode_png(images[i]) for i in order]


def _wait_for_rows(gw: Gateway, n: int, timeout: float = 60) -> int:
    from ray import serve

    serve.get_deployment_handle("Ensemble", app_name=gw.name).flush.remote().result(timeout_s=60)
    end = time.monotonic() + timeout
    count = -1
    while time.monotonic() < end:
        with gw.sessions() as s:
            count = pending_count(session=s)
        if count >= n:
            break
        time.sleep(0.5)
    return count


def test_sqlite_outage_loses_nothing(gateway_factory: Callable[..., Gateway], lab: Lab) -> None:
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make the SQLite file immutable")
    gw = gateway_factory("gwsqliteout")
    db = Path(gw.db_url.removeprefix("sqlite:///"))
    files = [str(db), f"{db}-wal"]
    try:
        failures = _stream(
            gw,
            _bodies(lab),
            outage=lambda: subprocess.run(["chattr", "+i", *files], check=True),
            restore=lambda: subprocess.run(["chattr", "-i", *files], check=True),
        )
    finally:
        subprocess.run(["chattr", "-i", *files], check=False)
    assert failures == []  # every prediction during the outage was answered
    assert _wait_for_rows(gw, SUSPECT) == SUSPECT
    spooled = list((gw.store / "spool").rglob("*.jsonl"))
    assert spooled == []  # replayed and removed


def _postgres_up() -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], check=False
        ).returncode
        == 0
    )


def test_postgresql_outage_loses_nothing(
    gateway_factory: Callable[..., Gateway], lab: Lab, tmp_path: Path
) -> None:
    if shutil.which("pg_ctlcluster") is None or not _postgres_up():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL must run in CI for the outage test")
        pytest.skip("no PostgreSQL cluster running here (scripts/postgres-for-tests.sh starts one)")
    from alembic import command

    from core.db import alembic_config

    command.downgrade(alembic_config(POSTGRES_URL), "base")  # a clean store
    open_store(POSTGRES_URL, apply_migrations=True).dispose()
    gw = gateway_factory("gwpgout", db=POSTGRES_URL)
    try:
        failures = _stream(
            gw,
            _bodies(lab),
            outage=lambda: subprocess.run(
                ["pg_ctlcluster", "15", "main", "stop", "-m", "fast"], check=True
            ),
            restore=lambda: subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=True),
        )
    finally:
        if not _postgres_up():
            subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=False)
    assert failures == []
    assert _wait_for_rows(gw, SUSPECT) == SUSPECT
