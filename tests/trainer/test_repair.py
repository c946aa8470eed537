"""The CycleGAN and one repair round on the lab pair: success, gate rejection, crash, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from core.bundle import file_sha256, load_bundle
from core.db import open_store, session_factory, transaction
from core.defenses.bbd import RejectPolicy
from core.defenses.nnoculation import GoodNetPolicy
from core.errors import DataError, UserError
from core.leases import claim_round, heartbeat
from core.quarantine import active_round, list_rounds, pending_count
from tests.helpers import (
    SHAPE,
    TARGET,
    TINY_REPAIR,
    Lab,
    lab_store,
    make_blobs,
    quarantine_images,
    quarantine_lab,
)
from trainer.attacks.poison import build_attack
from trainer.cyclegan import train_cyclegan, translate
from trainer.cyclegan.files import INDEX, load_triggers
from trainer.cyclegan.models import PatchDiscriminator, ResnetGenerator
from trainer.data import Dataset, load_fashion_mnist
from trainer.repair import RepairConfig, RepairOutcome, confident_mask, gate_round, run_repair_round
from trainer.repair.selection import borderline, trigger_groups, trigger_target
from trainer.repair.treatment import counter_targets, jitter, localized, pixel_curve, treat
from trainer.stamps import Stamp, find_stamps, transplanted

TINY = TINY_REPAIR
TINY_GAN = TINY.cyclegan


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_generator_and_discriminator_fit_grey_28_and_colour_32(shape: tuple[int, int, int]) -> None:
    h, w, c = shape
    x = torch.rand(2, c, h, w) * 2 - 1
    gen = ResnetGenerator(c, ngf=8, n_blocks=2)
    out = gen(x)
    assert out.shape == x.shape and out.abs().max() <= 1.0
    score = PatchDiscriminator(c, ndf=8, n_layers=2)(x)
    assert score.shape[:2] == (2, 1) and score.shape[2] > 1  # one score per patch


def test_cyclegan_trains_and_its_cycle_loss_falls() -> None:
    a = make_blobs(64, shape=SHAPE, classes=4, seed=1).x
    b = a.copy()
    b[:, 22:26, 22:26, :] = 255  # domain B: the same kind of image with a patch
    cfg = replace(TINY_GAN, epochs=4)
    result = train_cyclegan(a, b, cfg)
    cycle = [r["loss_cycle"] for r in result.history]
    assert len(cycle) == 4 and cycle[-1] < cycle[0]
    out = translate(result.gen_ab, a[:5])
    assert out.shape == a[:5].shape and out.dtype == np.uint8


def test_cyclegan_refuses_unusable_domains() -> None:
    a = make_blobs(8, shape=SHAPE).x
    with pytest.raises(ValueError, match="both domains"):
        train_cyclegan(a, a[:0], TINY_GAN)
    with pytest.raises(ValueError, match="divisible by 4"):
        train_cyclegan(np.zeros((4, 30, 30, 1), np.uint8), np.zeros((4, 30, 30, 1), np.uint8))


def _valid() -> Dataset:
    return make_blobs(200, shape=SHAPE, classes=4, seed=21)


def _first_round(
    tmp_path: Path, lab: Lab, cfg: RepairConfig
) -> tuple[sessionmaker[Session], RepairOutcome, list[str]]:
    """Round 1 on a fresh store with 40 quarantined samples: (store, outcome, progress)."""
    return _round_one(lab_store(tmp_path, lab), tmp_path, lab, cfg)


def _round_one(
    sessions: sessionmaker[Session], tmp_path: Path, lab: Lab, cfg: RepairConfig
) -> tuple[sessionmaker[Session], RepairOutcome, list[str]]:
    quarantine_lab(sessions, lab, 40)
    messages: list[str] = []
    outcome = run_repair_round(
        sessions=sessions,
        store=tmp_path,
        round_no=1,
        valid=_valid(),
        cfg=cfg,
        progress=messages.append,
    )
    return sessions, outcome, messages


def test_a_round_activates_consumes_and_writes_its_trigger(tmp_path: Path, lab: Lab) -> None:
    sessions, outcome, messages = _first_round(tmp_path, lab, TINY)
    assert outcome.status == "succeeded" and outcome.path is not None
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None and info.round == 1
        assert pending_count(session=s) == 0
        (r0, r1) = list_rounds(session=s)
        assert r1.status == "succeeded" and r1.samples_used == 40
    for role in ("badnet", "goodnet"):
        assert load_bundle(outcome.path / role).manifest.meta["round"] == 1
    assert (outcome.path / "trigger.png").stat().st_size > 2000
    assert outcome.metrics["stamp_pixels"] == [[16]]  # the lab's 4x4 patch, found
    assert any("a stamped trigger of 16 pixels" in m for m in messages)
    # ... and transplanted, so no CycleGAN was trained for it
    assert not any("CycleGAN on" in m or "CycleGAN epoch" in m for m in messages)
    assert outcome.metrics["cyclegan_seconds"] == 0
    assert outcome.metrics["trigger_groups"] == [  # TARGET's 8 nearest images treated twice
        {"suspect_label": None, "images": 40, "cyclegan": False, "target": TARGET, "borderline": 8}
    ]
    assert any("(8 borderline ones twice)" in m for m in messages)
    (learned,) = load_triggers(outcome.path)
    assert learned.gen is None and learned.stamps[0].region.sum() == 16
    served = outcome.metrics["gate"]["served clean accuracy"]["after"]
    assert served == outcome.metrics["members"]["goodnet"]["after"]  # the GoodNet policy
    assert outcome.metrics["gate_passed"] and 0.0 < served <= 1.0
    # the lab's pair was not prepared, so nothing says it left the gate split out
    assert outcome.metrics["gate_held_out"] is False
    assert any("does not name this gate split" in m for m in messages)
    assert load_bundle(outcome.path / "goodnet").manifest.meta["gate_split"] is None
    # the default gate_fraction holds 20% out; 8 borderline images join the treatment
    treated = round(0.8 * len(_valid())) + 8
    kept = outcome.metrics["samples_kept"]  # views, both copies, 3 views of each kept sample
    assert outcome.metrics["finetune_images"] == 3 * treated + 2 * 3 * treated + 3 * kept


def test_a_trigger_without_stamps_gets_a_cyclegan(tmp_path: Path, lab: Lab) -> None:
    """With the transplant off (as for a global trigger, which has no stamp), the round
    trains gen_ab, treats with it, and keeps its weights for later rounds."""
    _, outcome, messages = _first_round(tmp_path, lab, replace(TINY, transplant=False))
    assert outcome.status == "succeeded" and outcome.path is not None
    assert any("CycleGAN epoch 2/2" in m for m in messages)
    assert outcome.metrics["cyclegan_seconds"] > 0
    assert outcome.metrics["trigger_groups"][0]["cyclegan"] is True
    assert outcome.metrics["stamp_pixels"] == [[]]
    (learned,) = load_triggers(outcome.path)
    assert learned.gen is not None and learned.stamps == []
    assert (outcome.path / "trigger.png").stat().st_size > 2000


def test_real_quarantined_images_are_fine_tuned_on_without_the_trigger_label(
    tmp_path: Path, lab: Lab
) -> None:
    """Their targets are the GoodNet's answer with the suspect's label (the target) removed."""
    goodnet, suspect = load_bundle(lab.goodnet), load_bundle(lab.badnet)
    images = lab.triggered[:20]
    soft = counter_targets(goodnet, suspect, images)
    said = suspect.predict(images)
    assert soft.shape == (20, 4) and np.allclose(soft.sum(1), 1.0, atol=1e-5)
    assert soft[np.arange(20), said].max() < 1e-6
    disagree = goodnet.predict(images) != said
    assert disagree.any()
    assert np.array_equal(soft.argmax(1)[disagree], goodnet.predict(images)[disagree])

    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 20)
    cfg = replace(TINY, min_score=0.0, min_kept=4, quarantine_views=2)
    outcome = run_repair_round(
        sessions=sessions, store=tmp_path, round_no=1, valid=_valid(), cfg=cfg
    )
    assert outcome.status == "succeeded"
    treated = round(0.8 * len(_valid())) + 8  # with the borderline images
    assert outcome.metrics["finetune_images"] == 3 * treated + 2 * 3 * treated + 2 * 20
    with pytest.raises(UserError, match="quarantine_views"):
        replace(TINY, quarantine_views=-1).validate()


def test_a_failed_gate_rejects_the_round_and_sets_its_samples_aside(
    tmp_path: Path, lab: Lab
) -> None:
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 30)
    # a rate that wrecks clean accuracy, against the gate's default bounds
    broken = replace(TINY, lr=5.0, ca_drop=0.0, max_clean_suspect=10.0)
    outcome = run_repair_round(
        sessions=sessions,
        store=tmp_path,
        round_no=1,
        valid=_valid(),
        cfg=broken,
    )
    assert outcome.status == "rejected" and outcome.path is None
    with sessions() as s:
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 0  # set aside with the rejected round
        assert list_rounds(session=s)[1].status == "rejected"
        assert list_rounds(session=s)[1].samples_used == 30
    assert not (tmp_path / "rounds" / "1").exists()


class _Always(nn.Module):
    """A wrecked member: answers ``label`` for every image."""

    def __init__(self, label: int, classes: int) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.classes)
        out[:, self.label] = 10.0
        return out


def test_the_gate_judges_the_served_answers_not_each_member(lab: Lab) -> None:
    """Under the GoodNet policy a wrecked badnet member changes no served answer, so the
    served accuracy alone would pass it; it fails on the images it flags. Under the reject
    policy the same pair's served accuracy collapses."""
    bad, good = load_bundle(lab.badnet), load_bundle(lab.goodnet)
    spec = good.manifest.input
    gate = _valid()
    wrecked = _Always(label=(TARGET + 1) % 4, classes=4)
    before = {"badnet": bad.model, "goodnet": good.model}
    after = {"badnet": wrecked, "goodnet": good.model}
    strict = replace(TINY, ca_drop=0.0, max_clean_suspect=10.0)
    metrics, passed = gate_round(before, after, gate, spec, strict, GoodNetPolicy())
    served, flagged = metrics["served clean accuracy"], metrics["clean images flagged suspect"]
    assert served["after"] == served["before"] > 0.5  # the goodnet answers either way
    assert flagged["after"] > 0.5 > flagged["before"]
    assert not passed  # more than 10% of clean images would be quarantined
    lenient = replace(TINY, ca_drop=0.0, max_clean_suspect=100.0)
    assert gate_round(before, after, gate, spec, lenient, GoodNetPolicy())[1]
    metrics, passed = gate_round(before, after, gate, spec, lenient, RejectPolicy())
    assert metrics["served clean accuracy"]["after"] < 0.5 and not passed


