"""NNoculation's per-request policy and stack (Veldanda et al., AISec'21, §3.3).

Serve the BadNet and the GoodNet side by side. When they agree, answer that label; when
they disagree, the input is probably triggered: answer with the GoodNet's label and
quarantine the input, which the CycleGAN repair learns the trigger from (§3.3, §4.2.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from core.defenses.policy import Members, Verdict
from core.defenses.registry import Defense, register_defense
from core.defenses.strip import optional_strip, second_stage


class GoodNetPolicy:
    """Agree -> that label; disagree -> the GoodNet's label, suspect."""

    name: ClassVar[str] = "goodnet"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        """The rule needs no fitted values; a round may add STRIP as a second stage."""
        self.strip = optional_strip(params or {})
        self.overlays = 0 if self.strip is None else self.strip.n

    def decide(self, members: Members) -> Verdict:
        bad = members.probs("badnet").argmax(1)
        good = members.probs("goodnet").argmax(1)
        suspect, entropy = second_stage(self.strip, members, (bad != good).numpy())
        return Verdict([int(g) for g in good], suspect.tolist(), entropy)


NNOCULATION = register_defense(
    Defense(
        name="nnoculation",
        summary="noise-retrained GoodNet beside the suspect; disagreements are quarantined "
        "and answered by the GoodNet; CycleGAN repair rounds",
        policy=GoodNetPolicy,
        prepare="noise-retrain",
        repair="cyclegan",
    )
)
