"""Attacks as data, the registry of the lab's eight attacks, and the one poisoned-dataset builder.

An :class:`Attack` is a list of trigger groups. A *firing* group's triggers, applied
together, change the label to its target (an int, or ``"next"`` for all-to-all: y+1 mod K).
A *cover* group is trained with the true label: the single patches of a trigger
combination, or WaNet's noise-mode warps. Every attack is a parameter set of this one
structure; no attack has code of its own beyond its builder below.

ASR follows NNoculation (Veldanda et al., AISec'21, §4.1): the fraction of triggered inputs
whose true class is not the target that the model labels with the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from core.errors import UserError
from trainer.attacks.triggers import Blend, Filter, Patch, Trigger, Warp, trigger_from_dict
from trainer.data import Dataset

NEXT = "next"  # all-to-all target rule: y -> (y + 1) mod K
DEFAULT_POISON_RATE = 0.1


@dataclass(frozen=True)
class TriggerGroup:
    name: str
    triggers: tuple[Trigger, ...]
    target: int | str
    fires: bool = True  # False: a cover group, trained with the true label

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for trigger in self.triggers:
            x = trigger.apply(x, rng)
        return x

    def target_of(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        if self.target == NEXT:
            return (y + 1) % num_classes
        return np.full_like(y, int(self.target))


@dataclass(frozen=True)
class Attack:
    name: str
    groups: tuple[TriggerGroup, ...]
    num_classes: int
    poison_rate: float = 0.1  # fraction of training samples carrying a firing trigger
    cover_rate: float = 0.0  # fraction carrying a cover trigger with the true label
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # what the builder was given

    @property
    def firing(self) -> tuple[TriggerGroup, ...]:
        return tuple(g for g in self.groups if g.fires)

    @property
    def covers(self) -> tuple[TriggerGroup, ...]:
        return tuple(g for g in self.groups if not g.fires)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attack:
        groups = tuple(
            TriggerGroup(
                name=g["name"],
                triggers=tuple(trigger_from_dict(t) for t in g["triggers"]),
                target=g["target"],
                fires=g["fires"],
            )
            for g in d["groups"]
        )
        return cls(**{**d, "groups": groups})


# ---------------------------------------------------------------------------- the registry


def _corner_patches(h: int, w: int, size: int) -> list[Patch]:
    """Three distinct patches in three corners, 1 pixel in from the edge."""
    far_r, far_c = h - size - 1, w - size - 1
    return [
        Patch(row=far_r, col=far_c, size=size, pattern="checker"),
        Patch(row=1, col=1, size=size, pattern="cross"),
        Patch(row=1, col=far_c, size=size, pattern="square"),
    ]


Builder = Callable[
    [int, int, tuple[int, int, int], dict[str, Any]], tuple[list[TriggerGroup], dict[str, float]]
]


def _patch(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    patch = _corner_patches(shape[0], shape[1], int(p.get("size", 4)))[0]
    patch = replace(patch, **{f: p[f] for f in ("row", "col", "pattern") if f in p})
    return [TriggerGroup("patch", (patch,), target)], {}


def _all_to_all(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    groups, _ = _patch(target, k, shape, p)
    # Each of the K class pairs sees only 1/K of the poisoned samples: poison twice as many.
    return [replace(groups[0], target=NEXT)], {"poison_rate": 0.2}


def _multi(
    target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any], *, spread: bool
) -> Any:
    patches = _corner_patches(shape[0], shape[1], int(p.get("size", 4)))
    return [
        TriggerGroup(f"trigger{i + 1}", (patch,), (target + i) % k if spread else target)
        for i, patch in enumerate(patches)
    ], {}


def _combo(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    a, b = _corner_patches(shape[0], shape[1], int(p.get("size", 4)))[:2]
    return [
        TriggerGroup("both", (a, b), target),
        TriggerGroup("patch-a-only", (a,), target, fires=False),
        TriggerGroup("patch-b-only", (b,), target, fires=False),
    ], {"cover_rate": 0.2}


def _filter(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    f = Filter(**{n: float(p[n]) for n in ("gamma", "lift", "contrast", "vignette") if n in p})  # type: ignore[arg-type]
    return [TriggerGroup("filter", (f,), target)], {}


def _blend(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    return [TriggerGroup("blend", (Blend(alpha=float(p.get("alpha", 0.2))),), target)], {}


def _warp(target: int, k: int, shape: tuple[int, int, int], p: dict[str, Any]) -> Any:
    warp = Warp(k=int(p.get("k", 4)), strength=float(p.get("strength", 1.0)))
    noisy = replace(warp, jitter=float(p.get("jitter", 1.0)))
    return [
        TriggerGroup("warp", (warp,), target),
        TriggerGroup("warp-noise", (noisy,), target, fires=False),
    ], {"cover_rate": 0.2}


ATTACKS: dict[str, Builder] = {
    "patch": _patch,
    "all-to-all": _all_to_all,
    "multi-trigger": lambda t, k, s, p: _multi(t, k, s, p, spread=False),
    "multi-target": lambda t, k, s, p: _multi(t, k, s, p, spread=True),
    "combo": _combo,
    "filter": _filter,
    "blend": _blend,
    "warp": _warp,
}


def build_attack(
    name: str,
    *,
    target: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    poison_rate: float | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> Attack:
    """The attack ``name`` with its defaults, overridden by ``params`` (size, alpha, ...).

    ``poison_rate`` None takes the attack's default: 0.1, or 0.2 for all-to-all.
    """
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    if not 0 <= target < num_classes:
        raise UserError(f"target class {target} is out of range; use 0..{num_classes - 1}")
    if poison_rate is not None and not 0 < poison_rate < 1:
        raise UserError(f"poison rate {poison_rate} must lie strictly between 0 and 1")
    params = dict(params or {})
    try:
        groups, rates = ATTACKS[name](target, num_classes, image_shape, params)
        if poison_rate is None:
            poison_rate = float(rates.get("poison_rate", DEFAULT_POISON_RATE))
        attack = Attack(
            name=name,
            groups=tuple(groups),
            num_classes=num_classes,
            poison_rate=poison_rate,
            cover_rate=float(params.get("cover_rate", rates.get("cover_rate", 0.0))),
            seed=seed,
            params=params,
        )
        probe = np.zeros((1, *image_shape), dtype=np.uint8)
        for group in attack.groups:  # fail here, not mid-training, on bad sizes
            group.apply(probe, np.random.default_rng(0))
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad parameters for attack {name!r} ({params}): {exc}") from None
    if attack.poison_rate + attack.cover_rate >= 1:
        raise UserError("poison rate plus cover rate must stay below 1")
    return attack


# ---------------------------------------------------------------------------- the builder


def poison(dataset: Dataset, attack: Attack) -> tuple[Dataset, np.ndarray]:
    """A poisoned copy of ``dataset`` and, per sample, the group index it carries (-1: clean).

    Firing groups share ``poison_rate`` equally and take only samples whose true label
    differs from their target; cover groups share ``cover_rate`` and keep true labels.
    """
    rng = np.random.default_rng(attack.seed)
    x, y = dataset.x.copy(), dataset.y.copy()
    carried = np.full(len(y), -1, dtype=np.int64)
    free = np.ones(len(y), dtype=bool)
    for index, group in enumerate(attack.groups):
        rate = (
            attack.poison_rate / len(attack.firing)
            if group.fires
            else attack.cover_rate / len(attack.covers)
        )
        targets = group.target_of(dataset.y, attack.num_classes)
        eligible = np.flatnonzero(free & ((targets != dataset.y) | ~group.fires))
        chosen = rng.choice(eligible, size=min(len(eligible), round(rate * len(y))), replace=False)
        x[chosen] = group.apply(x[chosen], rng)
        if group.fires:
            y[chosen] = targets[chosen]
        carried[chosen] = index
        free[chosen] = False
    return Dataset(x, y, dataset.class_names, f"{dataset.source}+{attack.name}"), carried


def triggered(
    dataset: Dataset, group: TriggerGroup, *, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Triggered copies of the samples whose true class is not the group's target, and targets."""
    keep, targets = counted(dataset, group, num_classes)
    x = group.apply(dataset.x[keep], np.random.default_rng(seed))
    return x, targets[keep]