def test_a_crash_fails_the_round_and_the_next_one_can_run(
    tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 20)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory in the middle of training")

    monkeypatch.setattr("trainer.repair.nnoculation.train_cyclegan", boom)
    unstamped = replace(TINY, transplant=False)  # a stamped trigger would train no CycleGAN
    with pytest.raises(RuntimeError, match="out of memory"):
        run_repair_round(
            sessions=sessions, store=tmp_path, round_no=1, valid=_valid(), cfg=unstamped
        )
    with sessions() as s:
        r1 = list_rounds(session=s)[1]
        assert r1.status == "failed" and "out of memory" in (r1.error or "")
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 20
    monkeypatch.undo()
    outcome = run_repair_round(
        sessions=sessions,
        store=tmp_path,
        round_no=2,
        valid=_valid(),
        cfg=TINY,
    )
    assert outcome.status == "succeeded"


def test_refusals_happen_before_a_round_exists(tmp_path: Path, lab: Lab) -> None:
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 3)
    with pytest.raises(UserError, match="3 quarantined samples .* at least 10"):
        run_repair_round(
            sessions=sessions,
            store=tmp_path,
            round_no=1,
            valid=_valid(),
            cfg=replace(TINY, min_samples=10),
        )
    wrong = make_blobs(50, shape=(32, 32, 3), classes=4)
    with pytest.raises(UserError, match="validation images are 32x32x3"):
        run_repair_round(sessions=sessions, store=tmp_path, round_no=1, valid=wrong, cfg=TINY)
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0]
    empty = session_factory(open_store(f"sqlite:///{tmp_path / 'empty.db'}"))
    with pytest.raises(UserError, match="no round is active"):
        run_repair_round(sessions=empty, store=tmp_path, round_no=1, valid=_valid(), cfg=TINY)


