"""The trainer's halves of the defense stacks: pre-deployment steps and repairers, by key.

``core.defenses`` registers each defense with its policy and names its pre-deployment step
and repairer by a key of :data:`PREPARE_STEPS` and :data:`REPAIRERS`. A new defense adds
its module and one entry in each table it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from core.defenses import get_defense
from core.errors import UserError
from trainer.bbd import prepare_bbd_round
from trainer.prepare import prepare_round_zero
from trainer.repair.base import Repairer
from trainer.repair.bbd import FinePruningRepairer, NeuralCleanseRepairer
from trainer.repair.config import RepairConfig
from trainer.repair.nnoculation import CycleGANRepairer
from trainer.strip import prepare_strip_round

REPAIRERS: dict[str, Callable[[RepairConfig], Repairer]] = {
    "cyclegan": CycleGANRepairer,  # Veldanda et al., AISec'21, §3.3; CoDefend §3.3
    "neural-cleanse": NeuralCleanseRepairer,  # Wang et al., S&P'19, §V-C: unlearning
    "fine-pruning": FinePruningRepairer,  # Liu et al., RAID'18, §4
}


PREPARE_STEPS: dict[str, Callable[..., Any]] = {
    "noise-retrain": prepare_round_zero,  # Veldanda et al., AISec'21, §3.2 and Table 2
    "strip-fit": prepare_strip_round,  # CoDefend (paper 000) §3.2: the suspect alone + STRIP
    "fine-pruning": partial(prepare_bbd_round, targeted=False),  # BBD (paper 004) §4.1: R
    "bbd": partial(prepare_bbd_round, targeted=True),  # R, and Neural Cleanse's targets
}
BBD_STEPS = ("fine-pruning", "bbd")  # the steps that take a BBDConfig


def make_repairer(defense: str, cfg: RepairConfig) -> Repairer:
    """The repairer of the defense a round carries, built for one round."""
    key = get_defense(defense).repair
    if key is None:
        raise UserError(f"defense {defense!r} has no repairer: its rounds are not repaired")
    try:
        return REPAIRERS[key](cfg)
    except KeyError:
        raise UserError(
            f"defense {defense!r} names repairer {key!r}, which is not registered"
        ) from None


def prepare_step(defense: str) -> Callable[..., Any]:
    """The pre-deployment step that makes round 0 for ``defense``."""
    key = get_defense(defense).prepare
    if key is None or key not in PREPARE_STEPS:
        raise UserError(f"defense {defense!r} has no pre-deployment step that 'prepare' can run")
    return PREPARE_STEPS[key]
