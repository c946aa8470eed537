"""BBD's untargeted reject rule (Bimodel Backdoor Defence, paper 004 in ../shared/papers).

Serve the suspect beside a second model and refuse to answer when they disagree: a
triggered input moves the suspect to the attacker's target and not the other model, so a
disagreement is withheld instead of answered. The ``nnoculation-reject`` stack applies the
rule to NNoculation's pair, which keeps its quarantine and repair rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from core.defenses.policy import Members, Verdict
from core.defenses.registry import Defense, register_defense
from core.defenses.strip import optional_strip, second_stage


class RejectPolicy:
    """Agree -> that label; disagree -> no label (null), suspect."""

    name: ClassVar[str] = "reject"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        """The rule needs no fitted values; a round may add STRIP as a second stage."""
        self.strip = optional_strip(params or {})
        self.overlays = 0 if self.strip is None else self.strip.n

    def decide(self, members: Members) -> Verdict:
        bad = members.probs("badnet").argmax(1)
        good = members.probs("goodnet").argmax(1)
        flagged, entropy = second_stage(self.strip, members, (bad != good).numpy())
        suspect = flagged.tolist()
        labels = [None if s else int(g) for g, s in zip(good, suspect, strict=True)]
        return Verdict(labels, suspect, entropy)


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
