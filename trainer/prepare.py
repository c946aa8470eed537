"""Pre-deployment defense: make the GoodNet by noise-augmented retraining (NNoculation stage 1).

Veldanda et al., AISec'21, §3.2 and §4.2.1: retrain the suspect model on the clean
validation data plus noisy copies (trainer/noise.py) at a high learning rate, over a grid
of learning-rate multiples alpha and noise fractions gamma. Keep the candidates whose clean
accuracy is within theta of the suspect's, then take the largest alpha, then the largest
gamma (Table 2). The defender has only the suspect model and clean validation data; the
functions here take nothing else, and never see a trigger or a poisoned sample.

The repair rounds' gate (``trainer.repair.runner``) compares clean accuracy before and
after a round on held-out validation data, so a part of the validation data, the gate split
(``gate_split``), is reserved here: the GoodNet is refitted without it, so both sides of
the gate are held out. The selection still scores every image; docs/DECISIONS.md ("The
gate split") has the measurements behind both choices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle
from core.defenses import get_defense
from core.errors import UserError
from core.pair import DEFAULT_DEFENSE, RoundDefense
from trainer.data import Dataset
from trainer.grid import (
    Candidate,
    Runner,
    TrainJob,
    refit_job,
    run_sequential,
    train_candidate,
)
from trainer.loop import AUGMENTATIONS, FitConfig, predict
from trainer.options import option_field
from trainer.round_zero import goodnet_from, write_round_zero
from trainer.rounds import publish_round, running_round
from trainer.splits import (
    GATE_FRACTION,
    check_validation,
    cross_fit_splits,
    gate_split,
    split_record,
)
from trainer.strip import StripConfig, strip_defense

DEFAULT_ALPHAS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class PrepareConfig:
    """The grid and the retraining run; saved with the GoodNet it produced. Fields with help
    text are ``trainer prepare`` options (``trainer.options``)."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # multiples of the suspect's base learning rate
    gammas: tuple[float, ...] = DEFAULT_GAMMAS  # noise fractions
    ca_drop: float = option_field(
        3.0, "theta: the most clean accuracy, in points, the GoodNet may lose."
    )
    epochs: int = option_field(10, "Retraining epochs per candidate.")
    batch_size: int = option_field(64, "Retraining batch size.")
    # folds >= 2 cross-fits: every validation image scores every candidate, so 1,000 images
    # measure a 3-point drop to about 1 point (a 200-image holdout only to about 2).
    folds: int = option_field(
        2, "Cross-fitting folds for each candidate's CA estimate; 1 is one holdout."
    )
    holdout_fraction: float = option_field(0.2, "The holdout's share when folds is 1.")
    seed: int = option_field(0, "Seed of the folds, the noise and the training.")
    # Beyond the paper (docs/DECISIONS.md): a cosine decay, distillation from the suspect and
    # batch jitter each keep clean accuracy at the same rates.
    schedule: Literal["constant", "cosine"] = "cosine"
    distill: float = option_field(
        1.0,
        "Weight (0..1) of the suspect's own answers on the clean originals in every "
        "retraining target; 0 is the paper's plain labels.",
    )
    augment: tuple[str, ...] = ("shift",)
    refit: bool = option_field(
        True, "Retrain the chosen candidate on all the validation data but the gate split."
    )
    margin_se: float = option_field(
        2.0,
        "A candidate qualifies when its CA drop plus this many standard errors is within "
        "theta; 0 is the paper's rule.",
    )
    gate_fraction: float = option_field(
        GATE_FRACTION,
        "Share of the validation data reserved for the repair gate, which the GoodNet never "
        "trains on (0: none).",
    )

    def validate(self) -> None:
        if not self.alphas or not self.gammas:
            raise UserError("the grid has no candidates: give at least one alpha and one gamma")
        if any(a <= 0 for a in self.alphas):
            raise UserError(
                f"alphas must be positive multiples of the base rate, got {list(self.alphas)}"
            )
        if any(not 0 < g <= 1 for g in self.gammas):
            raise UserError(f"gammas are noise fractions in (0, 1], got {list(self.gammas)}")
        if self.ca_drop < 0:
            raise UserError(f"theta (--ca-drop) must be 0 or more points, got {self.ca_drop}")
        if self.epochs < 1:
            raise UserError("epochs must be at least 1")
        if not 0 < self.holdout_fraction < 1:
            raise UserError("holdout_fraction must lie strictly between 0 and 1")
        if not 0 <= self.gate_fraction < 1:
            raise UserError("gate_fraction must lie in [0, 1): 0 reserves no gate split")
        if self.margin_se < 0:
            raise UserError(f"margin_se must be 0 or more standard errors, got {self.margin_se}")
        if self.folds < 1:
            raise UserError(f"folds must be 1 (one holdout) or more, got {self.folds}")
        if not 0 <= self.distill <= 1:
            raise UserError(f"distill is a weight in 0..1, got {self.distill}")
        if self.schedule not in ("constant", "cosine"):
            raise UserError(f"schedule must be constant or cosine, got {self.schedule!r}")
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            raise UserError(
                f"unknown augmentation {', '.join(sorted(unknown))}; known: {', '.join(AUGMENTATIONS)}"
            )


