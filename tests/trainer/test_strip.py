"""Fitting STRIP on clean data, and CoDefend's round 0 (issue 32)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.bundle import load_bundle
from core.db import open_store, session_factory, transaction
from core.errors import DataError, UserError
from core.pair import read_round_manifest
from core.quarantine import NewSample, active_round, add_samples, list_rounds, round_models
from core.strip import StripParams
from tests.helpers import SHAPE, TINY_REPAIR, Lab, call_cli, make_blobs
from trainer.data import Dataset
from trainer.repair.runner import run_repair_round
from trainer.repair.selection import confident_mask
from trainer.rounds import publish_round, running_round
from trainer.splits import gate_split
from trainer.strip import (
    StripConfig,
    fit_sigma,
    fit_strip,
    overlay_pool,
    softmax_runner,
    strip_defense,
)


def test_sigma_is_the_clean_percentile_at_the_target_rate() -> None:
    h = np.arange(1, 1001, dtype=float)  # 1000 distinct entropies
    assert fit_sigma(h, 0.01) == 10.0  # exactly 10 of 1000 lie at or below it
    assert fit_sigma(h, 0.05) == 50.0
    with pytest.raises(DataError, match="needs at least 500 clean images"):
        fit_sigma(h[:400], 0.01)  # 4 expected below sigma: too few to place it


def test_the_overlay_pool_has_every_class_or_is_refused() -> None:
    data = make_blobs(200, shape=SHAPE, classes=4, seed=5)
    idx = overlay_pool(data, 8, 4, seed=0)
    assert len(set(idx.tolist())) == 8 and set(data.y[idx].tolist()) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="at least one clean overlay per class"):
        overlay_pool(data, 3, 4, seed=0)
    with pytest.raises(DataError, match="2 classes in the validation data"):
        overlay_pool(data.take(np.flatnonzero(data.y < 2)), 8, 4, seed=0)


@pytest.mark.parametrize("mode", ["add", "blend"])
def test_sigma_hits_its_frr_on_clean_images_it_was_not_fitted_on(lab: Lab, mode: str) -> None:
    bundle = load_bundle(lab.badnet)
    m = bundle.manifest
    fit_data = make_blobs(1000, shape=SHAPE, classes=4, seed=11)
    unseen = make_blobs(2000, shape=SHAPE, classes=4, seed=12)
    cfg = StripConfig(strip_overlays=16, strip_mode=mode, strip_frr=0.05)
    params = fit_strip(bundle.model, m.input, m.num_classes, fit_data, cfg)
    h = params.entropies(softmax_runner(bundle.model, m.input), unseen.x)
    frr = float(np.mean(h <= params.sigma))
    # sampling error of the fit's quantile (about 984 images) and of this estimate (2000)
    se = math.sqrt(0.05 * 0.95 / 984 + 0.05 * 0.95 / 2000)
    assert abs(frr - 0.05) <= 3 * se, (frr, params.sigma)


def _prepare(tmp_path: Path, lab: Lab, valid: Path, *extra: str) -> tuple[int, str]:
    env = {"BQG_DB": f"sqlite:///{tmp_path / 'q.db'}", "BQG_STORE": str(tmp_path / "store")}
    proc = call_cli(
        "trainer", "prepare", "--defense", "codefend", "--model", str(lab.badnet),
        "--valid", f"npz:{valid}", *extra, env=env,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def _npz(path: Path, n: int, seed: int) -> Path:
    data = make_blobs(n, shape=SHAPE, classes=4, seed=seed)
    np.savez(path, x=data.x, y=data.y)
    return path


def test_prepare_codefend_registers_the_suspect_alone_with_strip(lab: Lab, tmp_path: Path) -> None:
    valid = _npz(tmp_path / "valid.npz", 800, seed=13)
    code, out = _prepare(tmp_path, lab, valid, "--strip-overlays", "12", "--strip-frr", "0.05")
    assert code == 0, out
    assert "round 0 (codefend) is active" in out and "12 overlays" in out
    sessions = session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}"))
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and set(info.models) == {"badnet"}
        assert [m.role for m in round_models(session=s, round_no=0)] == ["badnet"]
        path = Path(info.models["badnet"].bundle_path)
    manifest = read_round_manifest(path.parent)
    strip = StripParams.from_dict(manifest.params["strip"])
    assert manifest.name == "codefend" and strip.n == 12 and strip.frr == 0.05
    report = json.loads((path.parent / "report.json").read_text())
    arrays = np.load(valid)
    rest, gate = gate_split(Dataset(arrays["x"], arrays["y"], ("0", "1", "2", "3"), "npz"))
    assert report["fit_images"] == len(rest) - 12  # the fit leaves out the gate and the pool
    assert report["gate_images"] == len(gate) > 0


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        (800, ("--strip-overlays", "3"), "at least one clean overlay per class"),
        (300, ("--strip-frr", "0.01"), "needs at least 500 clean images"),
        (800, ("--strip-overlays", "500"), "above the configured maximum of 128"),
        (800, ("--strip-mode", "xor"), "--strip-mode must be one of add, blend"),
    ],
)
def test_prepare_codefend_refuses_what_it_cannot_fit_and_registers_nothing(
    lab: Lab, tmp_path: Path, images: int, extra: tuple[str, ...], message: str
) -> None:
    valid = _npz(tmp_path / "valid.npz", images, seed=14)
    code, out = _prepare(tmp_path, lab, valid, *extra)
    assert code != 0 and message in out and "Traceback" not in out, out
    db = tmp_path / "q.db"
    if db.exists():
        with session_factory(open_store(f"sqlite:///{db}"))() as s:
            assert list_rounds(session=s) == [] and active_round(session=s) is None
    assert not (tmp_path / "store" / "rounds").exists() or not any(
        (tmp_path / "store" / "rounds").iterdir()
    )


def test_strip_config_refuses_a_bad_stage() -> None:
    with pytest.raises(UserError, match="--strip-stage must be off"):
        StripConfig(strip_stage="sometimes").validate()


def _pair_round_with_strip(tmp_path: Path, lab: Lab, stage: str) -> tuple[Any, StripParams]:
    """A store whose round 0 is the lab pair under nnoculation with STRIP beside it."""
    bad = load_bundle(lab.badnet)
    valid = make_blobs(800, shape=SHAPE, classes=4, seed=13)
    cfg = StripConfig(strip_overlays=12, strip_frr=0.05, strip_stage=stage)
    manifest, params = strip_defense("nnoculation", bad, valid, cfg)
    assert params is not None and manifest.params["strip"]["stage"] == stage
    sessions = session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}"))

    def write(out: Path) -> None:
        shutil.copytree(lab.badnet, out / "badnet")
        shutil.copytree(lab.goodnet, out / "goodnet")

    with running_round(sessions, 0):
        publish_round(
            sessions=sessions, store=tmp_path, round_no=0, write=write, metrics={},
            defense=manifest,
        )  # fmt: skip
    return sessions, params


def _quarantine(sessions: Any, lab: Lab, entropy: list[float]) -> None:
    n = len(entropy)
    samples = [
        NewSample.from_image(
            img, badnet_label=int(b), goodnet_label=int(g), served_round=0,
            detector="goodnet", strip_entropy=e,
        )
        for img, b, g, e in zip(
            lab.triggered[:n], lab.bad_labels[:n], lab.good_labels[:n], entropy, strict=True
        )
    ]  # fmt: skip
    with transaction(sessions) as s:
        add_samples(session=s, samples=samples)


def test_strip_filter_keeps_low_entropy_rows_and_the_round_carries_strip(
    tmp_path: Path, lab: Lab
) -> None:
    sessions, params = _pair_round_with_strip(tmp_path, lab, "disagreements")
    n = 40
    entropy = [0.0 if i % 4 else 9.0 for i in range(n)]  # every fourth row: above sigma
    _quarantine(sessions, lab, entropy)
    cfg = replace(TINY_REPAIR, strip_filter=True, min_kept=4)
    valid = make_blobs(800, shape=SHAPE, classes=4, seed=13)
    outcome = run_repair_round(sessions=sessions, store=tmp_path, round_no=1, valid=valid, cfg=cfg)
    assert outcome.status == "succeeded" and outcome.path is not None
    assert outcome.metrics["samples"] == n  # the filtered rows are consumed with the round
    low = lab.triggered[:n][np.array(entropy) <= params.sigma]
    assert outcome.metrics["samples_kept"] == int(
        confident_mask(load_bundle(lab.badnet), low, cfg.min_score).sum()
    )
    carried = StripParams.from_dict(read_round_manifest(outcome.path).params["strip"])
    assert np.array_equal(carried.pool, params.pool) and carried.sigma == params.sigma


def test_strip_filter_refuses_a_round_it_would_leave_empty(tmp_path: Path, lab: Lab) -> None:
    sessions, _ = _pair_round_with_strip(tmp_path, lab, "disagreements")
    _quarantine(sessions, lab, [9.0] * 20)
    cfg = replace(TINY_REPAIR, strip_filter=True, min_kept=4)
    valid = make_blobs(800, shape=SHAPE, classes=4, seed=13)
    with pytest.raises(UserError, match="--strip-filter leaves none to learn from"):
        run_repair_round(sessions=sessions, store=tmp_path, round_no=1, valid=valid, cfg=cfg)
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0]  # nothing opened


def test_prepare_nnoculation_with_strip_as_its_second_stage(lab: Lab, tmp_path: Path) -> None:
    """The GoodNet grid's CLI path, with STRIP fitted beside the pair."""
    valid = _npz(tmp_path / "valid.npz", 800, seed=13)
    env = {"BQG_DB": f"sqlite:///{tmp_path / 'q.db'}", "BQG_STORE": str(tmp_path / "store")}
    proc = call_cli(
        "trainer", "prepare", "--model", str(lab.badnet), "--valid", f"npz:{valid}",
        "--alphas", "1", "--gammas", "0.2", "--epochs", "1", "--folds", "1", "--sequential",
        "--strip-overlays", "12", "--strip-frr", "0.05", "--strip-stage", "all",
        "--seed", "3", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sessions = session_factory(open_store(env["BQG_DB"]))
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and set(info.models) == {"badnet", "goodnet"}
        path = Path(info.models["goodnet"].bundle_path).parent
    manifest = read_round_manifest(path)
    assert manifest.name == "nnoculation"
    strip = StripParams.from_dict(manifest.params["strip"])
    assert strip.n == 12 and strip.stage == "all"