def test_the_confidence_filter_keeps_what_the_original_suspect_is_sure_of(
    tmp_path: Path, lab: Lab
) -> None:
    """Only quarantined images the round-0 BadNet answers with >= min_score reach the
    CycleGAN; too few, and the round is refused with the samples left pending."""
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 20)
    suspect = load_bundle(lab.badnet)
    scores = np.sort(suspect.logits(lab.triggered[:20]).softmax(1).max(1).values.numpy())
    strict = float(scores[-1])  # only the most confident pass (float32 ties them near 1)
    assert strict < 1.0
    kept = confident_mask(suspect, lab.triggered[:20], strict)
    assert 1 <= kept.sum() < 16 and not confident_mask(suspect, lab.triggered[:20], 1.0).any()
    with pytest.raises(UserError, match=rf"only {kept.sum()} of 20 quarantined images .* needs 16"):
        run_repair_round(
            sessions=sessions,
            store=tmp_path,
            round_no=1,
            valid=_valid(),
            cfg=replace(TINY, min_score=strict),
        )
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0]
        assert pending_count(session=s) == 20
    outcome = run_repair_round(
        sessions=sessions,
        store=tmp_path,
        round_no=1,
        valid=_valid(),
        cfg=replace(TINY, min_score=strict, min_kept=1),
    )
    assert outcome.status == "succeeded"
    assert outcome.metrics["samples"] == 20 and outcome.metrics["samples_kept"] == kept.sum()
    with sessions() as s:
        assert pending_count(session=s) == 0  # every sample the round read is consumed


def test_each_new_trigger_treats_the_images_nearest_its_target_once_more(lab: Lab) -> None:
    """A group's target is the suspect's label on most of it; its borderline images are the
    validation images of other classes the active GoodNet gives the most of that target."""
    suspect, goodnet = load_bundle(lab.badnet), load_bundle(lab.goodnet)
    assert trigger_target(suspect, lab.triggered) == TARGET
    labels = suspect.predict(lab.clean)
    spread = np.concatenate([lab.clean[labels == k][:5] for k in range(4)])
    assert len(np.unique(suspect.predict(spread))) == 4
    assert trigger_target(suspect, spread) is None  # no label on half: no one target
    valid = _valid()
    idx = borderline(goodnet, valid, TARGET, 30)
    assert len(idx) == 30 == len(np.unique(idx)) and (valid.y[idx] != TARGET).all()
    p = goodnet.logits(valid.x).softmax(1).numpy()[:, TARGET]
    others = np.sort(p[valid.y != TARGET])[::-1]
    assert np.allclose(p[idx], others[:30])  # the 30 most probable, most probable first
    everyone = borderline(goodnet, valid, TARGET, 10_000)  # capped at the other classes' images
    assert len(everyone) == (valid.y != TARGET).sum()
    assert len(borderline(goodnet, valid, TARGET, 0)) == 0
    with pytest.raises(UserError, match="borderline must be 0 or more"):
        replace(TINY, borderline=-1).validate()


