"""Pre-deployment: the noise operation, the paper's selection rule, and round 0 in the store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import load_bundle, read_manifest
from core.db import open_store, session_factory
from core.errors import DataError, UserError
from core.quarantine import active_round, list_rounds
from tests.helpers import make_blobs
from trainer.data import Dataset
from trainer.grid import Candidate, TrainJob, retraining_targets, run_sequential
from trainer.lab import fabricate
from trainer.loop import FitConfig, predict
from trainer.noise import add_noise
from trainer.prepare import (
    PrepareConfig,
    goodnet_from,
    grid_search,
    prepare_round_zero,
    select_goodnet,
)
from trainer.splits import cross_fit_splits, gate_split, split_record


@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.6])
def test_noise_replaces_about_gamma_of_the_cells_around_128(gamma: float) -> None:
    x = np.full((400, 28, 28, 1), 3, dtype=np.uint8)
    out = add_noise(x, gamma=gamma, seed=1)
    cells = out.reshape(400, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(400, 16, 49)
    changed = (cells != 3).mean(axis=2)  # per cell: fraction of its pixels changed
    replaced = changed > 0.8
    untouched = changed == 0.0
    assert (replaced | untouched).all()  # whole 7x7 cells, never a part
    assert replaced.mean() == pytest.approx(gamma, abs=0.03)
    values = cells[replaced].astype(float)
    assert values.mean() == pytest.approx(128, abs=3) and values.std() == pytest.approx(
        0.4 * 128, abs=4
    )
    assert np.array_equal(
        add_noise(x[:5], gamma=gamma, seed=1), add_noise(x[:5], gamma=gamma, seed=1)
    )


# NNoculation Table 2 (BadNet-FSA): baseline CA 91.34%, theta = 3; the paper picks alpha 0.004, gamma 60%.
TABLE_2 = {
    0.001: [92.55, 93.3, 93.39, 92.09, 92.46, 93.58],
    0.003: [86.79, 88.27, 88.46, 90.41, 89.02, 88.46],
    0.004: [85.3, 87.53, 85.3, 86.04, 87.06, 88.46],
    0.005: [81.86, 80.0, 87.72, 81.39, 82.13, 86.13],
    0.006: [83.9, 81.48, 83.72, 82.41, 83.62, 84.65],
}


def _table_2() -> list[Candidate]:
    return [
        Candidate(alpha=a, lr=a, gamma=(i + 1) / 10, clean_accuracy=ca / 100, seconds=0.0)
        for a, cas in TABLE_2.items()
        for i, ca in enumerate(cas)
    ]


def test_selection_reproduces_table_2() -> None:
    selection = select_goodnet(_table_2(), suspect_accuracy=0.9134, ca_drop=3.0)
    assert selection.qualified
    assert (selection.candidate.alpha, selection.candidate.gamma) == (0.004, 0.6)
    # theta = 1 point: at alpha 0.003 only gamma 40% (90.41%) stays above 90.34%
    tight = select_goodnet(_table_2(), suspect_accuracy=0.9134, ca_drop=1.0)
    assert (tight.candidate.alpha, tight.candidate.gamma) == (0.003, 0.4)
    # theta = 0: only alpha 0.001 keeps the baseline; its largest gamma is 60%
    zero = select_goodnet(_table_2(), suspect_accuracy=0.9134, ca_drop=0.0)
    assert (zero.candidate.alpha, zero.candidate.gamma) == (0.001, 0.6)


def test_selection_without_a_qualified_candidate_keeps_the_smallest_drop() -> None:
    selection = select_goodnet(_table_2(), suspect_accuracy=0.99, ca_drop=3.0)
    assert not selection.qualified and selection.candidate.clean_accuracy == pytest.approx(0.9358)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suspect") / "badnet"
    data = make_blobs(400, shape=(28, 28, 1), classes=4)
    fabricate(
        train=data,
        heldout=make_blobs(100, shape=(28, 28, 1), classes=4, seed=3),
        attack_name="patch",
        target=1,
        out=out,
        fit_config=FitConfig(epochs=2, batch_size=32),
        progress=False,
    )
    return out


SMALL = PrepareConfig(alphas=(1.0, 4.0), gammas=(0.2, 0.5), epochs=1, batch_size=32)


def _valid() -> Dataset:
    return make_blobs(120, shape=(28, 28, 1), classes=4, seed=9)


def _store(tmp_path: Path) -> sessionmaker[Session]:
    return session_factory(open_store(f"sqlite:///{tmp_path / 'q.db'}"))


def test_prepare_registers_and_activates_round_zero(suspect: Path, tmp_path: Path) -> None:
    sessions = _store(tmp_path)
    result, path = prepare_round_zero(
        suspect_dir=suspect,
        suspect=load_bundle(suspect),
        valid=_valid(),
        cfg=SMALL,
        sessions=sessions,
        store=tmp_path,
    )
    assert len(result.candidates) == 4 and result.selection.candidate in result.candidates
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round == 0
        assert info.models["badnet"].sha256 == read_manifest(suspect).weights_sha256  # unchanged
        assert info.models["goodnet"].sha256 == read_manifest(path / "goodnet").weights_sha256
        (row,) = list_rounds(session=s)
        assert (
            row.status == "succeeded" and row.metrics["gamma"] == result.selection.candidate.gamma
        )
    goodnet = load_bundle(path / "goodnet")
    assert goodnet.manifest.meta["selection"]["chosen"]["alpha"] == result.selection.candidate.alpha
    # the gate split it left out, as a repair round checks it, and its accuracy there
    assert goodnet.manifest.meta["gate_split"] == split_record(gate_split(_valid())[1], 0.2)
    gate_ca = result.gate_accuracy["goodnet"]
    assert goodnet.manifest.meta["metrics"]["clean_accuracy_gate"] == gate_ca
    assert row.metrics["clean_accuracy_goodnet"] == gate_ca
    assert (path / "report.json").is_file() and (path / "grid_ca.png").stat().st_size > 1000
    # a second prepare into the same store is refused and changes nothing
    with pytest.raises(UserError, match="round 0 already exists"):
        prepare_round_zero(
            suspect_dir=suspect,
            suspect=load_bundle(suspect),
            valid=_valid(),
            cfg=SMALL,
            sessions=sessions,
            store=tmp_path,
        )
    assert read_manifest(path / "goodnet").weights_sha256 == goodnet.manifest.weights_sha256


def _bad_valid(kind: str) -> Dataset:
    v = _valid()
    if kind == "shape":
        return Dataset(np.zeros((50, 32, 32, 3), np.uint8), v.y[:50], v.class_names, "rgb")
    if kind == "classes":
        return Dataset(v.x, (v.y + 3).astype(np.int64), v.class_names, "shifted")
    return v.take(slice(0, 0))


@pytest.mark.parametrize(
    ("valid_kind", "cfg", "error", "message"),
    [
        ("shape", SMALL, DataError, "validation images are 32x32x3, but the model expects 28x28x1"),
        ("classes", SMALL, DataError, "has label 6, but the model has 4 classes"),
        ("empty", SMALL, DataError, "holds no images"),
        (None, PrepareConfig(ca_drop=-1), UserError, "must be 0 or more"),
        (None, PrepareConfig(alphas=()), UserError, "no candidates"),
        (None, PrepareConfig(gammas=(0.0,)), UserError, r"in \(0, 1\]"),
        (None, PrepareConfig(folds=0), UserError, "folds must be 1"),
        (None, PrepareConfig(distill=1.5), UserError, "distill is a weight"),
        (None, PrepareConfig(augment=("rotate",)), UserError, "unknown augmentation rotate"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    suspect: Path,
    tmp_path: Path,
    valid_kind: str | None,
    cfg: PrepareConfig,
    error: type[Exception],
    message: str,
) -> None:
    sessions = _store(tmp_path)
    valid = _bad_valid(valid_kind) if valid_kind else _valid()
    with pytest.raises(error, match=message):
        prepare_round_zero(
            suspect_dir=suspect,
            suspect=load_bundle(suspect),
            valid=valid,
            cfg=cfg,
            sessions=sessions,
            store=tmp_path,
        )
    with sessions() as s:
        assert list_rounds(session=s) == []
    assert not (tmp_path / "rounds").exists()


def test_grid_search_uses_only_the_defender_inputs(suspect: Path) -> None:
    """The signature is the claim: a suspect bundle and clean data, no attack anywhere."""
    import inspect

    params = set(inspect.signature(grid_search).parameters)
    assert params == {"suspect", "valid", "cfg", "base_lr", "runner", "on_candidate", "keep_states"}
    result = grid_search(load_bundle(suspect), _valid(), SMALL, runner=run_sequential)
    assert {(c.alpha, c.gamma) for c in result.candidates} == {
        (1.0, 0.2),
        (1.0, 0.5),
        (4.0, 0.2),
        (4.0, 0.5),
    }
    assert all(
        c.lr == pytest.approx(c.alpha * 1e-3) for c in result.candidates
    )  # the suspect's recorded base rate


@pytest.mark.integration
def test_ray_runner_gives_the_same_grid_as_the_sequential_one(
    suspect: Path, ray_session: object
) -> None:
    import torch

    from trainer.grid import run_ray

    bundle = load_bundle(suspect)
    parallel = grid_search(bundle, _valid(), SMALL, runner=run_ray)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks train with one thread each; match it for equality
    try:
        sequential = grid_search(bundle, _valid(), SMALL, runner=run_sequential)
    finally:
        torch.set_num_threads(threads)
    assert parallel.runner == "ray" and sequential.runner == "sequential"
    key = lambda r: [(c.alpha, c.gamma, c.clean_accuracy) for c in r.candidates]  # noqa: E731
    assert key(parallel) == key(sequential)
    assert parallel.selection.candidate.alpha == sequential.selection.candidate.alpha


@pytest.mark.parametrize("folds", [2, 3])
def test_cross_fitting_scores_every_image_once_and_never_on_its_own_training(folds: int) -> None:
    valid = _valid()
    splits = cross_fit_splits(valid, folds=folds, holdout_fraction=0.2, seed=0)
    assert len(splits) == folds
    scored = np.concatenate([hold.x.reshape(len(hold), -1) for _, hold in splits])
    assert len(scored) == len(valid)
    assert len({row.tobytes() for row in scored}) == len(
        {r.tobytes() for r in valid.x.reshape(len(valid), -1)}
    )
    for train, hold in splits:
        assert len(train) + len(hold) == len(valid)
        train_rows = {r.tobytes() for r in train.x.reshape(len(train), -1)}
        assert not any(r.tobytes() in train_rows for r in hold.x.reshape(len(hold), -1))
        # stratified: each class is split about evenly across the folds
        for label in np.unique(valid.y):
            share = (hold.y == label).sum() / (valid.y == label).sum()
            assert share == pytest.approx(1 / folds, abs=0.1)


def test_one_fold_is_the_single_holdout() -> None:
    ((train, hold),) = cross_fit_splits(_valid(), folds=1, holdout_fraction=0.25, seed=0)
    assert len(hold) == 30 and len(train) == 90


def test_distillation_targets_come_from_the_suspect_on_clean_images_only(suspect: Path) -> None:
    bundle = load_bundle(suspect)
    valid = _valid()
    job = TrainJob(
        arch=bundle.manifest.arch,
        arch_kwargs=bundle.manifest.arch_kwargs,
        spec=bundle.manifest.input,
        state={},
        x_train=valid.x,
        y_train=valid.y,
        x_hold=valid.x[:0],
        y_hold=valid.y[:0],
        fit=FitConfig(),
        alpha=1.0,
        gamma=0.3,
        distill=0.5,
    )
    y = np.concatenate([valid.y, valid.y])  # clean copies, then their noisy copies
    targets = retraining_targets(bundle.model, job, y)
    n = len(valid)
    assert targets.shape == (2 * n, 4)
    assert np.allclose(targets.sum(1), 1.0, atol=1e-5)
    teacher = bundle.logits(valid.x).softmax(1).numpy()  # on the clean images
    expected = 0.5 * teacher + 0.5 * np.eye(4, dtype=np.float32)[valid.y]
    assert np.allclose(targets[:n], expected, atol=1e-5)
    assert np.allclose(targets[n:], expected, atol=1e-5)  # a noisy copy: its clean original's
    assert retraining_targets(bundle.model, replace(job, distill=0.0), y) is y  # the paper's


def test_the_margin_refuses_a_drop_that_is_within_theta_only_by_luck() -> None:
    lucky = Candidate(alpha=4.0, lr=4e-3, gamma=0.6, clean_accuracy=0.885, seconds=0, drop_se=0.01)
    safe = Candidate(alpha=2.0, lr=2e-3, gamma=0.6, clean_accuracy=0.900, seconds=0, drop_se=0.01)
    paper = select_goodnet([lucky, safe], suspect_accuracy=0.91, ca_drop=3.0)
    assert paper.candidate is lucky  # drop 2.5 <= 3
    careful = select_goodnet([lucky, safe], suspect_accuracy=0.91, ca_drop=3.0, margin_se=1.0)
    assert careful.candidate is safe  # 2.5 + 1 SE > 3, but 1 + 1 <= 3


def test_grid_candidates_carry_a_paired_standard_error(suspect: Path) -> None:
    result = grid_search(load_bundle(suspect), _valid(), SMALL, runner=run_sequential)
    for c in result.candidates:
        assert 0.0 <= c.drop_se <= 0.1
    assert result.config["scored_size"] == 120  # every image scored once


def test_refit_trains_the_goodnet_on_every_validation_image_but_the_gate_split(
    suspect: Path,
) -> None:
    bundle = load_bundle(suspect)
    with_refit = grid_search(bundle, _valid(), SMALL, runner=run_sequential, keep_states=True)
    without = grid_search(
        bundle, _valid(), replace(SMALL, refit=False), runner=run_sequential, keep_states=True
    )
    assert with_refit.config["goodnet_trained_on"] == 96  # all but the 24 of the gate split
    assert without.config["goodnet_trained_on"] == 60  # one of two folds
    chosen = without.candidates.index(without.selection.candidate)
    assert all(
        torch.equal(without.goodnet_state[k], without.states[chosen][k])
        for k in without.goodnet_state
    )
    assert not all(
        torch.equal(with_refit.goodnet_state[k], with_refit.states[chosen][k])
        for k in with_refit.goodnet_state
    )


def test_the_goodnet_never_trains_on_the_gate_split(suspect: Path) -> None:
    bundle, valid = load_bundle(suspect), _valid()
    rest, gate = gate_split(valid)
    assert (len(rest), len(gate)) == (96, 24)
    assert np.bincount(gate.y).tolist() == [round(0.2 * n) for n in np.bincount(valid.y)]
    assert gate_split(valid)[1].x.tobytes() == gate.x.tobytes()  # the same images every time
    one = replace(SMALL, alphas=(1.0,), gammas=(0.2,))  # one candidate: the choice is fixed
    reserved = grid_search(bundle, valid, one, runner=run_sequential)
    # the gate images replaced by noise (same labels, so the same split): same GoodNet
    in_gate = np.isin([x.tobytes() for x in valid.x], [x.tobytes() for x in gate.x])
    noisy = valid.x.copy()
    noisy[in_gate] = np.random.default_rng(0).integers(0, 256, noisy[in_gate].shape)
    other = grid_search(bundle, Dataset(noisy, valid.y, valid.class_names, "noisy"), one)
    scores = [c.clean_accuracy for c in reserved.candidates]
    assert [c.clean_accuracy for c in other.candidates] != scores  # the folds saw the noise
    assert all(torch.equal(reserved.goodnet_state[k], v) for k, v in other.goodnet_state.items())
    assert reserved.config["gate_split"] == split_record(gate, 0.2)
    spec = bundle.manifest.input
    goodnet = goodnet_from(bundle, reserved.goodnet_state)
    assert reserved.gate_accuracy == {
        "badnet": float(np.mean(predict(bundle.model, gate.x, spec) == gate.y)),
        "goodnet": float(np.mean(predict(goodnet, gate.x, spec) == gate.y)),
    }
    everything = grid_search(bundle, valid, replace(one, gate_fraction=0))
    assert everything.config["gate_split"] is None and everything.gate_accuracy == {}
    assert everything.config["goodnet_trained_on"] == 120
    fold = grid_search(bundle, valid, replace(one, refit=False))  # a fold saw part of it
    assert fold.config["gate_split"] is None
    with pytest.raises(UserError, match="gate_fraction must lie in"):
        grid_search(bundle, valid, replace(SMALL, gate_fraction=1.0))