@dataclass(frozen=True)
class Selection:
    candidate: Candidate
    qualified: bool  # False: none was within theta; this is the smallest drop instead
    threshold: float


def select_goodnet(
    candidates: Sequence[Candidate],
    *,
    suspect_accuracy: float,
    ca_drop: float,
    margin_se: float = 0.0,
) -> Selection:
    """The paper's rule (Table 2): within theta of the suspect, then largest alpha, then gamma.

    ``ca_drop`` is theta in points (3 means 3 accuracy points). With ``margin_se`` = z > 0 a
    candidate qualifies only if its drop plus z standard errors is within theta (the
    "one-standard-error rule" of model selection, Breiman et al. 1984): on 1,000 images a
    drop is known to about 1 point, and the largest-alpha choice otherwise favours the
    candidates whose estimate happened to be lucky. ``margin_se=0`` is the paper's rule.
    If no candidate qualifies, the one with the smallest drop is returned with
    ``qualified=False``.
    """
    if not candidates:
        raise UserError("the grid has no candidates")
    threshold = suspect_accuracy - ca_drop / 100.0
    qualified = [
        c for c in candidates if c.clean_accuracy - margin_se * c.drop_se >= threshold - 1e-12
    ]
    if qualified:
        return Selection(max(qualified, key=lambda c: (c.alpha, c.gamma)), True, threshold)
    return Selection(
        max(candidates, key=lambda c: (c.clean_accuracy, -c.alpha, -c.gamma)),
        False,
        threshold,
    )


def base_fit(suspect: Bundle, cfg: PrepareConfig, base_lr: float | None) -> FitConfig:
    """The suspect's own optimizer and rate (from its meta), unless the operator gives one."""
    recorded = suspect.manifest.meta.get("fit") or {}
    return FitConfig(
        epochs=cfg.epochs,
        lr=base_lr or float(recorded.get("lr", FitConfig.lr)),
        optimizer=recorded.get("optimizer", FitConfig.optimizer),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        schedule=cfg.schedule,
        augment=tuple(cfg.augment),
    )


@dataclass
class GridResult:
    suspect_accuracy: float
    candidates: list[Candidate]
    selection: Selection
    goodnet_state: dict[str, torch.Tensor]
    runner: str
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # all, if asked
    # CA on the reserved gate split, role -> accuracy: held out from everything, so the
    # one honest estimate of the refitted GoodNet; {} when no split was reserved
    gate_accuracy: dict[str, float] = field(default_factory=dict)


def grid_jobs(
    suspect: Bundle,
    splits: list[tuple[Dataset, Dataset]],
    grid: list[tuple[float, float]],
    base: FitConfig,
    distill: float,
) -> list[TrainJob]:
    """One job per (alpha, gamma) and fold, from the suspect's weights; candidate-major."""
    spec = suspect.manifest.input
    state = {k: v.detach().clone() for k, v in suspect.model.state_dict().items()}
    return [
        TrainJob(
            arch=suspect.manifest.arch,
            arch_kwargs=suspect.manifest.arch_kwargs,
            spec=spec,
            state=state,
            x_train=train.x,
            y_train=train.y,
            x_hold=hold.x,
            y_hold=hold.y,
            fit=FitConfig(**{**asdict(base), "lr": base.lr * alpha}),
            alpha=alpha,
            gamma=gamma,
            distill=distill,
        )
        for alpha, gamma in grid
        for train, hold in splits
    ]


