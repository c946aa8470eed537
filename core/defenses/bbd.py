"""BBD's reject rules (Bimodel Backdoor Defence, paper 004 in ../shared/papers, §3).

Serve the suspect B beside a second model R and refuse to answer when they disagree: a
triggered input moves B to the attacker's target and not R, so a disagreement is
withheld instead of answered.

- Untargeted (``reject``): run both on every input.
- Targeted (``bbd-targeted``): run R only on the inputs B labels with one of the targets
  Neural Cleanse flagged (Wang et al., S&P'19, §IV-C), so a request costs
  1 + P(B(x) in T) forwards. With no flagged target it falls back to the untargeted rule
  and says so (``note``), because a backdoor Neural Cleanse missed still needs R.

In the ``bbd-*`` stacks R is B after Fine-Pruning (Liu et al., RAID'18, §4); the
``nnoculation-reject`` stack applies the untargeted rule to NNoculation's pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from core.defenses.policy import Members, Verdict
from core.defenses.registry import Defense, register_defense
from core.defenses.strip import optional_strip, second_stage

NO_TARGETS = "Neural Cleanse flagged no target class, so the targeted rule runs untargeted"


class RejectPolicy:
    """Agree -> that label; disagree -> no label (null), suspect."""

    name: ClassVar[str] = "reject"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        """The rule needs no fitted values; a round may add STRIP as a second stage."""
        self.strip = optional_strip(params or {})
        self.overlays = 0 if self.strip is None else self.strip.n
        self.note = ""  # why the policy serves otherwise than its name says, if it does

    def decide(self, members: Members) -> Verdict:
        bad = members.probs("badnet").argmax(1)
        good = members.probs("goodnet").argmax(1)
        flagged, entropy = second_stage(self.strip, members, (bad != good).numpy())
        suspect = flagged.tolist()
        labels = [None if s else int(g) for g, s in zip(good, suspect, strict=True)]
        return Verdict(labels, suspect, entropy)


def target_classes(params: Mapping[str, Any]) -> tuple[int, ...]:
    """The round's flagged target classes (``params["targets"]``), checked: a list of
    distinct non-negative class indices."""
    targets = params.get("targets")
    if targets is None:
        raise ValueError("the round's manifest names no flagged targets ('targets')")
    if not isinstance(targets, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in targets
    ):
        raise ValueError(f"'targets' must be a list of class indices, got {targets!r}")
    return tuple(sorted(set(targets)))


class TargetedRejectPolicy(RejectPolicy):
    """B's label, unless it is a flagged target and R disagrees: then no label, suspect."""

    name: ClassVar[str] = "bbd-targeted"

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        self.targets = target_classes(params)
        self.note = "" if self.targets else NO_TARGETS

    def decide(self, members: Members) -> Verdict:
        if not self.targets:
            return super().decide(members)
        bad = members.probs("badnet").argmax(1).numpy()
        idx = np.flatnonzero(np.isin(bad, self.targets))
        good = members.probs_at("goodnet", idx).argmax(1).numpy()  # R on those alone
        disagree = np.zeros(len(bad), dtype=bool)
        disagree[idx] = good != bad[idx]
        flagged, entropy = second_stage(self.strip, members, disagree)
        labels = [None if f else int(k) for k, f in zip(bad, flagged, strict=True)]
        return Verdict(labels, flagged.tolist(), entropy)


NNOCULATION_REJECT = register_defense(
    Defense(
        name="nnoculation-reject",
        summary="NNoculation's pair under BBD's untargeted rule: disagreements get no label; "
        "CycleGAN repair rounds",
        policy=RejectPolicy,
        prepare="noise-retrain",
        repair="cyclegan",
    )
)

BBD_TARGETED = register_defense(
    Defense(
        name="bbd-targeted",
        summary="BBD: the suspect beside its Fine-Pruned twin, which runs only when the suspect "
        "answers a Neural Cleanse target; disagreements get no label; unlearning repair",
        policy=TargetedRejectPolicy,
        prepare="bbd",
        repair="neural-cleanse",
    )
)

BBD_UNTARGETED = register_defense(
    Defense(
        name="bbd-untargeted",
        summary="BBD: the suspect beside its Fine-Pruned twin on every input; disagreements "
        "get no label; Fine-Pruning repair",
        policy=RejectPolicy,
        prepare="fine-pruning",
        repair="fine-pruning",
    )
)