def test_a_quarantine_with_two_targets_gets_a_cyclegan_per_target(tmp_path: Path, lab: Lab) -> None:
    """Triggered images (the suspect says TARGET) and images it gives another label make
    two groups of domain B; one label alone, or groups below min_kept, make one."""
    suspect = load_bundle(lab.badnet)
    labels = suspect.predict(lab.clean)
    other = int(np.bincount(labels[labels != TARGET]).argmax())
    n = min(12, int((labels == other).sum()), len(lab.triggered))
    assert n >= 4
    mix = np.concatenate([lab.triggered[:n], lab.clean[labels == other][:n]])
    cfg = replace(TINY, min_score=0.0, min_kept=n)
    groups = trigger_groups(suspect, mix, cfg)
    assert [k for k, _ in groups] == sorted([TARGET, other])
    assert all(len(x) == n for _, x in groups)
    assert [k for k, _ in trigger_groups(suspect, mix, replace(cfg, min_kept=n + 1))] == [None]
    assert [k for k, _ in trigger_groups(suspect, lab.triggered[:n], cfg)] == [None]
    assert [k for k, _ in trigger_groups(suspect, mix, replace(cfg, split_by_label=False))] == [
        None
    ]
    # and a round on that quarantine trains both, writing each recovered trigger
    sessions = lab_store(tmp_path, lab)
    quarantine_images(sessions, mix)
    outcome = run_repair_round(
        sessions=sessions, store=tmp_path, round_no=1, valid=_valid(), cfg=cfg
    )
    assert outcome.status == "succeeded" and outcome.path is not None
    assert sorted(g["suspect_label"] for g in outcome.metrics["trigger_groups"]) == sorted(
        [TARGET, other]
    )
    second = max(TARGET, other)  # groups come in label order; the first one is trigger.png
    for name in ("trigger.png", f"trigger_label{second}.png"):
        assert (outcome.path / name).exists(), name
    learned = load_triggers(outcome.path)
    assert sorted((t.round, t.suspect_label) for t in learned) == [(1, TARGET), (1, other)]


