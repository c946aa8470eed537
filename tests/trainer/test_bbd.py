"""Fine-Pruning, Neural Cleanse's anomaly index, and the bad input BBD's steps refuse."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.bundle import load_bundle, save_bundle
from core.errors import UserError
from core.nets import build_model
from tests.helpers import Lab, call_cli, make_blobs, spec_for
from trainer.cleanse import BBDConfig
from trainer.fineprune import (
    Budget,
    conv_layers,
    fine_prune,
    mean_activations,
    prune_until,
    pruned_channels,
    resolve_layer,
)
from trainer.loop import FitConfig, predict
from trainer.neural_cleanse import CONSISTENCY, anomaly_indices, flagged_classes

SHAPE = (28, 28, 1)


def test_pruned_channels_stay_zero_through_fine_tuning_and_the_bundle(
    lab: Lab, tmp_path: Path
) -> None:
    bad = load_bundle(lab.badnet)
    spec = bad.manifest.input
    valid = make_blobs(400, shape=SHAPE, classes=4, seed=5)
    layer = resolve_layer(bad.model, spec, None)
    assert layer == conv_layers(bad.model, spec)[-1] == "features.3"
    pruned = fine_prune(
        bad.model,
        spec,
        valid,
        layer=None,
        budget=Budget(4.0),
        fit_cfg=BBDConfig(prune_epochs=2).prune_fit(),
    )
    channels = pruned.channels
    assert 0 < len(channels) < 64
    assert pruned.record["prune_ratio"] == pytest.approx(len(channels) / 64)
    # the drop rule: the pruned model is within 4 points on the data it was measured on
    assert 100 * (pruned.record["accuracy_before"] - pruned.record["accuracy_pruned"]) <= 4
    assert sorted(pruned_channels(pruned.model, layer)) == sorted(channels)
    assert not any(p.requires_grad is False for p in pruned.model.parameters())
    m = bad.manifest
    save_bundle(
        pruned.model, tmp_path / "r", arch=m.arch, arch_kwargs=m.arch_kwargs,
        class_names=m.class_names, input_spec=spec,
    )  # fmt: skip
    again = load_bundle(tmp_path / "r")
    assert again.manifest.weights_sha256 != m.weights_sha256
    assert sorted(pruned_channels(again.model, layer)) == sorted(channels)
    acts = mean_activations(again.model, spec, layer, valid.x)
    assert np.all(acts[channels] == 0) and acts.sum() > 0
    # the original suspect is untouched
    assert pruned_channels(bad.model, layer) == []


def test_a_batchnorm_after_the_pruned_conv_is_zeroed_too() -> None:
    spec = spec_for((32, 32, 3))
    model = build_model(
        "color-cnn", {"in_channels": 3, "num_classes": 4, "height": 32, "width": 32}
    )
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.fill_(0.3)  # a live channel even when its conv is zero
    data = make_blobs(16, shape=(32, 32, 3), classes=4, seed=0)
    pruned = fine_prune(
        model, spec, data, layer="features.17", budget=Budget(100.0), fit_cfg=FitConfig(epochs=1)
    )
    assert len(pruned.channels) == 127  # all but one: the layer must pass something on
    acts = mean_activations(pruned.model, spec, "features.17", data.x)
    assert np.all(acts[pruned.channels] == 0)


def test_a_targeted_twin_is_pruned_until_its_false_rejection_budget(lab: Lab) -> None:
    bad = load_bundle(lab.badnet)
    spec = bad.manifest.input
    valid = make_blobs(400, shape=SHAPE, classes=4, seed=5)
    layer = resolve_layer(bad.model, spec, None)
    model = copy.deepcopy(bad.model)
    budget = Budget(4.0, frr=0.02, targets=(1,))
    channels, record = prune_until(model, spec, layer, valid, budget)
    assert sorted(channels) == pruned_channels(model, layer) and len(channels) > 0
    rates = [r for _, r in record["curve"]]
    assert max(rates[: len(channels)]) <= 0.02  # every accepted step within the budget
    if len(rates) > len(channels):  # the step that broke it was undone
        assert rates[len(channels)] > 0.02
    suspect = bad.predict(valid.x)
    now = predict(model, valid.x, spec)
    assert np.mean((suspect == 1) & (now != suspect)) <= 0.02


@pytest.mark.parametrize(
    ("layer", "drop", "message"),
    [
        ("features.99", 4.0, "not a module"),
        ("classifier.0", 4.0, "is a Linear, not a Conv2d"),
        (None, 101.0, "0 to 100"),
        (None, -1.0, "0 to 100"),
    ],
)
def test_fine_pruning_refuses_bad_input(
    lab: Lab, layer: str | None, drop: float, message: str
) -> None:
    bad = load_bundle(lab.badnet)
    valid = make_blobs(64, shape=SHAPE, classes=4, seed=5)
    with pytest.raises(UserError, match=message):
        fine_prune(
            bad.model,
            bad.manifest.input,
            valid,
            layer=layer,
            budget=Budget(drop),
            fit_cfg=FitConfig(),
        )


def test_a_model_without_a_convolution_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4))
    with pytest.raises(UserError, match="runs no 2-D convolution"):
        resolve_layer(model, spec_for(SHAPE), None)


def test_the_bbd_settings_refuse_a_prune_amount_outside_0_to_100() -> None:
    with pytest.raises(UserError, match="--prune-drop"):
        BBDConfig(prune_drop=150).validate()
    with pytest.raises(UserError, match="--prune-frr"):
        BBDConfig(prune_frr=1.5).validate()
    with pytest.raises(UserError, match="--unlearn-fraction"):
        BBDConfig(unlearn_fraction=0).validate()


def test_the_anomaly_index_on_hand_made_norms() -> None:
    l1 = [10.0, 50, 52, 48, 51, 49, 53, 47, 50, 50]
    # median 50; |L1 - 50| = 40, 0, 2, 2, 1, 1, 3, 3, 0, 0 -> their median 1.5
    index = anomaly_indices(l1)
    assert index[0] == pytest.approx(40 / (CONSISTENCY * 1.5))
    assert index[6] == pytest.approx(3 / (CONSISTENCY * 1.5))
    assert flagged_classes(l1) == [0]
    # a large trigger is anomalous too, but above the median: not a backdoor
    assert flagged_classes([90.0, 50, 52, 48, 51, 49, 53, 47, 50, 50]) == []
    # no spread: nothing stands out; an unreached class (inf) is never flagged
    assert list(anomaly_indices([5.0, 5, 5])) == [0, 0, 0]
    assert flagged_classes([np.inf, 50, 52, 48, 51, 10]) == [5]


def test_status_says_when_a_targeted_round_runs_untargeted() -> None:
    from core.defenses.bbd import NO_TARGETS
    from core.schema import RepairRound
    from trainer.cli.rounds import _round_row

    row = RepairRound(round=0, status="succeeded", samples_used=0, metrics={"note": NO_TARGETS})
    assert _round_row(row, 0)[-1] == NO_TARGETS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "features.99"], "not a module"),
        (["--prune-drop", "150"], "--prune-drop"),
        (["--nc-epochs", "0"], "--nc-epochs"),
    ],
)
def test_prepare_refuses_bad_bbd_input_and_registers_nothing(
    lab: Lab, tmp_path: Path, args: list[str], message: str
) -> None:
    valid = make_blobs(400, shape=SHAPE, classes=4, seed=13)
    np.savez(tmp_path / "valid.npz", x=valid.x, y=valid.y)
    env = {"BQG_STORE": str(tmp_path / "store"), "BQG_DB": f"sqlite:///{tmp_path / 'q.db'}"}
    r = call_cli(
        "trainer", "prepare", "--defense", "bbd-targeted", "--model", str(lab.badnet),
        "--valid", f"npz:{tmp_path / 'valid.npz'}", *args, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "store" / "rounds" / "0").exists()
    status = call_cli("trainer", "status", env=env)
    assert "round" in status.stdout and "succeeded" not in status.stdout


def test_prepare_refuses_a_model_with_no_convolution(tmp_path: Path) -> None:
    from tests.plugins.linear_net import LinearNet

    spec = spec_for(SHAPE)
    save_bundle(
        LinearNet(num_classes=4), tmp_path / "linear", arch="tests.plugins.linear_net:LinearNet",
        arch_kwargs={"num_classes": 4}, class_names=list("abcd"), input_spec=spec,
    )  # fmt: skip
    valid = make_blobs(400, shape=SHAPE, classes=4, seed=13)
    np.savez(tmp_path / "valid.npz", x=valid.x, y=valid.y)
    env = {
        "BQG_STORE": str(tmp_path / "store"),
        "BQG_DB": f"sqlite:///{tmp_path / 'q.db'}",
        "BQG_TRUSTED_ARCH_MODULES": '["tests.plugins.linear_net"]',
    }
    r = call_cli(
        "trainer", "prepare", "--defense", "bbd-untargeted", "--model", str(tmp_path / "linear"),
        "--valid", f"npz:{tmp_path / 'valid.npz'}", env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "runs no 2-D convolution" in r.stderr, r.stderr
    assert not (tmp_path / "store" / "rounds" / "0").exists()


def test_lambda_follows_the_original_schedule() -> None:
    from trainer.neural_cleanse import CleanseConfig, _Schedule

    state = _Schedule(CleanseConfig(patience=2, init_cost=1e-3))
    mask, pattern = torch.ones(2, 2, 1), torch.zeros(2, 2, 1)
    for _ in range(2):  # lambda stays 0 until the attack succeeds `patience` epochs running
        assert state.cost == 0 and not state.step(1.0, 10.0, mask, pattern)
    assert state.cost == 1e-3 and state.best_l1 == 10.0
    state.step(1.0, 9.0, mask, pattern)
    state.step(1.0, 9.5, mask, pattern)  # two successes: doubled; the smaller mask is kept
    assert state.cost == 2e-3 and state.best_l1 == 9.0
    state.step(0.5, 3.0, mask, pattern)
    state.step(0.5, 3.0, mask, pattern)  # two failures: divided by 2^1.5; not kept
    assert state.cost == pytest.approx(2e-3 / 2**1.5) and state.best_l1 == 9.0
    stopped = [state.step(0.5, 3.0, mask, pattern) for _ in range(10)]
    assert stopped.index(True) == 6  # the 10th (5 x patience) epoch since the mask of 9.0


def test_a_colour_search_stamps_and_the_files_round_trip(tmp_path: Path) -> None:
    from core.errors import BundleError
    from trainer.cleanse import load_triggers, save_triggers
    from trainer.neural_cleanse import CleanseConfig, reverse_trigger

    shape = (32, 32, 3)
    model = build_model(
        "color-cnn", {"in_channels": 3, "num_classes": 4, "height": 32, "width": 32}
    )
    data = make_blobs(64, shape=shape, classes=4, seed=0)
    found = reverse_trigger(model, spec_for(shape), data.x, 2, CleanseConfig(epochs=2, steps=2))
    assert found.mask.shape == (32, 32) and found.pattern.shape == (32, 32, 3)
    assert found.mask.min() >= 0 and found.mask.max() <= 1 and found.epochs == 2
    stamped = found.stamp(data.x[:5])
    assert stamped.shape == (5, 32, 32, 3) and stamped.dtype == np.uint8
    assert all(p.requires_grad for p in model.parameters())  # the search froze a copy's flags only
    sha = save_triggers(tmp_path, [found])
    (again,) = load_triggers(tmp_path, sha, [2])
    assert np.array_equal(again.mask, found.mask) and (tmp_path / "nc_class2.png").is_file()
    with pytest.raises(BundleError, match="does not match"):
        load_triggers(tmp_path, "0" * 64, [2])


def test_repairers_read_the_rounds_settings_strictly() -> None:
    from core.pair import ModelPair, RoundDefense
    from trainer.repair.bbd import bbd_config, majority_label

    for bad in ({"bbd": {"prune_drop": "x"}}, {"bbd": {"nope": 1}}, {"bbd": {"prune_drop": 500}}):
        p = ModelPair.__new__(ModelPair)  # bbd_config reads only .round and .defense
        object.__setattr__(p, "round", 3)
        object.__setattr__(p, "defense", RoundDefense("bbd-targeted", bad))
        with pytest.raises(UserError, match="round 3"):
            bbd_config(p)
    assert majority_label(np.array([2, 1, 2, 1, 0])) == 1 and majority_label(np.array([])) is None


def test_an_untargeted_round_is_fine_pruned_again_on_repair(lab: Lab, tmp_path: Path) -> None:
    from core.db import open_store, session_factory
    from tests.helpers import TINY_REPAIR, quarantine_lab
    from trainer.bbd import prepare_bbd_round
    from trainer.repair.runner import run_repair_round

    sessions = session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}"))
    valid = make_blobs(400, shape=SHAPE, classes=4, seed=21)
    report, round0 = prepare_bbd_round(
        defense="bbd-untargeted", suspect_dir=lab.badnet, suspect=load_bundle(lab.badnet),
        valid=valid, bbd=BBDConfig(prune_epochs=1), sessions=sessions, store=tmp_path,
        targeted=False,
    )  # fmt: skip
    assert "targets" not in report and report["gate_frr"] is not None
    layer = report["fine_pruning"]["layer"]
    before = pruned_channels(load_bundle(round0 / "goodnet").model, layer)
    quarantine_lab(sessions, lab, 20)
    outcome = run_repair_round(
        sessions=sessions, store=tmp_path, round_no=1, valid=valid, cfg=TINY_REPAIR
    )
    assert outcome.status == "succeeded" and outcome.path is not None
    assert outcome.metrics["fine_pruning_round"]["pruned"] >= len(before)
    after = pruned_channels(load_bundle(outcome.path / "goodnet").model, layer)
    assert set(after) >= set(before)
    suspect = load_bundle(outcome.path / "badnet").manifest.weights_sha256
    assert suspect == load_bundle(lab.badnet).manifest.weights_sha256  # the suspect stays
