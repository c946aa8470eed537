"""``gateway demo --no-wait``, shortened: the lab's small pair instead of a Fashion-MNIST
BadNet, N = 20, the tiny CycleGAN and 3 fine-tuning epochs, so that it runs in about a minute. It is the last step
of ``make demo``; the full-size run is timed in docs/RESULTS.md."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from core.db import open_store, session_factory, transaction
from core.errors import UserError
from core.quarantine import active_round, finish_round, list_rounds, open_round
from local.demo import stream_until_swap
from tests.helpers import BIN, SHAPE, Lab, ctrl_c, free_port, make_blobs, publish_pair, run_cli
from trainer.data import save_npz


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split(None, 1)[0] == str(sid)]


def test_demo_streams_an_attack_until_round_1_serves_and_ctrl_c_stops_everything(
    tmp_path: Path, lab: Lab, fmnist_dir: Path
) -> None:
    store = tmp_path / "store"
    sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
    publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True)
    save_npz(make_blobs(200, shape=SHAPE, classes=4, seed=21), tmp_path / "valid.npz")
    # a short recipe for CI: the loop is under test here, the recipe in benchmarks/
    recipe = {"preset": "tiny", "epochs": 3, "clean_images": 100}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    env = {
        **os.environ,
        "BQG_THREADS": "1",
        "BQG_VALID": f"npz:{tmp_path / 'valid.npz'}",  # the lab pair's own kind of images
        "BQG_METRICS_PORT": str(free_port()),
        "BQG_WATCHER_METRICS_PORT": str(free_port()),
        "BQG_REPAIR_RETRY_SECONDS": "3600",
        "BQG_REPAIR_CONFIG": str(tmp_path / "recipe.json"),
    }
    args = ["--badnet", str(lab.badnet), "--store", str(store), "--threshold", "20"]
    args += ["--port", str(free_port()), "--timeout", "240"]
    proc = subprocess.Popen(
        [str(BIN / "gateway"), "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "keeps serving" in line:
                break
        out = "".join(lines)
        assert "keeps serving" in out, out[-3000:]
        assert _session_processes(proc.pid), "Ray's processes run in the demo's session"
        rest = ctrl_c(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, rest[-3000:]
    assert "shutting down" in rest
    assert "CA and ASR on the held-out split" in out
    for stage in ("BadNet alone", "gateway, round 0", "gateway, round 1"):
        assert stage in out
    assert "requests until the gateway answered from round 1 (0 errors)" in out
    summary = json.loads((store / "demo.json").read_text())
    assert summary["traffic"]["errors"] == 0 and summary["traffic"]["round_seen"] == 1
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round >= 1  # N = 20: later samples may run round 2
        assert [r.status for r in list_rounds(session=s)][:2] == ["succeeded", "succeeded"]
    time.sleep(2)
    assert _session_processes(proc.pid) == [], "Ray processes outlived the demo"


def test_demo_refuses_a_store_without_round_0(tmp_path: Path, lab: Lab) -> None:
    done = run_cli("gateway", "demo", "--badnet", str(lab.badnet), "--store", str(tmp_path))
    assert done.returncode == 2
    assert "no round is active" in done.stderr and "trainer prepare" in done.stderr
    assert "Traceback" not in done.stderr


def test_streaming_stops_with_the_reason_when_the_round_is_rejected(
    tmp_path: Path, lab: Lab
) -> None:
    """No waiting out the timeout: a rejected round ends the stream with the gate's numbers."""
    store = tmp_path / "store"
    sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
    publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True)
    with transaction(sessions) as s:
        open_round(session=s, round_no=1, owner="test")
    with transaction(sessions) as s:
        gate = {"served clean accuracy": {"before": 0.91, "after": 0.85}}
        finish_round(
            session=s, round_no=1, status="rejected", samples_used=20, metrics={"gate": gate}
        )
    images = np.stack([lab.clean[0]] * 4)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every request is an error
    out = io.StringIO()
    started = time.monotonic()
    with pytest.raises(
        UserError, match=r"round 1 was rejected .*served clean accuracy 91.00% -> 85.00%"
    ):
        stream_until_swap(
            url,
            images,
            np.zeros(4, bool),
            sessions,
            threshold=20,
            clients=1,
            rate=20,
            timeout=60,
            out=out,
        )
    assert time.monotonic() - started < 10
