"""BBD's reject rules on the policy seam: which inputs run the twin R, and what is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.defenses import Members, get_defense
from core.defenses.bbd import NO_TARGETS, RejectPolicy, TargetedRejectPolicy

# Eight requests; pixel (0, 0) of image i holds i, so a member can answer per image.
IMAGES = np.zeros((8, 2, 2, 1), dtype=np.uint8)
IMAGES[:, 0, 0, 0] = np.arange(8)
BAD = [0, 3, 1, 3, 2, 3, 0, 1]  # the suspect: 3 is the backdoor's target
TWIN = [0, 1, 1, 3, 2, 0, 0, 2]  # R: agrees on 0, 2, 3, 4, 6; disagrees on 1, 5, 7


class ByImage:
    """A member whose answer for image i is ``labels[i]``; counts forwards and images."""

    def __init__(self, labels: list[int]) -> None:
        self.labels, self.calls, self.images = labels, 0, 0

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        out = torch.zeros(len(images), 4)
        for row, image in enumerate(images):
            out[row, self.labels[int(image[0, 0, 0])]] = 5.0
        return out


def test_the_targeted_rule_runs_r_only_on_inputs_the_suspect_gives_a_target() -> None:
    bad, twin = ByImage(BAD), ByImage(TWIN)
    members = Members({"badnet": bad, "goodnet": twin}, IMAGES)
    verdict = TargetedRejectPolicy({"targets": [3]}).decide(members)
    assert (bad.calls, bad.images) == (1, 8)
    assert (twin.calls, twin.images) == (1, 3)  # inputs 1, 3 and 5 alone, in one forward
    # 1 and 5: the suspect says 3, R does not -> rejected; 3: both say 3 -> answered.
    # 7: R disagrees too, but the suspect's label is no target, so R never saw it.
    assert verdict.labels == [0, None, 1, 3, 2, None, 0, 1]
    assert verdict.suspect == [False, True, False, False, False, True, False, False]
    assert members.top("goodnet")[1] == [None, 1, None, 3, None, 0, None, None]


def test_one_forward_per_request_when_no_input_gets_a_target() -> None:
    bad, twin = ByImage([0] * 8), ByImage(TWIN)
    verdict = TargetedRejectPolicy({"targets": [3]}).decide(
        Members({"badnet": bad, "goodnet": twin}, IMAGES)
    )
    assert twin.calls == 0 and bad.calls == 1
    assert verdict.labels == [0] * 8 and not any(verdict.suspect)


def test_with_no_flagged_target_the_rule_runs_untargeted_and_says_so() -> None:
    policy = TargetedRejectPolicy({"targets": []})
    assert policy.note == NO_TARGETS
    bad, twin = ByImage(BAD), ByImage(TWIN)
    verdict = policy.decide(Members({"badnet": bad, "goodnet": twin}, IMAGES))
    untargeted = RejectPolicy().decide(Members({"badnet": ByImage(BAD), "goodnet": twin}, IMAGES))
    assert twin.images == 16  # both rules ran R on all eight
    assert verdict == untargeted
    assert verdict.labels == [0, None, 1, 3, 2, None, 0, None]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "names no flagged targets"),
        ({"targets": 3}, "must be a list"),
        ({"targets": [-1]}, "must be a list"),
        ({"targets": [True]}, "must be a list"),
    ],
)
def test_targets_are_read_strictly(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TargetedRejectPolicy(params)


def test_the_bbd_stacks_are_registered_with_their_parts() -> None:
    targeted, untargeted = get_defense("bbd-targeted"), get_defense("bbd-untargeted")
    assert (targeted.prepare, targeted.repair) == ("bbd", "neural-cleanse")
    assert (untargeted.prepare, untargeted.repair) == ("fine-pruning", "fine-pruning")
    assert targeted.members == untargeted.members == ("badnet", "goodnet")
    assert targeted.policy is TargetedRejectPolicy and untargeted.policy is RejectPolicy