def test_later_rounds_replay_earlier_triggers_and_distill_from_round_0(
    tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round treats with the triggers earlier rounds learned as well as its own (gen_ab
    or stamps), keeps them all for the next, and takes its targets from round 0's badnet
    (the original suspect), not the active round's."""
    import trainer.repair.nnoculation as repair

    teachers: list[object] = []
    real_finetune = repair.finetune

    def finetune(*args: object) -> object:
        teachers.append(args[4].path)  # type: ignore[attr-defined]
        return real_finetune(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(repair, "finetune", finetune)
    sessions = lab_store(tmp_path, lab)
    cfg = replace(TINY, min_score=0.0, min_kept=4)

    def run(round_no: int, cfg: RepairConfig) -> RepairOutcome:
        outcome = run_repair_round(
            sessions=sessions, store=tmp_path, round_no=round_no, valid=_valid(), cfg=cfg
        )
        assert outcome.status == "succeeded" and outcome.path is not None, outcome.metrics["gate"]
        return outcome

    # round 1 learns gen_ab (transplant off); round 2 finds the stamp and trains no CycleGAN
    paths = []
    for round_no, transplant in ((1, False), (2, True)):
        quarantine_lab(sessions, lab, 12, start=12 * (round_no - 1))
        outcome = run(round_no, replace(cfg, transplant=transplant))
        paths.append(outcome.path)
    assert outcome.metrics["replayed_triggers"] == ["round 1"]
    assert outcome.metrics["stamp_pixels"] == [[], [16]]  # round 1's gen_ab, round 2's stamp
    first, second = load_triggers(paths[0]), load_triggers(paths[1])
    assert [t.round for t in first] == [1] and [t.round for t in second] == [1, 2]
    x = lab.clean[:6]
    assert first[0].gen is not None and second[0].gen is not None and second[1].gen is None
    assert np.array_equal(translate(second[0].gen, x), translate(first[0].gen, x))
    (kept,) = second[1].stamps
    assert kept.region.sum() == 16 and kept.donors.dtype == np.uint8
    assert np.isin(kept.donors[:, kept.region], (0, 255)).mean() > 0.9  # the lab's checker

    # damaged stamps or weights stop round 3 before it exists (nothing is half-read), and so
    # does an index rewritten to drop a trigger: the store registered the index's sha256
    quarantine_lab(sessions, lab, 12, start=24)
    index = paths[1] / INDEX
    assert outcome.metrics["triggers_sha256"] == file_sha256(index)
    entries = json.loads(index.read_text())["triggers"]
    dropped = json.dumps({"triggers": entries[1:]}).encode()
    for damaged, bad in (
        (paths[1] / second[1].stamps_file, None),
        (paths[1] / second[0].file, None),
        (index, dropped),
    ):
        good = damaged.read_bytes()
        damaged.write_bytes(good[: len(good) // 2] if bad is None else bad)
        with pytest.raises(DataError, match="learned triggers .* cannot be read.*--no-replay"):
            run(3, cfg)
        damaged.write_bytes(good)
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0, 1, 2]

    # round 2's stamp has no gen_ab, so round 3 replays the stamp even with the transplant off
    outcome = run(3, replace(cfg, transplant=False))
    assert outcome.metrics["stamp_pixels"] == [[], [16], []]
    third = load_triggers(outcome.path)  # type: ignore[arg-type]
    assert [t.round for t in third] == [1, 2, 3]
    (again,) = third[1].stamps  # round 2's stamp, kept again
    assert np.array_equal(again.region, kept.region) and np.array_equal(again.donors, kept.donors)
    round0_badnet = (tmp_path / "rounds" / "0" / "badnet").resolve()
    assert {Path(str(p)).resolve() for p in teachers} == {round0_badnet}, teachers

    # a damaged trigger file: --no-replay runs the round without it
    (outcome.path / third[0].file).write_bytes(b"not a safetensors file")  # type: ignore[operator]
    quarantine_lab(sessions, lab, 12, start=36)
    outcome = run(4, replace(cfg, replay=False, transplant=False))
    assert outcome.metrics["replayed_triggers"] == []
    assert outcome.metrics["stamp_pixels"] == [[]]
    assert [t.round for t in load_triggers(outcome.path)] == [4]  # type: ignore[arg-type]


def test_the_database_lease_lets_one_claimer_in(tmp_path: Path, lab: Lab) -> None:
    from datetime import timedelta

    sessions = lab_store(tmp_path, lab)
    lease = timedelta(seconds=30)
    with transaction(sessions) as s:
        first = claim_round(session=s, owner="watcher-a", lease=lease)
    with transaction(sessions) as s:
        second = claim_round(session=s, owner="watcher-b", lease=lease)
    assert first == 1 and second is None
    with transaction(sessions) as s:
        assert heartbeat(session=s, round_no=1, owner="watcher-a")
        assert not heartbeat(session=s, round_no=1, owner="watcher-b")
    # a dead holder's lease expires; the round is failed and the next one can be claimed
    with transaction(sessions) as s:
        third = claim_round(session=s, owner="watcher-b", lease=timedelta(seconds=-1))
    assert third == 2
    with sessions() as s:
        r1 = list_rounds(session=s)[1]
        assert r1.status == "failed" and "lease expired" in (r1.error or "")


def _stamp(x: np.ndarray) -> np.ndarray:
    """A stand-in gen_ab: a white 3x3 patch in the corner, and every other pixel dimmed."""
    out = (x * 0.8).astype(np.uint8)
    out[:, -3:, -3:] = 255
    return out


class _Stamp(nn.Module):
    """The same as a generator module (translate runs it on [-1, 1] tensors); or no change."""

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp
        self.unused = nn.Parameter(torch.zeros(1))  # translate reads the device off one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stamp:
            return x
        out = x * 0.8 - 0.2
        out[:, :, -3:, -3:] = 1.0
        return out


def test_localized_keeps_the_trigger_and_drops_the_redrawing() -> None:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, (40, 28, 28, 1), dtype=np.uint8)
    kept = localized(clean, _stamp(clean))
    assert (kept[:, -3:, -3:] >= 250).all()  # the trigger (its weakest pixel at >= 99%)
    rest = (slice(None), slice(0, 20), slice(0, 20))  # gen_ab's redrawing, mostly dropped
    redrawn = np.abs(_stamp(clean)[rest].astype(float) - clean[rest]).mean()
    assert np.abs(kept[rest].astype(float) - clean[rest]).mean() < 0.1 * redrawn


def test_jitter_mirrors_and_shifts_within_bounds() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 28, 28, 1), dtype=np.uint8)
    out = jitter(x, rng)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert not np.array_equal(out, x)
    centre = slice(2, 26)
    for a, b in zip(x, out, strict=True):  # each is a mirror and a shift of at most 2 px
        candidates = [
            np.roll(img, (dy, dx), axis=(0, 1))[centre, centre]
            for img in (a, a[:, ::-1])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        ]
        assert any(np.array_equal(c, b[centre, centre]) for c in candidates)


