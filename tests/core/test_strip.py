"""STRIP's math and the strip policies, Ray-free (issue 32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.bundle import load_bundle
from core.defenses import Members, get_defense, with_policy
from core.defenses.nnoculation import GoodNetPolicy
from core.defenses.strip import StripPolicy, StripRejectPolicy
from core.errors import UserError
from core.pair import ModelPair, RoundDefense, SwapError
from core.strip import StripParams, entropy_bits, mean_entropy, superimpose
from tests.helpers import Lab


def test_entropy_matches_a_hand_computed_case() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # -(0.5 log2 0.5 + 2 * 0.25 log2 0.25) = 0.5 + 1 = 1.5 bits; a certain answer is 0
    # bits (0 log 0 counts as 0); uniform over 3 is log2 3.
    assert entropy_bits(probs).tolist() == pytest.approx([1.5, 0.0, math.log2(3)])


def test_mean_entropy_averages_each_inputs_own_blends_in_one_call() -> None:
    images = np.array([[[[0]]], [[[200]]]], dtype=np.uint8)  # two 1x1x1 inputs
    pool = np.array([[[[10]]], [[[100]]], [[[250]]]], dtype=np.uint8)  # three overlays
    calls = []

    def run(x: np.ndarray) -> torch.Tensor:
        calls.append(len(x))
        # a "model" that is certain when the blended pixel is 255, else 50/50 over 2 classes
        certain = torch.tensor(x.reshape(-1) == 255)
        out = torch.full((len(x), 2), 0.5)
        out[certain] = torch.tensor([1.0, 0.0])
        return out

    h = mean_entropy(run, images, pool, "add")
    assert calls == [6]  # B * N blends, one forward
    # input 0: 10, 100, 250 -> none saturate -> 1 bit each; input 1: 210, 255, 255 -> 1, 0, 0
    assert h.tolist() == pytest.approx([1.0, 1 / 3])


def test_overlay_modes() -> None:
    a = np.array([[[[100], [200]]]], dtype=np.uint8)  # one 1x2x1 image
    b = np.array([[[[100], [100]]], [[[0], [255]]]], dtype=np.uint8)  # two overlays
    added = superimpose(a, b, "add")
    blended = superimpose(a, b, "blend")
    assert added.shape == blended.shape == (2, 1, 2, 1)
    assert added[:, 0, :, 0].tolist() == [[200, 255], [100, 255]]  # saturating sum
    assert blended[:, 0, :, 0].tolist() == [[100, 150], [50, 228]]  # (a + b) / 2, half up
    with pytest.raises(UserError, match="overlay mode"):
        superimpose(a, b, "multiply")


def _params(n: int = 4, sigma: float = 0.5, stage: str = "disagreements") -> StripParams:
    pool = np.random.default_rng(0).integers(0, 256, (n, 2, 2, 1), dtype=np.uint8)
    return StripParams(pool, sigma, "blend", 0.05, stage)


def test_params_round_trip_and_the_overlay_cap() -> None:
    params = _params()
    back = StripParams.from_dict(params.to_dict())
    assert np.array_equal(back.pool, params.pool)
    assert (back.sigma, back.mode, back.frr, back.stage) == (0.5, "blend", 0.05, "disagreements")
    with pytest.raises(ValueError, match="above the configured maximum of 3"):
        StripParams.from_dict(params.to_dict(), max_overlays=3)
    bad = params.to_dict() | {"pool": {"shape": [9, 2, 2, 1], "uint8_base64": "AAAA"}}
    with pytest.raises(ValueError, match="do not fill"):
        StripParams.from_dict(bad)
    with pytest.raises(ValueError, match="holds 4 images, the manifest says 5"):
        StripParams.from_dict(params.to_dict() | {"n": 5})
    empty = params.to_dict() | {"n": 0, "pool": {"shape": [0, 2, 2, 1], "uint8_base64": ""}}
    with pytest.raises(ValueError, match="holds 0 images"):
        StripParams.from_dict(empty)


def test_with_policy_refuses_rounds_that_cannot_serve(lab: Lab) -> None:
    """A pool of another shape than the models', members other than the defense's, and
    more overlays than the cap: each a SwapError, so the follower keeps the old round."""
    bad = load_bundle(lab.badnet)  # 28x28x1
    tiny = {"strip": _params().to_dict()}  # 2x2x1 overlays
    with pytest.raises(SwapError, match="overlays are 2x2x1, but its models take 28x28x1"):
        with_policy(ModelPair(0, bad, None, RoundDefense("codefend", tiny)))
    with pytest.raises(SwapError, match="registers badnet, but defense 'nnoculation' serves"):
        with_policy(ModelPair(0, bad, None, RoundDefense("nnoculation")))
    pool = np.zeros((16, 28, 28, 1), np.uint8)
    big = {"strip": StripParams(pool, 0.5, "add", 0.01, "disagreements").to_dict()}
    with pytest.raises(SwapError, match="16 overlays per input, above the configured maximum"):
        with_policy(ModelPair(0, bad, None, RoundDefense("codefend", big)), max_overlays=8)
    assert with_policy(ModelPair(0, bad, None, RoundDefense("codefend", big))).roles == ("badnet",)


def _members(triggered: set[int]) -> tuple[Members, dict[str, object]]:
    """Four 1x1 inputs with pixel 40*i, and a zero overlay pool in 'add' mode, so every
    blend equals its input. The badnet is certain of class 1 on ``triggered`` inputs, and
    near 50/50 elsewhere (leaning to 1 on odd i); the goodnet follows the trigger but not
    the lean."""
    images = (40 * np.arange(4, dtype=np.uint8)).reshape(4, 1, 1, 1)
    strip = StripParams(np.zeros((4, 1, 1, 1), np.uint8), 0.5, "add", 0.05, "disagreements")

    def net(lean: float) -> object:
        def logits(x: np.ndarray) -> torch.Tensor:
            i = x.reshape(-1).astype(int) // 40
            out = torch.zeros(len(x), 2)
            out[:, 1] = torch.tensor(np.where(i % 2 == 1, lean, -lean), dtype=torch.float32)
            out[torch.tensor([int(k) in triggered for k in i]), 1] = 50.0
            return out

        return logits

    members = Members({"badnet": net(1e-3), "goodnet": net(0.0)}, images)  # type: ignore[dict-item]
    return members, {"strip": strip.to_dict()}


def test_strip_policy_flags_low_entropy_and_reject_withholds_the_label() -> None:
    members, params = _members({1, 3})
    verdict = StripPolicy(params).decide(members)
    assert verdict.labels == [0, 1, 0, 1]  # the model's label, flagged or not
    assert verdict.suspect == [False, True, False, True]
    assert verdict.entropy == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-3)
    rejected = StripRejectPolicy(params).decide(_members({1, 3})[0])
    assert rejected.labels == [0, None, 0, None]
    assert StripPolicy(params).overlays == 4


def test_second_stage_on_disagreements_or_on_all_inputs() -> None:
    # badnet labels 0, 1, 1, 1 and goodnet 0, 0, 1, 0: the pair disagrees on inputs 1 and
    # 3; input 2 carries a trigger both follow, so they agree on it
    members, params = _members({2})
    v = GoodNetPolicy(params).decide(members)
    assert v.suspect == [False, True, False, True]  # entropy only annotates
    assert v.entropy is not None and v.entropy[0] is None and v.entropy[2] is None
    assert v.entropy[1] == pytest.approx(1.0, abs=1e-3)
    assert v.entropy[3] == pytest.approx(1.0, abs=1e-3)
    params["strip"]["stage"] = "all"  # type: ignore[index]
    v = GoodNetPolicy(params).decide(_members({2})[0])
    assert v.suspect == [False, True, True, True]  # low entropy flags an agreed input too
    assert v.entropy is not None and v.entropy[2] == pytest.approx(0.0, abs=1e-6)
    assert GoodNetPolicy({}).decide(_members({2})[0]).entropy is None


def test_codefend_stacks_serve_one_member() -> None:
    assert get_defense("codefend").members == ("badnet",)
    assert get_defense("codefend-reject").policy is StripRejectPolicy
    with pytest.raises(ValueError, match="no fitted STRIP"):
        StripPolicy({})
