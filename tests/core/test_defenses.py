"""The defense registry, the policy seam and the round manifest, without Ray or a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.defenses import Defense, Members, decide_batch, get_defense, register_defense
from core.defenses.bbd import RejectPolicy
from core.defenses.nnoculation import GoodNetPolicy
from core.defenses.registry import defense_names, load_defense_modules, with_policy
from core.errors import UserError
from core.pair import RoundDefense, SwapError, read_round_manifest, write_round_manifest

IMAGES = np.zeros((4, 2, 2, 1), dtype=np.uint8)


class Fixed:
    """A member that answers fixed labels, and counts its forwards and images."""

    def __init__(self, labels: list[int], classes: int = 3) -> None:
        self.labels, self.classes, self.calls, self.images = labels, classes, 0, 0

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        out = torch.zeros(len(images), self.classes)
        out[torch.arange(len(images)), torch.tensor(self.labels[: len(images)])] = 5.0
        return out


def members(bad: list[int], good: list[int]) -> Members:
    return Members({"badnet": Fixed(bad), "goodnet": Fixed(good)}, IMAGES)


def test_goodnet_answers_the_goodnet_and_flags_disagreements() -> None:
    verdict = GoodNetPolicy().decide(members([0, 1, 2, 1], [0, 2, 2, 0]))
    assert verdict.labels == [0, 2, 2, 0]
    assert verdict.suspect == [False, True, False, True]


def test_reject_withholds_the_label_of_disagreements() -> None:
    verdict = RejectPolicy().decide(members([0, 1, 2, 1], [0, 2, 2, 0]))
    assert verdict.labels == [0, None, 2, None]
    assert verdict.suspect == [False, True, False, True]


def test_members_compute_each_softmax_once_and_run_transformed_batches_in_one_forward() -> None:
    bad, good = Fixed([0, 1, 2, 1]), Fixed([0, 2, 2, 0] * 4)
    m = Members({"badnet": bad, "goodnet": good}, IMAGES, {"sigma": 0.5})
    first, again = m.probs("badnet"), m.probs("badnet")
    assert first is again and bad.calls == 1 and m.computed("badnet")
    assert torch.allclose(first.sum(1), torch.ones(4))  # a softmax, not logits
    overlays = np.repeat(IMAGES, 4, axis=0)  # N x 4 copies: one batch, one forward
    assert m.run("goodnet", overlays).shape == (16, 3) and good.calls == 1
    assert good.images == 16 and not m.computed("goodnet") and m.params["sigma"] == 0.5
    with pytest.raises(UserError, match="no 'twin' member"):
        m.probs("twin")


def test_the_registry_names_stacks_and_refuses_what_it_cannot_serve() -> None:
    assert {"nnoculation", "nnoculation-reject"} <= set(defense_names())
    stack = get_defense("nnoculation-reject")
    assert (stack.prepare, stack.repair, stack.policy({}).name) == (
        "noise-retrain",
        "cyclegan",
        "reject",
    )
    with pytest.raises(UserError, match=r"unknown defense 'strp'.*nnoculation"):
        get_defense("strp")
    with pytest.raises(ValueError, match="already registered"):
        register_defense(Defense("nnoculation", "another", GoodNetPolicy))
    with pytest.raises(ValueError, match="lowercase"):
        register_defense(Defense("Bad Name", "x", GoodNetPolicy))
    with pytest.raises(UserError, match="cannot import defense module 'no.such.module'"):
        load_defense_modules(["no.such.module"])
    load_defense_modules(["tests.plugins.mirror_defense"])  # registers on import
    assert get_defense("mirror-check").policy({}).name == "mirror-check"


def test_the_round_manifest_names_the_defense_and_old_rounds_serve_nnoculation(
    tmp_path: Path,
) -> None:
    assert read_round_manifest(tmp_path) == RoundDefense("nnoculation", {})  # no round.json
    write_round_manifest(tmp_path, RoundDefense("nnoculation-reject", {"sigma": 0.1}))
    assert read_round_manifest(tmp_path) == RoundDefense("nnoculation-reject", {"sigma": 0.1})
    (tmp_path / "round.json").write_text("{not json")
    with pytest.raises(SwapError, match="is not a round manifest"):
        read_round_manifest(tmp_path)
    (tmp_path / "round.json").write_text('{"defense": 3}')
    with pytest.raises(SwapError, match="'defense' must be a name"):
        read_round_manifest(tmp_path)


def test_a_pair_serves_its_rounds_policy_and_an_unknown_defense_does_not_load(lab: object) -> None:
    from core.bundle import load_bundle
    from core.pair import ModelPair
    from tests.helpers import Lab

    assert isinstance(lab, Lab)
    bad, good = load_bundle(lab.badnet), load_bundle(lab.goodnet)
    pair = with_policy(ModelPair(3, bad, good, RoundDefense("nnoculation-reject")))
    decisions = decide_batch(pair, lab.triggered[:8], pair.policy)  # type: ignore[arg-type]
    assert all(d.label is None and d.suspect and d.round == 3 for d in decisions)
    assert [d.badnet_label for d in decisions] == list(bad.predict(lab.triggered[:8]))
    with pytest.raises(UserError, match="unknown defense 'gone'"):
        with_policy(ModelPair(3, bad, good, RoundDefense("gone")))

    def fussy(params: object) -> GoodNetPolicy:
        raise KeyError("sigma")  # a round.json without the value the policy needs

    register_defense(Defense("needs-sigma", "test-only", fussy))
    with pytest.raises(SwapError, match="'needs-sigma' cannot build its policy .*KeyError"):
        with_policy(ModelPair(3, bad, good, RoundDefense("needs-sigma")))