@pytest.mark.parametrize(("treatment", "copies"), [("gan", 1), ("masked", 1), ("both", 2)])
def test_treat_pairs_each_treated_copy_with_its_clean_view(treatment: str, copies: int) -> None:
    valid = _valid()
    cfg = replace(TINY, views=3, treatment=treatment, pixel_curve=0)  # gen_ab's own copies
    parts = np.array_split(np.arange(len(valid)), 2)
    gens = [_Stamp(), _Stamp(stamp=False)]  # the second half's changes nothing
    clean, treated = treat(gens, parts, valid, cfg, np.random.default_rng(0))
    assert len(clean) == 3 * len(valid) and np.array_equal(clean.x[: len(valid)], valid.x)
    assert np.array_equal(clean.y, np.tile(valid.y, 3))
    assert len(treated) == copies * len(clean)  # blocks in the order of clean's views
    views = np.split(clean.x, 3)
    for k, block in enumerate(np.split(treated, 3 * copies)):
        assert (block[parts[0]][:, -3:, -3:] >= 254).all()  # the stamp's trigger, every view
        assert np.array_equal(block[parts[1]], views[k % 3][parts[1]])  # its own view


def test_treat_fits_a_trigger_without_a_stamp_as_a_curve_per_pixel() -> None:
    """Both copies are the fitted curve. _Stamp's change nearly is one (0.8 x - 0.1 on
    [0, 1], clipped at 0; the corner white), so the copies keep most of it, and no change
    stays nearly none (the ridge pulls a pixel the blobs hardly vary at toward its mean)."""
    valid = _valid()
    cfg = replace(TINY, views=2, treatment="both", pixel_curve=2)
    parts = np.array_split(np.arange(len(valid)), 2)
    clean, treated = treat(
        [_Stamp(), _Stamp(stamp=False)], parts, valid, cfg, np.random.default_rng(0)
    )
    first, second = np.split(treated, 2)
    assert np.array_equal(first, second)
    views = np.split(clean.x, 2)
    for k, block in enumerate(np.split(first, 2)):
        gen_ab = translate(_Stamp(), views[k][parts[0]]).astype(int)
        change = np.abs(gen_ab - views[k][parts[0]]).mean()  # 7.5 grey levels
        assert np.abs(block[parts[0]] - gen_ab).mean() < 0.4 * change  # 2.3
        assert (block[parts[0]][:, -3:, -3:] >= 254).all()
        assert np.abs(block[parts[1]].astype(int) - views[k][parts[1]]).mean() < 4  # 2.9


