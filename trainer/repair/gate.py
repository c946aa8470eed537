"""The repair gate: may a candidate pair replace the one that serves?

DESIGN.md's rule, "clean accuracy on held-out validation data within theta of the round it
replaces", judged on the answers clients get under the round's own policy (a rejected
answer counts as wrong; docs/DECISIONS.md, "The gate"). Two more references and one more
granularity keep the rule from being walked down a little at a time by whoever feeds the
quarantine (issue 31's poisoning threat):

- the candidate is compared with round 0 (the model as deployed) as well as with the round
  it replaces, so drops within theta cannot add up round after round;
- each class has its own floor (``class_drop`` points): an attacker who floods one class's
  clean images can otherwise buy a large loss on that class inside a small overall one.
  A class fails only when its loss is also more than chance (a paired sign test), since
  one class's share of a small gate split moves several points per image.

The pair may also flag at most ``max_clean_suspect`` percent of the clean gate images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch import nn

from core.bundle import InputSpec, batched_logits
from core.defenses import Members, Policy
from trainer.data import Dataset
from trainer.repair.config import RepairConfig

EPS = 1e-12  # float slack in the comparisons, so an equal score passes
CLASS_ALPHA = 0.05  # a class's drop counts when a sign test puts it below this chance


def runners(models: Mapping[str, nn.Module], spec: InputSpec) -> dict[str, Any]:
    return {role: (lambda x, m=model: batched_logits(m, spec, x)) for role, model in models.items()}


def served(
    models: Mapping[str, nn.Module],
    gate: Dataset,
    spec: InputSpec,
    policy: Policy,
    params: Mapping[str, Any] | None,
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """The labels ``policy`` serves on the gate images (-1 for a rejected answer) and which
    images it flags as suspect."""
    verdict = policy.decide(Members(runners(models, spec), gate.x, params))
    labels = np.array([-1 if label is None else label for label in verdict.labels], np.int64)
    return labels, np.asarray(verdict.suspect, bool)


def per_class(labels: NDArray[np.int64], y: NDArray[Any]) -> dict[int, float]:
    """Served accuracy on each class present in ``y``."""
    y = np.asarray(y)
    return {int(c): float((labels[y == c] == c).mean()) for c in np.unique(y)}


def sign_test(worse: int, better: int) -> float:
    """One-sided exact sign test: the chance of ``worse`` or more of the ``worse + better``
    changed answers going wrong if each change were a fair coin."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0


def _class_failures(
    ref: NDArray[np.int64], after: NDArray[np.int64], y: NDArray[Any], name: str, floor: float
) -> list[str]:
    """A class fails when it loses more than ``floor`` points and the loss is not chance:
    the images it newly gets wrong outnumber those it newly gets right beyond
    ``CLASS_ALPHA`` (a paired sign test), since a class's accuracy on a small gate split
    moves by whole images (20 per class at the demo's 1,000 validation images: 5 points)."""
    out = []
    for c in np.unique(y):
        mask = y == c
        was, now = ref[mask] == c, after[mask] == c
        drop = float(was.mean() - now.mean())
        worse, better = int((was & ~now).sum()), int((~was & now).sum())
        p = sign_test(worse, better)
        if drop > floor / 100 + EPS and p < CLASS_ALPHA:
            out.append(
                f"class {int(c)}: {100 * was.mean():.1f}% ({name}) -> {100 * now.mean():.1f}%, "
                f"more than the per-class floor of {floor:g} points down "
                f"({worse} images lost, {better} gained: p = {p:.3g})"
            )
    return out


def gate_round(
    before: Mapping[str, nn.Module],
    after: Mapping[str, nn.Module],
    gate: Dataset,
    spec: InputSpec,
    cfg: RepairConfig,
    policy: Policy,
    params: Mapping[str, Any] | None = None,
    origin: Mapping[str, nn.Module] | None = None,
) -> tuple[dict[str, Any], bool]:
    """The gate's numbers for ``before`` -> ``after`` (role -> model) under ``policy``, also
    against round 0's ``origin`` when given, and whether the round passes. The metrics hold
    ``failures``: one line per broken bound (empty when it passes)."""
    refs = {"before": before, **({"round 0": origin} if origin is not None else {})}
    answers = {name: served(models, gate, spec, policy, params) for name, models in refs.items()}
    answers["after"] = served(after, gate, spec, policy, params)
    y = np.asarray(gate.y)
    ca = {name: float((labels == y).mean()) for name, (labels, _) in answers.items()}
    flagged = {name: float(flags.mean()) for name, (_, flags) in answers.items()}
    classes = {name: per_class(labels, y) for name, (labels, _) in answers.items()}
    failures = []
    for ref in refs:
        if ca["after"] < ca[ref] - cfg.ca_drop / 100 - EPS:
            failures.append(
                f"served clean accuracy {100 * ca[ref]:.2f}% ({ref}) -> "
                f"{100 * ca['after']:.2f}%, more than {cfg.ca_drop:g} points down"
            )
        failures += _class_failures(answers[ref][0], answers["after"][0], y, ref, cfg.class_drop)
    if flagged["after"] > cfg.max_clean_suspect / 100 + EPS:
        failures.append(
            f"{100 * flagged['after']:.2f}% of clean gate images flagged suspect, more than "
            f"{cfg.max_clean_suspect:g}%"
        )
    metrics = {
        "served clean accuracy": ca,
        "clean images flagged suspect": flagged,
        "served accuracy per class": {name: classes[name] for name in classes},
        "failures": failures,
    }
    return metrics, not failures


def describe_gate(gate: dict[str, Any]) -> str:
    """'served clean accuracy 93.03% -> 89.55%, ...' for messages and notes."""
    return ", ".join(
        f"{what} {100 * gate[what]['before']:.2f}% -> {100 * gate[what]['after']:.2f}%"
        for what in ("served clean accuracy", "clean images flagged suspect")
        if what in gate
    )
