"""What a repairer gets and gives back; the round runner (``trainer.repair.runner``) owns
everything else: the lease, the gate and publication."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from core.bundle import Bundle
from core.pair import ModelPair
from trainer.data import Dataset
from trainer.repair.config import RepairConfig

Progress = Callable[[str], None]


@dataclass
class RoundContext:
    """What a repairer gets: the active pair, the kept quarantine, the clean data."""

    round_no: int
    pair: ModelPair  # the active round, with its defense's policy
    suspect: Bundle  # the model as it was given to us: round 0's badnet
    kept: np.ndarray  # the kept quarantined images (N, H, W, C)
    train: Dataset  # the clean validation data less the gate split
    gate: Dataset  # the gate split: scored on, never trained on
    cfg: RepairConfig
    progress: Progress


@dataclass
class Repaired:
    """A repairer's result: the new members (role -> model), its metrics, and a writer for
    its own files in the round directory, which returns metrics to record with the round."""

    models: dict[str, nn.Module]
    metrics: dict[str, Any]
    write: Callable[[Path], dict[str, Any]]


class Repairer(Protocol):
    def check(self, pair: ModelPair, sessions: sessionmaker[Session]) -> None:
        """Read and verify what the repairer needs before the round opens (UserError)."""
        ...

    def repair(self, ctx: RoundContext) -> Repaired: ...
