"""The whole CoDefend loop on the tiny lab, through the commands and the real app: prepare
fits STRIP beside the suspect alone, the gateway quarantines what STRIP flags, 'trainer
retrain' repairs the one model from it, and the gateway swaps to round 1 (issue 32)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.db import open_store, session_factory
from core.images import encode_png
from core.pair import read_round_manifest
from core.quarantine import active_round, pending_count
from tests.helpers import SHAPE, TARGET, Lab, call_cli, make_blobs, run_cli
from trainer.attacks.poison import build_attack

pytestmark = pytest.mark.integration
N = 24  # flagged samples before round 1


def _serve(url: str, store: Path, name: str) -> None:
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    args = GatewayArgs(db=url, store=str(store), poll_seconds=0.2, expose_members=True)
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")


def _answers(client: httpx.Client, images: np.ndarray) -> list[dict[str, object]]:
    out = []
    for img in images:
        r = client.post("/predict", content=encode_png(img), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_codefend_prepare_serve_quarantine_retrain_and_swap(
    tmp_path: Path, lab: Lab, serve_http: str
) -> None:
    from ray import serve

    valid = make_blobs(800, shape=SHAPE, classes=4, seed=13)
    np.savez(tmp_path / "valid.npz", x=valid.x, y=valid.y)
    store, url = tmp_path / "store", f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / "repair.json").write_text(
        json.dumps({"preset": "tiny", "epochs": 2, "clean_images": 64, "ca_drop": 10.0})
    )
    env = {
        "BQG_STORE": str(store),
        "BQG_DB": url,
        "BQG_VALID": f"npz:{tmp_path / 'valid.npz'}",
        "BQG_QUARANTINE_THRESHOLD": str(N),
        "BQG_REPAIR_CONFIG": str(tmp_path / "repair.json"),
    }
    prep = call_cli(
        "trainer", "prepare", "--defense", "codefend", "--model", str(lab.badnet),
        "--valid", env["BQG_VALID"], "--strip-overlays", "16", "--strip-frr", "0.05", env=env,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stdout + prep.stderr
    _serve(url, store, "codefend")
    client = httpx.Client(base_url=f"{serve_http}/codefend", timeout=60)
    attack = build_attack("patch", target=TARGET, num_classes=4, image_shape=SHAPE)
    probes = make_blobs(200, shape=SHAPE, classes=4, seed=40)
    victims = probes.x[probes.y != TARGET][:60]
    trig = attack.groups[0].apply(victims, np.random.default_rng(1))
    before = _answers(client, trig)
    assert {b["round"] for b in before} == {0}
    assert all(b["models"] == {"badnet": b["label"], "goodnet": None} for b in before)
    asr_before = np.mean([b["label"] == TARGET for b in before])
    flagged_before = np.mean([b["suspect"] for b in before])
    assert asr_before > 0.8 and flagged_before > 0.8  # the suspect obeys; STRIP sees it

    # the stream: 30% triggered blobs until N are quarantined
    stream = make_blobs(400, shape=SHAPE, classes=4, seed=41)
    rng = np.random.default_rng(2)
    poisoned = rng.random(len(stream)) < 0.3
    stream.x[poisoned] = attack.groups[0].apply(stream.x[poisoned], rng)
    _answers(client, stream.x)
    sessions = session_factory(open_store(url))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with sessions() as s:
            if pending_count(session=s) >= N:
                break
        time.sleep(0.2)

    r = run_cli("trainer", "retrain", "--round", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 1 is active" in r.stderr
    status = call_cli("trainer", "status", env=env)
    assert status.returncode == 0 and "succeeded" in status.stdout
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round == 1 and set(info.models) == {"badnet"}
        round_dir = Path(info.models["badnet"].bundle_path).parent
    manifest = read_round_manifest(round_dir)
    assert manifest.name == "codefend" and "strip" in manifest.params  # carried, refitted

    deadline = time.monotonic() + 20
    while _answers(client, trig[:1])[0]["round"] != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = _answers(client, trig)
    assert {a["round"] for a in after} == {1}
    asr_after = np.mean([a["label"] == TARGET for a in after])
    print(f"codefend loop: ASR {asr_before:.2f} -> {asr_after:.2f}, flagged {flagged_before:.2f}")
    assert asr_after < asr_before
    client.close()
    serve.delete("codefend")
