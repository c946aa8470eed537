"""The ensemble decision, Ray-free: run both models of a round, apply the policy.

NNoculation (003_a065321fd23236f4.txt, §3.3): serve the BadNet and the GoodNet side by
side; when they disagree the input is probably triggered, so answer with the GoodNet's
label and quarantine the input. BBD (004_c3f792465b48786b.txt) rejects instead. A policy
is the seam where later detectors (STRIP, filter-then-contrast) plug in: it sees both
models' probabilities and decides the answer and whether the input is suspect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from core.bundle import Bundle
from core.errors import UserError


@dataclass(frozen=True)
class ModelPair:
    """The (badnet, goodnet) pair of one round; swapped as one reference."""

    round: int
    badnet: Bundle
    goodnet: Bundle

    def __post_init__(self) -> None:
        a, b = self.badnet.manifest, self.goodnet.manifest
        if a.input != b.input or a.num_classes != b.num_classes:
            raise UserError(
                f"round {self.round}: badnet and goodnet disagree on input spec or classes"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.badnet.manifest.input.shape

    @property
    def class_names(self) -> list[str]:
        return self.badnet.manifest.class_names

    def hashes(self) -> dict[str, str]:
        return {
            "badnet": self.badnet.manifest.weights_sha256,
            "goodnet": self.goodnet.manifest.weights_sha256,
        }


@dataclass(frozen=True)
class Decision:
    """One answer. ``label`` is None when the policy rejects the input."""

    label: int | None
    suspect: bool
    badnet_label: int
    goodnet_label: int
    badnet_score: float
    goodnet_score: float
    round: int


class Policy(Protocol):
    name: ClassVar[str]

    def decide(
        self, bad_probs: torch.Tensor, good_probs: torch.Tensor
    ) -> tuple[list[int | None], list[bool]]:
        """Per input: the label to answer (None: rejected) and whether it is suspect."""
        ...


class GoodNetPolicy:
    """NNoculation: agree -> that label; disagree -> the GoodNet's label, suspect."""

    name: ClassVar[str] = "goodnet"

    def decide(
        self, bad_probs: torch.Tensor, good_probs: torch.Tensor
    ) -> tuple[list[int | None], list[bool]]:
        bad, good = bad_probs.argmax(1), good_probs.argmax(1)
        return [int(g) for g in good], (bad != good).tolist()


class RejectPolicy:
    """BBD-style: disagree -> no label, suspect."""

    name: ClassVar[str] = "reject"

    def decide(
        self, bad_probs: torch.Tensor, good_probs: torch.Tensor
    ) -> tuple[list[int | None], list[bool]]:
        bad, good = bad_probs.argmax(1), good_probs.argmax(1)
        suspect = (bad != good).tolist()
        return [None if s else int(g) for g, s in zip(good, suspect, strict=True)], suspect


POLICIES: dict[str, type[GoodNetPolicy] | type[RejectPolicy]] = {
    p.name: p for p in (GoodNetPolicy, RejectPolicy)
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UserError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}") from None


def decide_batch(pair: ModelPair, images: NDArray[np.uint8], policy: Policy) -> list[Decision]:
    """Run both models of ``pair`` on a batch (N, H, W, C) and apply ``policy``."""
    bad_probs = pair.badnet.logits(images).softmax(1)
    good_probs = pair.goodnet.logits(images).softmax(1)
    labels, suspects = policy.decide(bad_probs, good_probs)
    bad_score, bad_label = bad_probs.max(1)
    good_score, good_label = good_probs.max(1)
    return [
        Decision(
            label=labels[i],
            suspect=bool(suspects[i]),
            badnet_label=int(bad_label[i]),
            goodnet_label=int(good_label[i]),
            badnet_score=float(bad_score[i]),
            goodnet_score=float(good_score[i]),
            round=pair.round,
        )
        for i in range(len(images))
    ]
