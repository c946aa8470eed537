"""A round's served models, loaded and verified against the store (Ray-free).

The store is the source of truth for which models serve (DESIGN.md). A round's pair is
loaded only when each bundle's weights hash to the sha256 the store registered for it, and
the round's manifest (``round.json`` beside the bundles) names the defense it serves. The
gateway's replicas and the trainer's repair rounds load pairs the same way, through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from core.bundle import Bundle, load_bundle
from core.errors import UserError
from core.quarantine import ActiveInfo, round_models
from core.schema import ModelVersion

if TYPE_CHECKING:
    from core.defenses.policy import Policy

ROLES = ("badnet", "goodnet")
ROUND_MANIFEST = "round.json"
DEFAULT_DEFENSE = "nnoculation"  # rounds written before rounds named their defense


class SwapError(UserError):
    """A round's bundles could not be loaded or did not match the store."""


@dataclass(frozen=True)
class RoundDefense:
    """What a round's manifest says it serves: a registered defense and its fitted values."""

    name: str = DEFAULT_DEFENSE
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"defense": self.name, "params": self.params}


def write_round_manifest(directory: Path, defense: RoundDefense) -> None:
    """Write ``round.json`` into a round's directory (before it is published)."""
    (Path(directory) / ROUND_MANIFEST).write_text(json.dumps(defense.to_dict(), indent=2) + "\n")


def read_round_manifest(directory: Path) -> RoundDefense:
    """The defense a round directory names; rounds from before manifests serve NNoculation."""
    path = Path(directory) / ROUND_MANIFEST
    if not path.exists():
        return RoundDefense()
    try:
        data = json.loads(path.read_text())
        name, params = data["defense"], data.get("params") or {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SwapError(f"{path} is not a round manifest ({exc})") from None
    if not isinstance(name, str) or not isinstance(params, dict):
        raise SwapError(f"{path}: 'defense' must be a name and 'params' an object")
    return RoundDefense(name, params)


@dataclass(frozen=True)
class ModelPair:
    """One round's members and its defense; swapped as one reference.

    ``badnet`` is the suspect's line: the model as given at round 0, repaired in later
    rounds. ``goodnet`` is the second opinion, or None in a single-model round, where the
    defense's policy decides alone (CoDefend, paper 000 §3).
    """

    round: int
    badnet: Bundle
    goodnet: Bundle | None
    defense: RoundDefense = field(default_factory=RoundDefense)
    policy: Policy | None = None  # the defense's policy, resolved by core.defenses.with_policy

    def __post_init__(self) -> None:
        if self.goodnet is None:
            return
        a, b = self.badnet.manifest, self.goodnet.manifest
        if a.input != b.input or a.num_classes != b.num_classes:
            raise UserError(
                f"round {self.round}: badnet and goodnet disagree on input spec or classes"
            )

    @property
    def roles(self) -> tuple[str, ...]:
        """The members this round has, in ``ROLES`` order."""
        return ROLES if self.goodnet is not None else ROLES[:1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.badnet.manifest.input.shape

    @property
    def class_names(self) -> list[str]:
        return self.badnet.manifest.class_names

    def member(self, role: str) -> Bundle:
        if role == "badnet":
            return self.badnet
        if role == "goodnet" and self.goodnet is not None:
            return self.goodnet
        raise UserError(
            f"round {self.round} has no {role!r} member; it has {', '.join(self.roles)}"
        )

    def hashes(self) -> dict[str, str]:
        return {role: self.member(role).manifest.weights_sha256 for role in self.roles}


def load_pair(info: ActiveInfo, *, trusted_modules: Sequence[str] = ()) -> ModelPair:
    """The pair of the round ``info`` describes, each bundle verified against the store."""
    return _verified_pair(info.round, info.models, trusted_modules)


def load_round_pair(
    session: Session, round_no: int, *, trusted_modules: Sequence[str] = ()
) -> ModelPair:
    """The registered pair of any round, active or not, verified like :func:`load_pair`."""
    models = {m.role: m for m in round_models(session=session, round_no=round_no)}
    return _verified_pair(round_no, models, trusted_modules)


def _verified_pair(
    round_no: int, models: Mapping[str, ModelVersion], trusted_modules: Sequence[str]
) -> ModelPair:
    if "badnet" not in models:
        raise SwapError(f"round {round_no} has no registered badnet")
    bundles: dict[str, Bundle] = {}
    for role in [r for r in ROLES if r in models]:
        model = models[role]
        bundle = load_bundle(Path(model.bundle_path), trusted_modules=trusted_modules)
        if bundle.manifest.weights_sha256 != model.sha256:
            raise SwapError(
                f"round {round_no} {role}: bundle at {model.bundle_path} has sha256 "
                f"{bundle.manifest.weights_sha256[:12]}, the store registered {model.sha256[:12]}"
            )
        bundles[role] = bundle
    defense = read_round_manifest(Path(models["badnet"].bundle_path).parent)
    return ModelPair(round_no, bundles["badnet"], bundles.get("goodnet"), defense)