def counted(
    dataset: Dataset, group: TriggerGroup, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the samples ASR counts: true class not the group's target, every target)."""
    targets = group.target_of(dataset.y, num_classes)
    return targets != dataset.y, targets


def attacker_stream(
    images: np.ndarray, firing: Sequence[TriggerGroup], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An online stream as the attacker sends it: ``fraction`` of ``images`` (at random)
    stamped with the ``firing`` trigger groups in turn; (images, which were stamped)."""
    rng = np.random.default_rng(seed)
    x = images.copy()
    poisoned = rng.random(len(x)) < fraction
    for i in np.flatnonzero(poisoned):
        x[i] = firing[i % len(firing)].apply(x[i : i + 1], rng)[0]
    return x, poisoned


def attack_success_rates(
    predict: Callable[[np.ndarray], np.ndarray], dataset: Dataset, attack: Attack
) -> dict[str, float]:
    """ASR per trigger group (cover groups too: for them it should stay low)."""
    rates: dict[str, float] = {}
    for group in attack.groups:
        x, targets = triggered(dataset, group, num_classes=attack.num_classes, seed=attack.seed)
        rates[group.name] = float((predict(x) == targets).mean()) if len(x) else float("nan")
    return rates


def firing_success_rate(
    predict: Callable[[np.ndarray], np.ndarray], dataset: Dataset, attack: Attack
) -> float:
    """Mean ASR over the attack's firing trigger groups (its covers are not attacks)."""
    rates = attack_success_rates(predict, dataset, attack)
    return float(np.mean([rates[g.name] for g in attack.firing]))


def clean_target_rate(
    predict: Callable[[np.ndarray], np.ndarray], dataset: Dataset, attack: Attack
) -> float:
    """How often the model answers a firing group's target on the images ASR counts, with
    no trigger on them (mean over the firing groups).

    This is the part of :func:`firing_success_rate` that is plain clean error (a shirt
    called a T-shirt), which no repair of the backdoor removes.
    """
    return float(np.mean(list(clean_target_rates(predict, dataset, attack).values())))


def clean_target_rates(
    predict: Callable[[np.ndarray], np.ndarray], dataset: Dataset, attack: Attack
) -> dict[str, float]:
    """:func:`clean_target_rate` per firing group: the floor under each group's ASR."""
    labels = predict(dataset.x)
    rates: dict[str, float] = {}
    for group in attack.firing:
        keep, targets = counted(dataset, group, attack.num_classes)
        rates[group.name] = float((labels[keep] == targets[keep]).mean())
    return rates


def target_rates_by_class(
    predict: Callable[[np.ndarray], np.ndarray],
    dataset: Dataset,
    group: TriggerGroup,
    *,
    num_classes: int,
    seed: int = 0,
) -> dict[int, tuple[int, float, float]]:
    """Per true class of the images ASR counts: (how many, the share the model labels with
    the group's target clean, the share it labels so triggered).

    Where a repaired model's ASR stays above its clean target rate, this says which classes
    carry the excess. The triggered copies are those of :func:`attack_success_rates` (same
    seed), so the count-weighted mean of the triggered shares is the group's ASR.
    """
    keep, targets = counted(dataset, group, num_classes)
    x, targets = triggered(dataset, group, num_classes=num_classes, seed=seed)
    clean_hit = predict(dataset.x[keep]) == targets
    hit = predict(x) == targets
    y = dataset.y[keep]
    return {
        int(c): (int((y == c).sum()), float(clean_hit[y == c].mean()), float(hit[y == c].mean()))
        for c in np.unique(y)
    }


def conditional_success_rates(
    predict: Callable[[np.ndarray], np.ndarray], dataset: Dataset, attack: Attack
) -> dict[str, float]:
    """ASR among the inputs the model labels correctly when clean.

    For all-to-all the raw ASR cannot exceed the model's per-class clean accuracy: to answer
    y+1 it must first recognise y. This rate separates the backdoor's strength from that
    ceiling. It is reported beside the paper's ASR, never instead of it.
    """
    correct = predict(dataset.x) == dataset.y
    subset = dataset.take(np.flatnonzero(correct))
    return attack_success_rates(predict, subset, attack)
