"""`gateway serve` as an operator runs it: its own local Ray, real HTTP, real metrics port.

This starts a second Ray in a subprocess (about 15 s), so it is the one test that does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from core.db import open_store, session_factory
from core.images import encode_png
from core.metrics import EXPORTED, PENDING, PREDICTIONS, QUARANTINED, WATCHER_EXPORTED
from tests.helpers import BIN, Lab, ctrl_c, free_port, publish_pair

pytestmark = pytest.mark.integration


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} line; output so far:\n{''.join(lines)}")


def _scrape(url: str, names: list[str], timeout: float) -> str:
    """Ray exports replica metrics every few seconds; poll until every name shows."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(name in text for name in names):
            return text
        time.sleep(1.0)
    missing = [n for n in names if n not in text]
    raise AssertionError(f"{url} never exported {missing}")


def test_gateway_serve_migrates_serves_exports_metrics_and_stops_on_ctrl_c(
    tmp_path: Path, lab: Lab
) -> None:
    store = tmp_path / "store"
    sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
    publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True)
    port, metrics_port, watcher_port = free_port(), free_port(), free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("BQG_DB", "DATABASE_URL", "RAY_ADDRESS")
    }
    env.update(
        BQG_STORE=str(store),
        BQG_METRICS_PORT=str(metrics_port),
        BQG_WATCHER_METRICS_PORT=str(watcher_port),
        BQG_WATCHER_POLL_SECONDS="0.5",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [str(BIN / "gateway"), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        lines = _wait_for_line(proc, "gateway:", timeout=180)
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}" in out
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["round"] == 0
        clean = httpx.post(
            f"{url}/predict",
            content=encode_png(lab.clean[0]),
            headers={"content-type": "image/png"},
        ).json()
        assert clean["suspect"] is False and clean["round"] == 0
        trig = httpx.post(
            f"{url}/predict",
            content=encode_png(lab.triggered[0]),
            headers={"content-type": "image/png"},
        ).json()
        assert trig["suspect"] is True and trig["label"] == int(lab.good_labels[0])
        text = _scrape(
            f"http://127.0.0.1:{metrics_port}/metrics",
            [EXPORTED[PREDICTIONS], EXPORTED[QUARANTINED]],
            timeout=60,
        )
        assert any(
            line.startswith(EXPORTED[QUARANTINED]) and line.rstrip().endswith(" 1.0")
            for line in text.splitlines()
        ), "the one disagreement should be counted once"
        # the repair watcher runs beside the app and sees the one pending sample
        _scrape(
            f"http://127.0.0.1:{watcher_port}/metrics",
            [
                f"{WATCHER_EXPORTED[PENDING]} 1.0",
                'bqg_repair_rounds_total{outcome="succeeded"} 0.0',
            ],
            timeout=30,
        )
        rest = ctrl_c(proc, timeout=120)
        assert proc.returncode == 0, rest
        assert "shutting down" in rest
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_gateway_serve_with_a_broken_config_says_what_to_fix(tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: [{import_path: some.other:app}]\n")
    r = subprocess.run(
        [str(BIN / "gateway"), "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "import_path gateway.app:build_app" in r.stderr and "Traceback" not in r.stderr


def test_gateway_help_explains_serve() -> None:
    r = subprocess.run(
        [str(BIN / "gateway"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert "--db" in r.stdout and "--port" in r.stdout