def pooled_candidates(
    fold_results: list[Any], candidates: int, per_fold: int, suspect_correct: np.ndarray
) -> list[Candidate]:
    """Each candidate's clean accuracy pooled over its folds, with the standard error of
    its drop, paired against the suspect on the same images."""
    pooled = []
    for i in range(candidates):
        runs = fold_results[i * per_fold : (i + 1) * per_fold]
        correct = np.concatenate([c for _, _, c in runs])
        paired = suspect_correct.astype(np.float64) - correct  # -1, 0 or 1 per image
        se = float(paired.std(ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else 0.0
        pooled.append(
            replace(
                runs[0][0],
                clean_accuracy=float(correct.mean()),
                seconds=sum(c.seconds for c, _, _ in runs),
                drop_se=se,
            )
        )
    return pooled


def gate_accuracies(
    suspect: Bundle, goodnet_state: dict[str, torch.Tensor], gate: Dataset
) -> dict[str, float]:
    """Round 0's clean accuracy per role on the gate split, held out from both."""
    spec = suspect.manifest.input
    goodnet = goodnet_from(suspect, goodnet_state)
    return {
        "badnet": float(np.mean(predict(suspect.model, gate.x, spec) == gate.y)),
        "goodnet": float(np.mean(predict(goodnet, gate.x, spec) == gate.y)),
    }


def grid_search(
    suspect: Bundle,
    valid: Dataset,
    cfg: PrepareConfig,
    *,
    base_lr: float | None = None,
    runner: Runner = run_sequential,
    on_candidate: Callable[[Candidate], None] = lambda c: None,
    keep_states: bool = False,
) -> GridResult:
    """Train every (alpha, gamma) candidate from the suspect's weights; pick the GoodNet.

    Uses only the suspect bundle and clean validation data. ``keep_states`` keeps every
    candidate's weights (benchmarks plot their ASR; the defender never needs them).
    """
    cfg.validate()
    check_validation(suspect, valid)
    start = time.perf_counter()
    rest, gate = gate_split(valid, cfg.gate_fraction)
    check_validation(suspect, rest)  # what the GoodNet is refitted on must still be enough
    splits = cross_fit_splits(
        valid, folds=cfg.folds, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed
    )
    spec = suspect.manifest.input
    scored = [hold for _, hold in splits]
    suspect_correct = np.concatenate([predict(suspect.model, h.x, spec) == h.y for h in scored])
    n_scored, suspect_ca = len(suspect_correct), float(suspect_correct.mean())
    base = base_fit(suspect, cfg, base_lr)
    grid = [(alpha, gamma) for alpha in cfg.alphas for gamma in cfg.gammas]
    jobs = grid_jobs(suspect, splits, grid, base, cfg.distill)
    per_fold = len(splits)
    fold_results = runner(jobs, on_candidate)  # progress: called once per trained run
    candidates = pooled_candidates(fold_results, len(grid), per_fold, suspect_correct)
    selection = select_goodnet(
        candidates,
        suspect_accuracy=suspect_ca,
        ca_drop=cfg.ca_drop,
        margin_se=cfg.margin_se,
    )
    chosen = candidates.index(selection.candidate)
    goodnet_state = fold_results[chosen * per_fold][1]
    if cfg.refit:
        goodnet_state = train_candidate(refit_job(jobs[chosen * per_fold], rest))[1]
    held_out = cfg.refit and len(gate) > 0
    return GridResult(
        suspect_accuracy=suspect_ca,
        candidates=candidates,
        selection=selection,
        goodnet_state=goodnet_state,
        runner=runner.__name__.removeprefix("run_"),
        seconds=time.perf_counter() - start,
        config={
            **asdict(cfg),
            "base_lr": base.lr,
            "optimizer": base.optimizer,
            "retrain_size": len(splits[0][0]),
            "scored_size": n_scored,
            "goodnet_trained_on": len(rest) if cfg.refit else len(splits[0][0]),
            "gate_split": split_record(gate, cfg.gate_fraction) if held_out else None,
        },
        gate_accuracy=gate_accuracies(suspect, goodnet_state, gate) if held_out else {},
        # one fold's weights per candidate (the benchmark plots their ASR)
        states=[fold_results[i * per_fold][1] for i in range(len(grid))] if keep_states else [],
    )


def prepare_round_zero(
    *,
    suspect_dir: Path,
    suspect: Bundle,
    valid: Dataset,
    cfg: PrepareConfig,
    sessions: sessionmaker[Session],
    store: Path,
    base_lr: float | None = None,
    runner: Runner = run_sequential,
    on_candidate: Callable[[Candidate], None] = lambda c: None,
    keep_states: bool = False,
    defense: str = DEFAULT_DEFENSE,
    strip: StripConfig | None = None,
) -> tuple[GridResult, Path]:
    """Validate, run the grid as round 0, then publish and activate the (badnet, goodnet)
    pair as a round of ``defense`` (a registered stack whose step this is), with STRIP as
    its second stage when ``strip`` turns it on (fitted on the suspect, less the gate split)."""
    cfg.validate()
    get_defense(defense)
    check_validation(suspect, valid)
    manifest = RoundDefense(defense)
    if strip is not None:  # refused here, before round 0 exists, if it cannot be fitted
        manifest, _ = strip_defense(
            defense, suspect, gate_split(valid, cfg.gate_fraction)[0], strip
        )
    with running_round(sessions, 0):
        result = grid_search(
            suspect,
            valid,
            cfg,
            base_lr=base_lr,
            runner=runner,
            on_candidate=on_candidate,
            keep_states=keep_states,
        )
        chosen = result.selection.candidate
        path = publish_round(
            sessions=sessions,
            store=store,
            round_no=0,
            write=lambda out: write_round_zero(
                out, suspect_dir=suspect_dir, suspect=suspect, result=result
            ),
            metrics={
                "badnet_clean_accuracy": result.suspect_accuracy,
                "goodnet_clean_accuracy": chosen.clean_accuracy,
                # on the gate split, as a round's (trainer status shows it first)
                **{f"clean_accuracy_{role}": ca for role, ca in result.gate_accuracy.items()},
                "alpha": chosen.alpha,
                "gamma": chosen.gamma,
                "lr": chosen.lr,
                "qualified": result.selection.qualified,
                "seconds": result.seconds,
                "runner": result.runner,
            },
            activated_by="trainer prepare",
            defense=manifest,
        )
    return result, path
