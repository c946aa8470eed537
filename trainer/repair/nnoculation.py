"""NNoculation's repairer: learn each trigger from the quarantine, treat clean images with
it, and fine-tune both members (Veldanda et al., AISec'21, §3.3 and §4.2.2).

1. Group the kept samples by the suspect's label (``selection.trigger_groups``).
2. Per group, look for a stamp (``trainer.stamps.find_stamps``). A stamped trigger is
   transplanted from real carriers; only a group without one trains a CycleGAN from the
   clean validation images (domain A) to its samples (domain B), whose ``gen_ab`` learns
   to add the trigger.
3. Treat the clean images with this round's triggers and, replayed, every earlier round's
   (``treatment.treat``), plus each new trigger's borderline images once more.
4. Fine-tune each member on the treated and clean images, and on views of the real kept
   samples with targets that never name the trigger (``finetune``). A single-model round
   (CoDefend, paper 000 §3.3: retrain the one model on clean plus translated images with
   their true labels) has no second opinion to take those targets from, so it skips them.

The round directory keeps the learned triggers (``trainer.cyclegan.files``), so later
rounds replay them, and a PNG of each. docs/DECISIONS.md gives the reasons and numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.errors import UserError
from core.pair import ModelPair
from core.schema import RepairRound
from trainer.cyclegan import train_cyclegan, translate
from trainer.cyclegan.files import LearnedTrigger, load_triggers, save_triggers
from trainer.data import Dataset
from trainer.repair.base import Repaired, RoundContext
from trainer.repair.config import RepairConfig
from trainer.repair.finetune import finetune
from trainer.repair.selection import borderline, trigger_groups, trigger_target
from trainer.repair.treatment import counter_targets, treat, views_of
from trainer.stamps import find_stamps, transplanted


def triggers_sha256(sessions: sessionmaker[Session], round_no: int) -> str | None:
    """The digest of the learned-trigger index the store registered for ``round_no``; None
    for round 0 and for rounds written before rounds registered one."""
    with sessions() as session:
        row = session.get(RepairRound, round_no)
        return None if row is None else (row.metrics or {}).get("triggers_sha256")


class CycleGANRepairer:
    """One round of NNoculation's repair; built per round with its config."""

    def __init__(self, cfg: RepairConfig) -> None:
        self.cfg = cfg
        self.inherited: list[LearnedTrigger] = []

    def check(self, pair: ModelPair, sessions: sessionmaker[Session]) -> None:
        """Load the triggers earlier rounds learned, checked against their registered digest."""
        if not self.cfg.replay:
            return
        if pair.badnet.path is None:
            raise UserError(
                f"round {pair.round}'s bundles were not loaded from a round directory, so its "
                "learned triggers cannot be replayed; run with --no-replay"
            )
        active = pair.badnet.path.parent
        self.inherited = load_triggers(active, triggers_sha256(sessions, pair.round))

    def repair(self, ctx: RoundContext) -> Repaired:
        cfg, train = ctx.cfg, ctx.train
        rng = np.random.default_rng(cfg.seed)
        domain_a = train.x[rng.permutation(len(train))[: cfg.clean_images]]
        groups = trigger_groups(ctx.suspect, ctx.kept, cfg)
        parts = np.array_split(rng.permutation(len(train)), len(self.inherited) + len(groups))
        targets = [trigger_target(ctx.suspect, images) for _, images in groups]
        extra = [
            borderline(ctx.pair.member(ctx.pair.roles[-1]), train, t, cfg.borderline)
            if t is not None
            else np.zeros(0, dtype=np.int64)
            for t in targets
        ]
        end = len(train)
        for i, idx in enumerate(extra):  # each new trigger treats its borderline images twice
            own_part = len(self.inherited) + i
            parts[own_part] = np.r_[parts[own_part], end + np.arange(len(idx))]
            end += len(idx)
        treat_set = train.take(np.concatenate([np.arange(len(train)), *extra]))
        looks = cfg.transplant and cfg.treatment != "gan"  # "gan": gen_ab's copies alone
        own, trained = self._learn(ctx, groups, domain_a, looks)
        triggers = self.inherited + own
        ctx.progress(
            f"round {ctx.round_no}: treating {cfg.views} views of {len(treat_set)} images "
            f"({len(treat_set) - len(train)} borderline ones twice) with {len(triggers)} "
            f"learned triggers ({len(self.inherited)} from earlier rounds)"
        )
        # an earlier round's stamped trigger has no generator: its stamps are all it has
        stamps = [t.stamps if looks or t.gen is None else [] for t in triggers]
        tune_set, treated = treat([t.gen for t in triggers], parts, treat_set, cfg, rng, stamps)
        real = self._real(ctx, rng)
        models, tune_seconds, tune_images = self._finetune(ctx, tune_set, treated, real)
        metrics = {
            "cyclegan": cfg.cyclegan.to_dict(),
            "cyclegan_seconds": sum(g.seconds for g in trained),
            "cyclegan_final_losses": [g.history[-1] for g in trained],
            "trigger_groups": [
                {
                    "suspect_label": k,
                    "images": len(x),
                    "cyclegan": t.gen is not None,
                    "target": target,
                    "borderline": len(e),
                }
                for (k, x), t, target, e in zip(groups, own, targets, extra, strict=True)
            ],
            "replayed_triggers": [t.name for t in self.inherited],
            "stamp_pixels": [[int(s.region.sum()) for s in found] for found in stamps],
            "finetune_seconds": tune_seconds,
            "trigger_l1": float(
                np.abs(treated[: len(treat_set)].astype(float) - treat_set.x).mean()
            ),
            "finetune_images": tune_images,
            "config": {k: v for k, v in cfg.to_dict().items() if k != "cyclegan"},
        }
        return Repaired(models, metrics, lambda out: self._write(out, ctx, groups, own, triggers))

    def _learn(
        self,
        ctx: RoundContext,
        groups: list[tuple[int | None, np.ndarray]],
        domain_a: np.ndarray,
        looks: bool,
    ) -> tuple[list[LearnedTrigger], list[Any]]:
        """This round's triggers, one per group (stamps, or a CycleGAN's gen_ab), and the
        CycleGANs trained for them; ``looks``: search for stamps first."""
        cfg, n = ctx.cfg, ctx.round_no
        own, trained = [], []
        for label, images in groups:
            name = "" if label is None else f" (suspect label {label})"
            found = find_stamps(images, domain_a) if looks else []
            if found:  # treated with the stamp itself: gen_ab would go unused
                sizes = ", ".join(str(int(s.region.sum())) for s in found)
                many = f"{len(found)} stamped triggers" if len(found) > 1 else "a stamped trigger"
                ctx.progress(
                    f"round {n}: {many}{name} of {sizes} pixels; transplanted, so no "
                    "CycleGAN is trained for it"
                )
                own.append(LearnedTrigger(None, n, label, found))
                continue
            ctx.progress(
                f"round {n}: CycleGAN{name} on {len(domain_a)} clean and {len(images)} "
                f"quarantined images, {cfg.cyclegan.epochs} epochs"
            )

            def on_epoch(r: dict[str, Any], name: str = name) -> None:
                ctx.progress(
                    f"round {n}: CycleGAN{name} epoch {r['epoch']}/{cfg.cyclegan.epochs} "
                    f"(cycle loss {r['loss_cycle']:.3f}, {r['seconds']:.0f}s)"
                )

            gan = train_cyclegan(domain_a, images, cfg.cyclegan, on_epoch=on_epoch)
            own.append(LearnedTrigger(gan.gen_ab, n, label, []))
            trained.append(gan)
        return own, trained

    def _real(
        self, ctx: RoundContext, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Views of the kept samples with counter-targets, or None (``quarantine_views`` 0, or
        a single-model round: the counter-targets are the second opinion's answer)."""
        n = ctx.cfg.quarantine_views
        if not n or ctx.pair.goodnet is None:
            return None
        soft = counter_targets(ctx.pair.goodnet, ctx.suspect, ctx.kept)
        return np.concatenate(views_of(ctx.kept, n, rng)), np.tile(soft, (n, 1))

    def _finetune(
        self,
        ctx: RoundContext,
        tune_set: Dataset,
        treated: np.ndarray,
        real: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[dict[str, Any], float, int]:
        """Each member fine-tuned: (role -> model, seconds, images per epoch)."""
        images = len(tune_set) + len(treated) + (len(real[0]) if real else 0)
        models, seconds = {}, 0.0
        for role in ctx.pair.roles:
            ctx.progress(f"round {ctx.round_no}: fine-tuning the {role} on {images} images")
            member = ctx.pair.member(role)
            teacher = ctx.suspect if ctx.cfg.teacher == "suspect" else member
            models[role], took = finetune(member, tune_set, treated, ctx.cfg, teacher, real)
            seconds += took
        return models, seconds, images

    def _write(
        self,
        out: Path,
        ctx: RoundContext,
        groups: list[tuple[int | None, np.ndarray]],
        own: list[LearnedTrigger],
        triggers: list[LearnedTrigger],
    ) -> dict[str, Any]:
        """The learned triggers (for replay) and a PNG of each of this round's."""
        from trainer.report import trigger_figure

        digest = save_triggers(out, triggers)  # registered with the round
        sample = ctx.gate.x[:8]
        figure_rng = np.random.default_rng(ctx.cfg.seed)
        for i, ((label, images), trigger) in enumerate(zip(groups, own, strict=True)):
            suffix = "" if i == 0 else f"_label{label}"
            if trigger.gen is None:  # a stamped trigger: the attacker's stamp on clean images
                made, how = transplanted(sample, trigger.stamps, figure_rng), "stamp"
            else:
                made, how = translate(trigger.gen, sample), "gen_ab"
            trigger_figure(sample, made, images[:8], out / f"trigger{suffix}.png", how)
        return {"triggers_sha256": digest}