@pytest.mark.parametrize("attack", ["blend", "filter"])
def test_pixel_curve_keeps_a_global_trigger_and_drops_the_redrawing(
    attack: str, fmnist_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """gen_ab's copy, imitated: the real trigger plus a redrawing of each image its own way
    (smooth random texture). The curve fitted over 300 real images lands near the trigger."""
    clean, _ = fmnist_images
    (group,) = build_attack(attack, target=0, num_classes=10, image_shape=(28, 28, 1)).firing
    real = group.apply(clean, np.random.default_rng(0)).astype(float)
    rng = np.random.default_rng(1)
    texture = (
        torch.nn.functional.avg_pool2d(
            torch.from_numpy(rng.normal(0, 90, (len(clean), 1, 28, 28))), 3, 1, 1
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    redrawn = np.clip(real + texture, 0, 255).round().astype(np.uint8)
    fitted = pixel_curve(clean, redrawn, 2)
    off_redrawn = np.abs(redrawn - real).mean()  # 21 grey levels
    off_fitted = np.abs(fitted - real).mean()  # blend 3.8, filter 5.1 (clipping biases it)
    assert off_redrawn > 15 and off_fitted < 0.3 * off_redrawn
    assert off_fitted < 0.3 * np.abs(clean - real).mean()  # the trigger kept: 22-23 levels
    assert fitted.shape == clean.shape and fitted.dtype == np.uint8


def test_bad_treatment_settings_are_refused() -> None:
    with pytest.raises(UserError, match="views must be at least 1"):
        replace(TINY, views=0).validate()
    for degree in (-1, 6):
        with pytest.raises(UserError, match=r"pixel_curve must lie in 0\.\.5"):
            replace(TINY, pixel_curve=degree).validate()
    with pytest.raises(UserError, match="treatment must be one of gan, masked, both"):
        replace(TINY, treatment="paint").validate()


def _quarantine_of(images: np.ndarray, attack: str, triggered: float = 0.9) -> np.ndarray:
    """A quarantine as a round sees it: ``triggered`` of it carries ``attack``'s triggers
    (its firing groups in turn), the rest is clean."""
    groups = build_attack(attack, target=0, num_classes=10, image_shape=(28, 28, 1)).firing
    n, rng = round(triggered * len(images)), np.random.default_rng(0)
    shares = np.array_split(np.arange(n), len(groups))
    stamped = [group.apply(images[share], rng) for group, share in zip(groups, shares, strict=True)]
    return np.concatenate([*stamped, images[n:]])


@pytest.fixture(scope="module")
def fmnist_images(fmnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(300 clean test images, 60 others for a quarantine), real Fashion-MNIST."""
    x = load_fashion_mnist(fmnist_dir, "test").x
    return x[:300], x[300:360]


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.where(region)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_a_stamped_trigger_is_found_where_the_attacker_put_it(
    fmnist_images: tuple[np.ndarray, np.ndarray],
) -> None:
    clean, others = fmnist_images
    (patch,) = find_stamps(_quarantine_of(others, "patch"), clean)
    assert patch.region.sum() == 16  # the zoo's patch: 4x4, one pixel in from the corner
    assert _box(patch.region) == (23, 26, 23, 26)
    assert len(patch.donors) == 54  # the 90% triggered, and only those
    (combo,) = find_stamps(_quarantine_of(others, "combo"), clean)  # two patches, both every time
    assert combo.region.sum() == 32 and len(combo.donors) == 54
    assert combo.region[1:5, 1:5].all() and combo.region[23:27, 23:27].all()
    # A tenth of the quarantine triggered is too little to tell a stamp from content.
    assert find_stamps(_quarantine_of(others, "patch", triggered=0.1), clean) == []


@pytest.mark.parametrize("attack", ["multi-trigger", "multi-target"])
def test_several_stamps_are_found_one_by_one(
    attack: str, fmnist_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """Three patches, each in a third of the quarantine: three stamps, each with the images
    that carry it."""
    clean, others = fmnist_images
    stamps = find_stamps(_quarantine_of(others, attack), clean)
    boxes = sorted(_box(s.region) for s in stamps)
    assert boxes == [(1, 4, 1, 4), (1, 4, 23, 26), (23, 26, 23, 26)]
    assert [len(s.donors) for s in stamps] == [18, 18, 18]
    for s in stamps:  # every donor holds the same pixels there
        assert (s.donors[:, s.region] == s.donors[0, s.region]).all()


@pytest.mark.parametrize("attack", ["blend", "filter", "warp"])
def test_global_triggers_have_no_stamp(
    attack: str, fmnist_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """Blend and filter change the whole image, warp moves its content: gen_ab alone
    treats them."""
    clean, others = fmnist_images
    assert find_stamps(_quarantine_of(others, attack), clean) == []


def test_a_quarantine_of_one_class_has_no_stamp(fmnist_dir: Path) -> None:
    """A quarantine skewed to one class (the images a GoodNet disagrees on) holds that
    class's shapes in common, but those are common in clean images too."""
    data = load_fashion_mnist(fmnist_dir, "test")
    clean = data.x[:300]
    for label in range(10):
        same = data.x[1000:][data.y[1000:] == label]
        assert find_stamps(same[:60], clean) == [], label


def test_transplanted_copies_take_the_region_from_the_quarantine() -> None:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 100, (200, 28, 28, 1), dtype=np.uint8)
    regions = [np.zeros((28, 28), dtype=bool) for _ in range(2)]
    regions[0][2:6, 20:24] = regions[1][20:24, 2:6] = True
    stamps = [
        Stamp(regions[0], rng.integers(150, 255, (7, 28, 28, 1), dtype=np.uint8)),
        Stamp(regions[1], rng.integers(150, 255, (21, 28, 28, 1), dtype=np.uint8)),
    ]
    out = transplanted(clean, stamps[:1], rng)
    assert np.array_equal(out[:, ~regions[0]], clean[:, ~regions[0]])
    for img in out:  # the whole region from one donor
        assert any(np.array_equal(img[regions[0]], d[regions[0]]) for d in stamps[0].donors)
    out = transplanted(clean, stamps, rng)
    took = [(out[:, r] != clean[:, r]).any((1, 2)) for r in regions]
    assert not (took[0] & took[1]).any() and (took[0] | took[1]).all()  # one stamp each
    assert 0.1 < took[0].mean() < 0.4  # about 7 of 28: in proportion to the donors
    for img, before, second in zip(out, clean, took[1], strict=True):
        s = stamps[int(second)]
        assert any(np.array_equal(img[s.region], d[s.region]) for d in s.donors)
        assert np.array_equal(img[~s.region], before[~s.region])


def test_treat_transplants_a_stamp_into_both_copies() -> None:
    valid = _valid()
    cfg = replace(TINY, views=2, treatment="both")
    region = np.zeros(SHAPE[:2], dtype=bool)
    region[:2, :2] = True
    donors = np.full((3, *SHAPE), 77, dtype=np.uint8)
    parts = [np.arange(len(valid))]
    clean, treated = treat(
        [_Stamp()], parts, valid, cfg, np.random.default_rng(0), [[Stamp(region, donors)]]
    )
    for copy in np.split(treated, 2):  # gen_ab's imitation is not used
        assert (copy[:, :2, :2] == 77).all()  # the real stamp
        assert np.array_equal(copy[:, 2:], clean.x[:, 2:])  # and nothing else


def test_learned_stamps_round_trip_and_mismatched_ones_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from trainer.cyclegan.files import LearnedTrigger, save_triggers

    rng = np.random.default_rng(0)
    region = np.zeros(SHAPE[:2], dtype=bool)
    region[:3, :3] = True
    stamp = Stamp(region, rng.integers(0, 256, (5, *SHAPE), dtype=np.uint8))
    gen = ResnetGenerator(SHAPE[2], 8, 1)
    save_triggers(tmp_path, [LearnedTrigger(gen, 1, None, [stamp]), LearnedTrigger(gen, 2, 3)])
    first, second = load_triggers(tmp_path)
    assert second.stamps == [] and len(first.stamps) == 1
    assert np.array_equal(first.stamps[0].region, region)
    assert np.array_equal(first.stamps[0].donors, stamp.donors)

    bad = {"region0": region[:3].astype(np.uint8), "donors0": stamp.donors}  # 3 rows of 28
    save_file(bad, str(tmp_path / first.stamps_file))
    with pytest.raises(DataError, match=f"{first.stamps_file} does not match the sha256"):
        load_triggers(tmp_path)  # a valid file, but not the one the round wrote
    index = json.loads((tmp_path / INDEX).read_text())
    index["triggers"][0]["stamps_sha256"] = file_sha256(tmp_path / first.stamps_file)
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"stamp 0 has region \(3, 28\) and carriers"):
        load_triggers(tmp_path)  # the digest agrees: the shapes are checked too


def test_learned_triggers_are_checked_against_the_digest_their_round_registered(
    tmp_path: Path,
) -> None:
    from trainer.cyclegan.files import LearnedTrigger, save_triggers

    gen = ResnetGenerator(SHAPE[2], 8, 1)
    digest = save_triggers(tmp_path, [LearnedTrigger(gen, 1, None)])
    assert digest == file_sha256(tmp_path / INDEX)
    (learned,) = load_triggers(tmp_path, digest)
    assert learned.gen is not None and learned.round == 1

    # weights swapped for another valid generator's: refused by the index's digest
    from safetensors.torch import save_file

    other = ResnetGenerator(SHAPE[2], 8, 1).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / learned.file))
    with pytest.raises(DataError, match=f"{learned.file} does not match the sha256"):
        load_triggers(tmp_path, digest)

    # an index that differs from the registered one, or is gone, is refused as well;
    # without a registered digest (round 0, older rounds) a missing index means none
    save_triggers(tmp_path, [LearnedTrigger(gen, 1, None)])
    (tmp_path / INDEX).write_text(
        (tmp_path / INDEX).read_text().replace('"round": 1', '"round": 7')
    )
    with pytest.raises(DataError, match=f"{INDEX} does not match the sha256"):
        load_triggers(tmp_path, digest)
    (tmp_path / INDEX).unlink()
    with pytest.raises(DataError, match="cannot be read"):
        load_triggers(tmp_path, digest)
    assert load_triggers(tmp_path) == []


