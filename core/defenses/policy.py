"""The per-request policy seam (Ray-free): a batch and the round's models in, answers out.

A policy sees the batch of images and the round's members through :class:`Members`. It
may read each member's softmax on the batch (computed once and shared), or run a member on
any other batch, such as transformed or perturbed copies, in one forward. It answers, per
input, the served label (None: rejected) and whether the input is suspect, which sends it
to the quarantine. The gateway's replicas and the trainer's gate both decide through
:func:`decide_batch` and :func:`served_rates`, so a round is gated on what it will serve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from core.errors import UserError
from core.pair import ModelPair

Runner = Callable[[NDArray[np.uint8]], torch.Tensor]  # images (N, H, W, C) -> logits (N, K)


class Members:
    """A round's models on one batch, as a policy sees them."""

    def __init__(
        self,
        runners: Mapping[str, Runner],
        images: NDArray[np.uint8],
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self._runners = dict(runners)
        self.images = images  # (N, H, W, C) uint8, the request batch
        self.params: Mapping[str, Any] = params or {}  # the round's fitted values
        self._probs: dict[str, torch.Tensor] = {}
        self._partial: dict[str, tuple[NDArray[np.intp], torch.Tensor]] = {}

    @classmethod
    def of_pair(cls, pair: ModelPair, images: NDArray[np.uint8]) -> Members:
        runners = {role: pair.member(role).logits for role in pair.roles}
        return cls(runners, images, pair.defense.params)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._runners)

    def _runner(self, role: str) -> Runner:
        try:
            return self._runners[role]
        except KeyError:
            raise UserError(f"this round has no {role!r} member") from None

    def probs(self, role: str) -> torch.Tensor:
        """``role``'s softmax on the request batch, (N, K); computed once per batch."""
        if role not in self._probs:
            self._probs[role] = self._runner(role)(self.images).softmax(1)
        return self._probs[role]

    def probs_at(self, role: str, idx: NDArray[np.intp]) -> torch.Tensor:
        """``role``'s softmax on the request inputs ``idx`` alone, (len(idx), K), in one
        forward (none for an empty ``idx``); kept, so each answer can record it."""
        if role in self._probs:
            return self._probs[role][idx]
        idx = np.asarray(idx, dtype=np.intp)
        if len(idx) == 0:
            out = torch.zeros(0, self.probs("badnet").shape[1])  # every member has K classes
        else:
            out = self._runner(role)(self.images[idx]).softmax(1)
        self._partial[role] = (idx, out)
        return out

    def top(self, role: str) -> tuple[list[float | None], list[int | None]]:
        """Per request input, ``role``'s top score and label where the policy ran it on that
        input (None elsewhere): a policy that consults a member on a few inputs does not
        pay for the rest."""
        n = len(self.images)
        if role in self._probs:
            score, label = self._probs[role].max(1)
            return [float(s) for s in score], [int(k) for k in label]
        scores: list[float | None] = [None] * n
        labels: list[int | None] = [None] * n
        if role in self._partial:
            idx, probs = self._partial[role]
            score, label = probs.max(1) if len(idx) else (torch.zeros(0), torch.zeros(0))
            for i, s, k in zip(idx.tolist(), score.tolist(), label.tolist(), strict=True):
                scores[i], labels[i] = float(s), int(k)
        return scores, labels

    def run(self, role: str, images: NDArray[np.uint8]) -> torch.Tensor:
        """``role``'s softmax on any batch (M, H, W, C), such as transformed copies, in one
        forward; nothing is cached."""
        return self._runner(role)(images).softmax(1)

    def computed(self, role: str) -> bool:
        return role in self._probs


@dataclass(frozen=True)
class Verdict:
    """A policy's answer for a batch: per input, the label (None: rejected) and suspicion,
    and the STRIP entropy where the policy measured one (kept with a quarantined row)."""

    labels: list[int | None]
    suspect: list[bool]
    entropy: list[float | None] | None = None


class Policy(Protocol):
    """Decides, per input of ``members.images``, the served label and whether it is suspect."""

    name: ClassVar[str]

    def decide(self, members: Members) -> Verdict: ...


@dataclass(frozen=True)
class Decision:
    """One answer. ``label`` is None when the policy rejects the input."""

    label: int | None
    suspect: bool
    badnet_label: int
    goodnet_label: int | None  # None: a single-model round, or the policy did not run it
    badnet_score: float
    goodnet_score: float | None
    round: int
    entropy: float | None = None  # STRIP's mean entropy, where the policy measured it


def decide_batch(pair: ModelPair, images: NDArray[np.uint8], policy: Policy) -> list[Decision]:
    """Apply ``policy`` to a batch (N, H, W, C) with ``pair``'s members; each answer also
    records each member's label and score, which the quarantine row keeps."""
    members = Members.of_pair(pair, images)
    verdict = policy.decide(members)
    members.probs("badnet")  # every answer records the suspect's label
    bad_score, bad_label = members.top("badnet")
    good_score, good_label = members.top("goodnet")
    entropy = verdict.entropy or [None] * len(images)
    return [
        Decision(
            label=verdict.labels[i],
            suspect=bool(verdict.suspect[i]),
            badnet_label=int(bad_label[i]),  # type: ignore[arg-type]  # computed on all
            goodnet_label=good_label[i],
            badnet_score=float(bad_score[i]),  # type: ignore[arg-type]
            goodnet_score=good_score[i],
            round=pair.round,
            entropy=entropy[i],
        )
        for i in range(len(images))
    ]


def served_rates(
    runners: Mapping[str, Runner],
    x: NDArray[np.uint8],
    y: NDArray[Any],
    policy: Policy,
    params: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """The clean accuracy of the answers ``policy`` serves on ``x`` (a rejected answer
    counts as wrong), and the fraction of ``x`` it flags as suspect (would quarantine)."""
    verdict = policy.decide(Members(runners, x, params))
    served = np.array([-1 if label is None else label for label in verdict.labels])
    return float((served == np.asarray(y)).mean()), float(np.mean(verdict.suspect))
