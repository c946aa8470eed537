"""The defense registry: each defense is a named stack that a round carries.

A defense has up to three parts (DESIGN.md, "Defenses are named stacks"): a pre-deployment
step that makes round 0 from the suspect and clean validation data, a per-request policy,
and a repairer that makes round K+1 from round K and the quarantine. Only the policy runs
in the gateway, so it is an object here; the other two are training code, which lives in
``trainer`` and is named here by the key of ``trainer.defenses``' registries. Keys are
short lowercase names, as BackdoorBox and TrojanZoo key theirs.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from core.defenses.policy import Policy
from core.errors import UserError
from core.pair import ModelPair, SwapError

PolicyFactory = Callable[[Mapping[str, Any]], Policy]  # a policy class: fitted values -> policy
NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Defense:
    """One registered stack."""

    name: str
    summary: str  # one line, shown by ``trainer defenses``
    policy: PolicyFactory
    prepare: str | None = None  # a key of trainer.defenses.PREPARE_STEPS; None: the suspect
    repair: str | None = None  # a key of trainer.defenses.REPAIRERS; None: no repair rounds
    members: tuple[str, ...] = ("badnet", "goodnet")  # the roles its rounds register


_DEFENSES: dict[str, Defense] = {}


def register_defense(defense: Defense) -> Defense:
    """Add ``defense`` to the registry; a name is registered once."""
    if not NAME.match(defense.name):
        raise ValueError(f"defense name {defense.name!r} must be short, lowercase, with dashes")
    if defense.name in _DEFENSES and _DEFENSES[defense.name] is not defense:
        raise ValueError(f"a defense named {defense.name!r} is already registered")
    _DEFENSES[defense.name] = defense
    return defense


def get_defense(name: str) -> Defense:
    """The defense registered as ``name``; a clear error lists the known ones."""
    try:
        return _DEFENSES[name]
    except KeyError:
        raise UserError(
            f"unknown defense {name!r}; registered: {', '.join(sorted(_DEFENSES))} "
            "(defenses from other modules need BQG_DEFENSE_MODULES)"
        ) from None


def defense_names() -> list[str]:
    return sorted(_DEFENSES)


def load_defense_modules(modules: Sequence[str]) -> None:
    """Import the operator's modules that register more defenses (``BQG_DEFENSE_MODULES``).

    Opt-in, like ``BQG_TRUSTED_ARCH_MODULES``: a round's manifest comes from the store, and
    only code the operator named is ever imported for it.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"cannot import defense module {module!r}: {exc}") from None


def with_policy(pair: ModelPair, *, max_overlays: int | None = None) -> ModelPair:
    """``pair`` with the policy its round's defense names, built from the round's fitted
    values; an unknown defense, members other than the defense's, or a policy that runs
    more than ``max_overlays`` extra forwards per input is a clear error, so the round does
    not serve."""
    defense = get_defense(pair.defense.name)
    if pair.roles != defense.members:
        raise SwapError(
            f"round {pair.round} registers {', '.join(pair.roles)}, but defense "
            f"{defense.name!r} serves {', '.join(defense.members)}"
        )
    try:
        policy = defense.policy(pair.defense.params)
    except Exception as exc:  # a bad fitted value must not kill the follower's thread
        raise SwapError(
            f"round {pair.round}: defense {defense.name!r} cannot build its policy from the "
            f"round's parameters ({type(exc).__name__}: {exc})"
        ) from None
    strip = getattr(policy, "strip", None)
    if strip is not None and tuple(strip.pool.shape[1:]) != pair.shape:
        raise SwapError(
            f"round {pair.round}: its STRIP overlays are {'x'.join(map(str, strip.pool.shape[1:]))}"
            f", but its models take {'x'.join(map(str, pair.shape))} images"
        )
    overlays = int(getattr(policy, "overlays", 0))
    if max_overlays is not None and overlays > max_overlays:
        raise SwapError(
            f"round {pair.round}: its {policy.name!r} policy runs {overlays} overlays per "
            f"input, above the configured maximum of {max_overlays} (BQG_STRIP_MAX_OVERLAYS)"
        )
    return replace(pair, policy=policy)