def test_a_stamp_only_trigger_round_trips_and_an_empty_entry_is_refused(tmp_path: Path) -> None:
    from trainer.cyclegan.files import LearnedTrigger, save_triggers

    region = np.zeros(SHAPE[:2], dtype=bool)
    region[-4:, -4:] = True
    stamp = Stamp(region, np.full((2, *SHAPE), 200, dtype=np.uint8))
    save_triggers(tmp_path, [LearnedTrigger(None, 1, 0, [stamp])])
    assert not list(tmp_path.glob("gen_ab_*"))  # no weights were written for it
    (learned,) = load_triggers(tmp_path)
    assert learned.gen is None and learned.suspect_label == 0
    assert np.array_equal(learned.stamps[0].region, region)

    with pytest.raises(ValueError, match="neither a generator nor stamps"):
        save_triggers(
            tmp_path, [LearnedTrigger(None, 2, None, [stamp]), LearnedTrigger(None, 3, 1)]
        )
    assert not (tmp_path / "stamps_round2.safetensors").exists()  # nothing half-written
    index = json.loads((tmp_path / INDEX).read_text())  # the refused save left it as it was
    index["triggers"][0]["stamps"] = None
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match="names neither a generator file nor stamps"):
        load_triggers(tmp_path)


def test_a_round_after_prepare_gates_on_a_split_both_sides_held_out(
    tmp_path: Path, lab: Lab
) -> None:
    from core.bundle import save_bundle
    from trainer.splits import gate_split, split_record

    reserved = split_record(gate_split(_valid())[1], 0.2)
    good = load_bundle(lab.goodnet)  # as prepare writes it: naming the split it left out
    m = good.manifest
    prepared = tmp_path / "prepared"
    save_bundle(
        good.model,
        prepared,
        arch=m.arch,
        arch_kwargs=m.arch_kwargs,
        class_names=m.class_names,
        input_spec=m.input,
        meta={**m.meta, "gate_split": reserved},
    )
    _, outcome, messages = _round_one(lab_store(tmp_path, lab, prepared), tmp_path, lab, TINY)
    assert outcome.status == "succeeded" and outcome.path is not None
    assert outcome.metrics["gate_held_out"] is True
    assert not any("does not name this gate split" in m for m in messages)
    for role in ("badnet", "goodnet"):  # so round 2 knows it too
        assert load_bundle(outcome.path / role).manifest.meta["gate_split"] == reserved
