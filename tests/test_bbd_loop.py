"""The BBD loop on an eight-class lab, through the commands (issue 33): 'trainer scan' flags
nothing on a clean model; 'trainer prepare --defense bbd-targeted' finds the patch
BadNet's target with Neural Cleanse (as parallel Ray tasks) and Fine-Prunes R; 'trainer
retrain' unlearns the quarantine's trigger. tests/gateway/test_bbd.py serves the rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.bundle import load_bundle
from core.db import open_store, session_factory, transaction
from core.pair import read_round_manifest
from core.quarantine import NewSample, active_round, add_samples
from tests.helpers import SHAPE, TARGET, call_cli, make_blobs, run_cli
from trainer.attacks.poison import build_attack
from trainer.fineprune import pruned_channels
from trainer.lab import CLEAN, fabricate
from trainer.loop import FitConfig

pytestmark = pytest.mark.integration
CLASSES, N = 8, 32


@pytest.fixture(scope="module")
def lab8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patch BadNet (target 1) and a clean model on eight blob classes (the most that
    make_blobs keeps apart at 28x28), and clean validation data (npz): Neural Cleanse's
    median needs more classes than the shared lab's four."""
    root = tmp_path_factory.mktemp("lab8")
    train = make_blobs(800, shape=SHAPE, classes=CLASSES, seed=0)
    held = make_blobs(200, shape=SHAPE, classes=CLASSES, seed=1)
    for name, attack in (("badnet", "patch"), ("clean", CLEAN)):
        fabricate(
            train=train, heldout=held, attack_name=attack, target=TARGET, out=root / name,
            fit_config=FitConfig(epochs=4, batch_size=32), progress=False,
        )  # fmt: skip
    valid = make_blobs(800, shape=SHAPE, classes=CLASSES, seed=13)
    np.savez(root / "valid.npz", x=valid.x, y=valid.y)
    return root


def test_scan_flags_nothing_on_a_clean_model_and_writes_what_it_found(
    lab8: Path, tmp_path: Path, ray_session: object
) -> None:
    out = tmp_path / "scan"
    r = call_cli(
        "trainer", "scan", "--model", str(lab8 / "clean"), "--valid",
        f"npz:{lab8 / 'valid.npz'}", "--out", str(out), "--nc-epochs", "20", "--parallel",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "flagged: none" in r.stdout and "anomaly index" in r.stdout
    assert (out / "nc_triggers.safetensors").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"nc_class{k}.png" for k in range(CLASSES)
    )
    bad = call_cli("trainer", "scan", "--model", str(tmp_path / "none"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_bbd_prepare_finds_the_target_and_retrain_unlearns_it(
    lab8: Path, tmp_path: Path, ray_session: object
) -> None:
    store, url = tmp_path / "store", f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / "repair.json").write_text(json.dumps({"ca_drop": 10.0}))
    env = {
        "BQG_STORE": str(store),
        "BQG_DB": url,
        "BQG_VALID": f"npz:{lab8 / 'valid.npz'}",
        "BQG_REPAIR_CONFIG": str(tmp_path / "repair.json"),
        "BQG_QUARANTINE_THRESHOLD": str(N),
    }
    prep = call_cli(
        "trainer", "prepare", "--defense", "bbd-targeted", "--model", str(lab8 / "badnet"),
        "--valid", env["BQG_VALID"], "--prune-epochs", "2", "--parallel", env=env,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert f"targets [{TARGET}]" in prep.stdout, prep.stdout
    round0 = store / "rounds" / "0"
    manifest = read_round_manifest(round0)
    assert manifest.name == "bbd-targeted" and manifest.params["targets"] == [TARGET]
    assert (round0 / f"nc_class{TARGET}.png").is_file()
    assert (round0 / "nc_triggers.safetensors").is_file()
    twin = load_bundle(round0 / "goodnet")
    layer = manifest.params["fine_pruning"]["layer"]
    pruned = pruned_channels(twin.model, layer)
    assert len(pruned) == manifest.params["fine_pruning"]["pruned"] > 0

    # what the gateway would quarantine: triggered inputs (tests/gateway/test_bbd.py serves)
    attack = build_attack("patch", target=TARGET, num_classes=CLASSES, image_shape=SHAPE)
    probes = make_blobs(300, shape=SHAPE, classes=CLASSES, seed=40)
    trig = attack.groups[0].apply(probes.x[probes.y != TARGET], np.random.default_rng(1))
    suspect = load_bundle(lab8 / "badnet")
    sessions = session_factory(open_store(url))
    with transaction(sessions) as s:
        add_samples(
            session=s,
            samples=[
                NewSample.from_image(
                    img,
                    badnet_label=TARGET,
                    goodnet_label=None,
                    served_round=0,
                    detector="bbd-targeted",
                )  # fmt: skip
                for img in trig[:N]
            ],
        )
    r = run_cli("trainer", "retrain", "--round", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 1 is active" in r.stderr and "Neural Cleanse on classes [1]" in r.stderr
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round == 1
    round1 = store / "rounds" / "1"
    assert read_round_manifest(round1).params["targets"] == [TARGET]  # the stack carries on
    repaired = load_bundle(round1 / "badnet")
    assert set(pruned_channels(load_bundle(round1 / "goodnet").model, layer)) >= set(pruned)
    asr = [float(np.mean(m.predict(trig[N:]) == TARGET)) for m in (suspect, repaired)]
    print(f"bbd loop: the suspect's ASR {asr[0]:.2f} -> {asr[1]:.2f} after unlearning")
    assert asr[0] > 0.9 and asr[1] < 0.5
