"""`gateway serve` as an operator runs it: its own local Ray, real HTTP, real metrics port.

This starts a second Ray in a subprocess (about 15 s), so it is the one test that does.
"""

from __future__ import annotations

import os
import re
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


LOOPBACK = ("127.0.0.1", "[::1]", "::1")


def _listening(sid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket that the processes of session
    ``sid`` (the gateway, its Ray and Ray's workers) listen on, from ``ss``."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    pids = {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in ss.splitlines():
        fields = line.split()
        owners = [(name, int(pid)) for name, pid in re.findall(r'"([^"]+)",pid=(\d+)', line)]
        if any(pid in pids for _, pid in owners):
            addr, _, port = fields[3].rpartition(":")
            found.append((addr, int(port), ",".join(name for name, _ in owners)))
    return found


def _is_ray(process: str) -> bool:
    """A process of Ray's own: its daemons, workers and the driver's core worker."""
    return all(
        name.startswith("ray::") or name in ("raylet", "gcs_server", "python", "gateway")
        for name in process.split(",")
    )


def _ray_refuses_a_client_without_the_token(gcs_port: int, tmp_path: Path) -> None:
    """A Ray client that reaches the GCS port without the cluster's token is refused; the
    same client with the token (from the operator's HOME) gets in."""
    code = (
        f"import ray; ray.init(address='127.0.0.1:{gcs_port}', log_to_driver=False); "
        "print('joined', ray.cluster_resources().get('CPU'))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "HOME"}
    base["RAY_AUTH_MODE"] = "token"
    stranger = subprocess.run(
        [str(BIN / "python"), "-c", code],
        capture_output=True, text=True, timeout=120, env={**base, "HOME": str(tmp_path / "x")},
    )  # fmt: skip
    assert stranger.returncode != 0 and "joined" not in stranger.stdout, stranger.stdout
    operator = subprocess.run(
        [str(BIN / "python"), "-c", code],
        capture_output=True, text=True, timeout=120, env={**base, "HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert operator.returncode == 0 and "joined" in operator.stdout, operator.stderr[-2000:]


def test_gateway_serve_migrates_serves_exports_metrics_and_stops_on_ctrl_c(
    tmp_path: Path, lab: Lab
) -> None:
    store = tmp_path / "store"
    sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
    publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True)
    port, metrics_port, watcher_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BQG_DB", "DATABASE_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    }
    env.update(  # as an operator runs it: Ray's token authentication on, its token in HOME
        HOME=str(tmp_path / "home"),
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
        # The ports this project opens listen on loopback. Ray's own gRPC servers and its
        # metrics exporter bind every interface (Ray 2.60 resolves 127.0.0.1 to the node's
        # reachable address and has no setting against it): token authentication is what
        # guards them, shown on the GCS below (docs/OPERATIONS.md, "Closed by default").
        sockets = _listening(proc.pid)
        ours = [(addr, p) for addr, p, _ in sockets if p in (port, watcher_port)]
        assert sorted(p for _, p in ours) == sorted({port, watcher_port}), sockets
        assert all(addr in LOOPBACK for addr, _ in ours), sockets
        strangers = [name for _, p, name in sockets if p not in (port, watcher_port)]
        assert all(_is_ray(name) for name in strangers), sockets
        gcs = [port for _, port, name in sockets if "gcs_server" in name]
        assert gcs, sockets
        _ray_refuses_a_client_without_the_token(gcs[0], tmp_path)
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
