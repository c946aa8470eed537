"""BBD's repairers: what a round does with the inputs its reject rule quarantined.

- ``neural-cleanse``: reverse the trigger of the quarantine's majority suspect label (the
  class the rejected inputs were pushed to) and of every class round 0 flagged, then
  unlearn them from each member (Wang et al., S&P'19, §V-C).
- ``fine-pruning``: Fine-Prune each member again on the clean data (Liu et al., RAID'18,
  §4); channels pruned before stay pruned.

Both reuse the settings the round's stack was prepared with (its manifest's ``bbd``), so
a round repairs the way its operator chose at ``trainer prepare``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.errors import UserError
from core.pair import ModelPair
from trainer.cleanse import BBDConfig, save_triggers, scan, unlearn
from trainer.fineprune import fine_prune
from trainer.repair.base import Repaired, RoundContext
from trainer.repair.config import RepairConfig

REPAIR_TRIGGERS = "nc_repair_triggers.safetensors"  # a repair round's reversed triggers


def bbd_config(pair: ModelPair) -> BBDConfig:
    """The round's BBD settings from its manifest (defaults for fields it lacks)."""
    given = pair.defense.params.get("bbd") or {}
    known = {f.name for f in fields(BBDConfig)}
    if not isinstance(given, dict) or set(given) - known:
        raise UserError(f"round {pair.round}'s manifest has unreadable 'bbd' settings")
    try:
        cfg = BBDConfig(**given)
        cfg.validate()
    except (TypeError, ValueError, UserError) as exc:  # a wrong type or value
        raise UserError(f"round {pair.round}'s 'bbd' settings are invalid: {exc}") from None
    return cfg


def majority_label(labels: np.ndarray) -> int | None:
    """The most common suspect label among the kept samples (ties: the smaller)."""
    if len(labels) == 0:
        return None
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


class NeuralCleanseRepairer:
    """Unlearning of the quarantine's target and the flagged ones; built per round."""

    def __init__(self, cfg: RepairConfig) -> None:
        self.cfg = cfg
        self.bbd = BBDConfig()

    def check(self, pair: ModelPair, sessions: sessionmaker[Session]) -> None:
        self.bbd = bbd_config(pair)

    def repair(self, ctx: RoundContext) -> Repaired:
        spec = ctx.pair.badnet.manifest.input
        seed = majority_label(ctx.suspect.predict(ctx.kept))
        flagged = [int(t) for t in ctx.pair.defense.params.get("targets") or []]
        targets = sorted({*flagged, *([seed] if seed is not None else [])})
        ctx.progress(
            f"round {ctx.round_no}: Neural Cleanse on classes {targets} (quarantine majority "
            f"{seed}, flagged at round 0: {flagged or 'none'})"
        )
        badnet = ctx.pair.badnet.model
        triggers = scan(
            badnet, spec, self.bbd.search_images(ctx.train), targets, self.bbd.cleanse(),
            parallel=_ray_running(), progress=ctx.progress,
        )  # fmt: skip
        models = {}
        for role in ctx.pair.roles:
            ctx.progress(f"round {ctx.round_no}: unlearning {len(triggers)} triggers: {role}")
            models[role] = unlearn(ctx.pair.member(role).model, spec, ctx.train, triggers, self.bbd)
        metrics = {
            "neural_cleanse_round": {
                "seed_label": seed,
                "targets": targets,
                "l1": [round(t.l1, 3) if np.isfinite(t.l1) else None for t in triggers],
                "success": [round(t.success, 4) for t in triggers],
            },
            "config": {"bbd": self.bbd.to_dict(), **ctx.cfg.to_dict()},
        }

        def write(out: Path) -> dict[str, Any]:
            # its own file: the manifest's triggers_sha256 stays round 0's
            return {"nc_triggers_sha256": save_triggers(out, triggers, REPAIR_TRIGGERS)}

        return Repaired(models, metrics, write)


class FinePruningRepairer:
    """Fine-Pruning again, of R alone: the suspect stays as it is, so the two keep
    disagreeing on the trigger. It reads no quarantined image (Fine-Pruning needs only
    clean data); a round of it deepens R's pruning by another ``prune_drop`` points of
    R's own accuracy. Built per round."""

    def __init__(self, cfg: RepairConfig) -> None:
        self.cfg = cfg
        self.bbd = BBDConfig()

    def check(self, pair: ModelPair, sessions: sessionmaker[Session]) -> None:
        self.bbd = bbd_config(pair)
        if pair.goodnet is None:
            raise UserError(f"round {pair.round} has no twin R to Fine-Prune")

    def repair(self, ctx: RoundContext) -> Repaired:
        spec = ctx.pair.badnet.manifest.input
        pruned = fine_prune(
            ctx.pair.member("goodnet").model, spec, ctx.train, layer=self.bbd.layer,
            budget=self.bbd.budget(), fit_cfg=self.bbd.prune_fit(), progress=ctx.progress,
        )  # fmt: skip
        models = {"badnet": ctx.pair.badnet.model, "goodnet": pruned.model}
        record = {k: v for k, v in pruned.record.items() if k != "curve"}
        metrics = {"fine_pruning_round": record, "config": {"bbd": self.bbd.to_dict()}}
        return Repaired(models, metrics, lambda out: {})
