"""The ``strip`` policy and the CoDefend stacks (paper 000: Algorithm 1 and §3; STRIP is
Gao et al., ACSAC'19, §IV).

The suspect serves alone. Each input is superimposed with the round's N clean overlays in
one batched forward; a mean entropy at or below sigma marks it suspect, which sends it to
the quarantine that CoDefend's CycleGAN repair learns the trigger from. ``codefend`` still
answers the model's label (the paper's detector only collects); ``codefend-reject``
answers null for a flagged input, as STRIP was first proposed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from core.defenses.policy import Members, Verdict
from core.defenses.registry import Defense, register_defense
from core.strip import StripParams


def strip_params(params: Mapping[str, Any]) -> StripParams:
    """The round's fitted STRIP values (``params["strip"]``); a round without them cannot
    serve a STRIP policy."""
    strip = optional_strip(params)
    if strip is None:
        raise ValueError("the round's manifest has no fitted STRIP values ('strip')")
    return strip


def optional_strip(params: Mapping[str, Any]) -> StripParams | None:
    """The round's STRIP values, or None when it was prepared without them."""
    return StripParams.from_dict(params["strip"]) if "strip" in params else None


class StripPolicy:
    """The suspect's label; suspect when the input's mean overlay entropy is <= sigma."""

    name: ClassVar[str] = "strip"
    reject: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.strip = strip_params(params)
        self.overlays = self.strip.n  # forwards per input, checked against the gateway's cap

    def decide(self, members: Members) -> Verdict:
        labels = members.probs("badnet").argmax(1).tolist()
        h = self.strip.entropies(lambda x: members.run("badnet", x), members.images)
        flagged = (h <= self.strip.sigma).tolist()
        served = [
            None if self.reject and f else int(k) for k, f in zip(labels, flagged, strict=True)
        ]
        return Verdict(served, flagged, [float(e) for e in h])


class StripRejectPolicy(StripPolicy):
    """As ``strip``, but a flagged input gets no label (null)."""

    name: ClassVar[str] = "strip-reject"
    reject: ClassVar[bool] = True


def second_stage(
    strip: StripParams | None, members: Members, disagree: NDArray[np.bool_]
) -> tuple[NDArray[np.bool_], list[float | None] | None]:
    """STRIP beside a pair (issue 32): the entropies of the inputs its stage covers (None
    elsewhere), and the suspect mask widened by low entropy when the stage is 'all'.

    Run on the disagreements alone it only annotates the quarantine rows, so a repairer
    may drop the likely-clean ones; run on every input it also catches a trigger that both
    members follow.
    """
    if strip is None:
        return disagree, None
    chosen = np.ones_like(disagree) if strip.stage == "all" else disagree
    entropy: list[float | None] = [None] * len(disagree)
    idx = np.flatnonzero(chosen)
    if len(idx):
        h = strip.entropies(lambda x: members.run("badnet", x), members.images[idx])
        for i, e in zip(idx, h, strict=True):
            entropy[int(i)] = float(e)
    if strip.stage == "all":
        low = np.array([e is not None and e <= strip.sigma for e in entropy], dtype=bool)
        disagree = disagree | low
    return disagree, entropy


CODEFEND = register_defense(
    Defense(
        name="codefend",
        summary="the suspect alone; STRIP flags low-entropy inputs for the quarantine "
        "and serves the model's label; CycleGAN repair of the one model",
        policy=StripPolicy,
        prepare="strip-fit",
        repair="cyclegan",
        members=("badnet",),
    )
)

CODEFEND_REJECT = register_defense(
    Defense(
        name="codefend-reject",
        summary="as codefend, but a STRIP-flagged input gets no label (null)",
        policy=StripRejectPolicy,
        prepare="strip-fit",
        repair="cyclegan",
        members=("badnet",),
    )
)
