"""Pre-deployment defense: make the GoodNet by noise-augmented retraining (NNoculation stage 1).

003_a065321fd23236f4.txt, §3.2 and §4.2.1: retrain the suspect model on the clean
validation data plus noisy copies (trainer/noise.py) at a high learning rate, over a grid
of learning-rate multiples alpha and noise fractions gamma. Keep the candidates whose clean
accuracy is within theta of the suspect's, then take the largest alpha, then the largest
gamma (Table 2). The defender has only the suspect model and clean validation data; the
functions here take nothing else, and never see a trigger or a poisoned sample.

The repair rounds' gate (``trainer.repair``, step 5 of NNoculation's §3.3 loop as issue 6
builds it) compares clean accuracy before and after a round on held-out validation data, so
a part of the validation data, the gate split (``gate_split``), is reserved here: the
GoodNet is refitted without it. When round 0's GoodNet was refitted on every image, it
scored 90.55% on the blend BadNet's gate split against 89.04% on the test split, and round
1's gate, comparing that with a round's honest score, allowed about half its theta. The
selection still scores every image (its fold models are thrown away): reserving the split
from it too left 800 images, whose wider standard errors kept alpha 2 from qualifying on the
filter BadNet, and the alpha-1 GoodNet kept 99.4% ASR (scratch run, issue 6's notes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle, save_bundle
from core.errors import DataError, UserError
from core.nets import build_model
from trainer.data import Dataset
from trainer.lab import check_labels
from trainer.loop import AUGMENTATIONS, FitConfig, distilled_targets, fit, predict
from trainer.noise import augmented
from trainer.rounds import publish_round, running_round

DEFAULT_ALPHAS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
GATE_FRACTION = 0.2  # the validation data the repair gate scores on and nothing trains on
GATE_SEED = 0  # fixed, so that prepare and every round reserve the same images


@dataclass
class PrepareConfig:
    """The grid and the retraining run; saved with the GoodNet it produced."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # multiples of the suspect's base learning rate
    gammas: tuple[float, ...] = DEFAULT_GAMMAS  # noise fractions
    ca_drop: float = 3.0  # theta, in accuracy points
    epochs: int = 10
    batch_size: int = 64
    # How each candidate's clean accuracy is estimated. folds >= 2: cross-fitting, each
    # candidate trained once per fold without it and scored on it, so every validation image
    # scores every candidate (1,000 images measure a 3-point drop to about 1 point; a
    # 200-image holdout only to about 2). folds = 1: one holdout of holdout_fraction.
    folds: int = 2
    holdout_fraction: float = 0.2
    seed: int = 0
    # Beyond the paper, measured in docs/RESULTS.md: the rate decays (cosine) so that the
    # high early rate breaks the backdoor and the end settles; the clean copies are
    # distilled from the suspect; batches are jittered. All three keep clean accuracy.
    schedule: Literal["constant", "cosine"] = "cosine"
    distill: float = 1.0  # weight of the suspect's own outputs in the retraining targets
    augment: tuple[str, ...] = ("shift",)
    # After the rule has chosen (alpha, gamma) on the held-out part, retrain that candidate
    # on all the validation data (the held-out estimate then errs on the safe side).
    refit: bool = True
    # z of the selection rule's margin; 0 is the paper's plain rule. Two standard errors,
    # because the rule takes the largest alpha that qualifies, so among 24 candidates it
    # favours estimates that were lucky: with one, the patch BadNet's pick lost 3.5 points
    # on the test split against an estimated 2.0 (docs/RESULTS.md).
    margin_se: float = 2.0
    # The repair gate's split, which the refitted GoodNet never trains on (``gate_split``);
    # 0 refits on every image, and the first round's gate then says its reference is
    # optimistic. Without refit the GoodNet is a fold's, and no split is held out.
    gate_fraction: float = GATE_FRACTION

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
class Candidate:
    alpha: float  # multiple of the base rate
    lr: float
    gamma: float
    clean_accuracy: float
    seconds: float
    drop_se: float = 0.0  # standard error of (suspect CA - this CA), paired over the same images


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
        max(candidates, key=lambda c: (c.clean_accuracy, -c.alpha, -c.gamma)), False, threshold
    )


@dataclass
class TrainJob:
    """Everything one candidate needs; plain data, so that it can travel to a Ray task."""

    arch: str
    arch_kwargs: dict[str, Any]
    spec: Any  # InputSpec
    state: dict[str, torch.Tensor]
    x_train: np.ndarray
    y_train: np.ndarray
    x_hold: np.ndarray
    y_hold: np.ndarray
    fit: FitConfig
    alpha: float
    gamma: float
    distill: float = 0.0
    threads: int = 1


def train_candidate(job: TrainJob) -> tuple[Candidate, dict[str, torch.Tensor], np.ndarray]:
    """Retrain a copy of the suspect on clean + noisy validation data; score the held-out part.

    Returns the candidate, its weights, and which held-out images it labels correctly.
    """
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    model = build_model(job.arch, job.arch_kwargs)
    model.load_state_dict(job.state)
    noise_seed = job.fit.seed * 1000 + round(job.gamma * 100)
    x, y = augmented(job.x_train, job.y_train, gamma=job.gamma, seed=noise_seed)
    targets = retraining_targets(model, job, y)
    fit(model, x, targets, job.spec, job.fit, progress=False)
    correct = predict(model, job.x_hold, job.spec) == job.y_hold
    ca = float(correct.mean()) if len(correct) else float("nan")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    return Candidate(job.alpha, job.fit.lr, job.gamma, ca, seconds), state, correct


def retraining_targets(suspect: torch.nn.Module, job: TrainJob, y: np.ndarray) -> np.ndarray:
    """Targets for the clean copies, then the noisy copies: labels, or soft targets.

    With ``distill`` > 0 each target mixes the one-hot label with the suspect's own output
    distribution on the *clean* image (knowledge distillation, Hinton et al. 2015), for the
    clean copy and for its noisy copy alike: the high learning rate moves the weights while
    the suspect's clean behaviour, all it knows of the task beyond 1,000 labels, is kept,
    and the noisy copy learns to answer as the suspect does on the clean original. The
    suspect only ever sees clean images here, so no trigger behaviour can be copied.
    """
    num_classes = int(job.arch_kwargs.get("num_classes", 0))
    return distilled_targets(suspect, job.spec, job.x_train, y, job.distill, num_classes)


def split_validation(valid: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Retraining part and held-out part of the defender's validation data, stratified."""
    rng = np.random.default_rng(seed)
    hold: list[int] = []
    for label in np.unique(valid.y):
        members = np.flatnonzero(valid.y == label)
        take = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        hold.extend(rng.choice(members, size=take, replace=False).tolist())
    mask = np.zeros(len(valid), dtype=bool)
    mask[hold] = True
    return valid.take(np.flatnonzero(~mask)), valid.take(np.flatnonzero(mask))


def gate_split(valid: Dataset, fraction: float = GATE_FRACTION) -> tuple[Dataset, Dataset]:
    """(the rest, the gate split): the repair gate's held-out part of the validation data.

    The same images for the same data and fraction, whoever asks: prepare leaves them out,
    and every repair round fine-tunes on the rest and gates on them.
    """
    if fraction == 0:
        return valid, valid.take(np.arange(0))
    return split_validation(valid, fraction, GATE_SEED)


def split_record(gate: Dataset, fraction: float) -> dict[str, Any]:
    """What a bundle's manifest says about the gate split its training left out; a round
    compares the sha256 with its own gate split's (``trainer.repair``)."""
    digest = hashlib.sha256(np.ascontiguousarray(gate.x).tobytes())
    digest.update(np.asarray(gate.y, dtype=np.int64).tobytes())
    return {"fraction": fraction, "images": len(gate), "sha256": digest.hexdigest()}


def cross_fit_splits(valid: Dataset, cfg: PrepareConfig) -> list[tuple[Dataset, Dataset]]:
    """(retrain, score) pairs: K stratified folds, or the single holdout when folds is 1.

    Every image is scored exactly once across the folds, so a candidate's pooled accuracy
    is over the whole validation set.
    """
    if cfg.folds == 1:
        return [split_validation(valid, cfg.holdout_fraction, cfg.seed)]
    rng = np.random.default_rng(cfg.seed)
    fold_of = np.empty(len(valid), dtype=np.int64)
    for label in np.unique(valid.y):
        members = rng.permutation(np.flatnonzero(valid.y == label))
        fold_of[members] = (np.arange(len(members)) + int(rng.integers(cfg.folds))) % cfg.folds
    return [
        (valid.take(np.flatnonzero(fold_of != k)), valid.take(np.flatnonzero(fold_of == k)))
        for k in range(cfg.folds)
    ]


def check_validation(suspect: Bundle, valid: Dataset) -> None:
    if len(valid) == 0:
        raise DataError(f"{valid.source} holds no images; the GoodNet needs clean validation data")
    if valid.image_shape != suspect.manifest.input.shape:
        h, w, c = valid.image_shape
        m = suspect.manifest.input
        raise DataError(
            f"validation images are {h}x{w}x{c}, but the model expects {m.height}x{m.width}x{m.channels}"
        )
    check_labels(valid, suspect.manifest.num_classes)
    if len(valid) < 10:
        raise DataError(f"{valid.source} has {len(valid)} images; retraining needs at least 10")


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


RunResult = tuple[Candidate, dict[str, torch.Tensor], np.ndarray]
Runner = Callable[[list[TrainJob], Callable[[Candidate], None]], list[RunResult]]


def run_sequential(jobs: list[TrainJob], done: Callable[[Candidate], None]) -> list[RunResult]:
    results = []
    for job in jobs:
        job.threads = torch.get_num_threads()
        results.append(train_candidate(job))
        done(results[-1][0])
    return results


def run_ray(jobs: list[TrainJob], done: Callable[[Candidate], None]) -> list[RunResult]:
    """One Ray task per candidate, one CPU each.

    A worker process runs up to ceil(candidates / CPUs) tasks, so torch is imported once per
    worker rather than once per candidate, and the workers exit when their share is done
    instead of idling with the memory of a finished task.
    """
    import ray

    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1, max_calls=math.ceil(len(jobs) / cpus))(train_candidate)
    refs = [remote.remote(job) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[index[ready[0]]] = ray.get(ready[0])
        done(results[index[ready[0]]][0])
    return results


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
    splits = cross_fit_splits(valid, cfg)
    spec = suspect.manifest.input
    scored = [hold for _, hold in splits]
    suspect_correct = np.concatenate([predict(suspect.model, h.x, spec) == h.y for h in scored])
    n_scored, suspect_ca = len(suspect_correct), float(suspect_correct.mean())
    base = base_fit(suspect, cfg, base_lr)
    state = {k: v.detach().clone() for k, v in suspect.model.state_dict().items()}
    grid = [(alpha, gamma) for alpha in cfg.alphas for gamma in cfg.gammas]
    jobs = [
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
            distill=cfg.distill,
        )
        for alpha, gamma in grid
        for train, hold in splits
    ]
    per_fold = len(splits)
    fold_results = runner(jobs, on_candidate)  # progress: called once per trained run
    candidates: list[Candidate] = []
    for i in range(len(grid)):
        runs = fold_results[i * per_fold : (i + 1) * per_fold]
        correct = np.concatenate([c for _, _, c in runs])
        paired = suspect_correct.astype(np.float64) - correct  # -1, 0 or 1 per image
        se = float(paired.std(ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else 0.0
        candidates.append(
            replace(
                runs[0][0],
                clean_accuracy=float(correct.mean()),
                seconds=sum(c.seconds for c, _, _ in runs),
                drop_se=se,
            )
        )
    selection = select_goodnet(
        candidates, suspect_accuracy=suspect_ca, ca_drop=cfg.ca_drop, margin_se=cfg.margin_se
    )
    chosen = candidates.index(selection.candidate)
    goodnet_state = fold_results[chosen * per_fold][1]
    if cfg.refit:
        goodnet_state = train_candidate(refit_job(jobs[chosen * per_fold], rest))[1]
    held_out = cfg.refit and len(gate) > 0
    gate_accuracy = {}
    if held_out:
        goodnet = goodnet_from(suspect, goodnet_state)
        gate_accuracy = {
            "badnet": float(np.mean(predict(suspect.model, gate.x, spec) == gate.y)),
            "goodnet": float(np.mean(predict(goodnet, gate.x, spec) == gate.y)),
        }
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
        gate_accuracy=gate_accuracy,
        # one fold's weights per candidate (the benchmark plots their ASR)
        states=[fold_results[i * per_fold][1] for i in range(len(grid))] if keep_states else [],
    )


def refit_job(job: TrainJob, valid: Dataset) -> TrainJob:
    """The chosen candidate again, on ``valid`` (every validation image but the gate split's),
    with the same number of steps.

    More data at the same epochs would mean more steps at the high rate, which costs clean
    accuracy the selection never saw; the epochs shrink so the schedule stays the one the
    estimate measured.
    """
    epochs = max(1, round(job.fit.epochs * len(job.x_train) / len(valid)))
    return replace(
        job,
        x_train=valid.x,
        y_train=valid.y,
        fit=replace(job.fit, epochs=epochs),
        threads=torch.get_num_threads(),
    )


def start_local_ray(threads: int) -> bool:
    """Start a local Ray (or join the cluster at ``$RAY_ADDRESS``, as on KubeRay).

    False when Ray cannot start here: then the caller runs in sequence, in process.
    """
    try:
        import ray
    except ImportError:
        return False
    if ray.is_initialized():
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**common)  # the cluster's resources, not ours
        else:
            ray.init(num_cpus=threads, include_dashboard=False, **common)
    except Exception:
        return False
    return True


def goodnet_from(suspect: Bundle, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(suspect.manifest.arch, suspect.manifest.arch_kwargs)
    model.load_state_dict(state)
    return model.eval()


def report_dict(result: GridResult, suspect: Bundle) -> dict[str, Any]:
    chosen = result.selection.candidate
    return {
        "suspect_sha256": suspect.manifest.weights_sha256,
        "suspect_clean_accuracy": result.suspect_accuracy,
        "threshold": result.selection.threshold,
        "qualified": result.selection.qualified,
        "chosen": asdict(chosen),
        "candidates": [asdict(c) for c in result.candidates],
        "runner": result.runner,
        "seconds": result.seconds,
        "config": result.config,
        "gate_accuracy": result.gate_accuracy,
    }


def write_round_zero(out: Path, *, suspect_dir: Path, suspect: Bundle, result: GridResult) -> None:
    """Fill a round directory: the suspect unchanged as badnet/, the GoodNet, the report."""
    from trainer.report import grid_heatmap

    shutil.copytree(suspect_dir, out / "badnet")
    chosen = result.selection.candidate
    report = report_dict(result, suspect)
    m = suspect.manifest
    metrics = {"clean_accuracy_estimate": chosen.clean_accuracy}
    if "goodnet" in result.gate_accuracy:  # held out, as the repair rounds' own
        metrics["clean_accuracy_gate"] = result.gate_accuracy["goodnet"]
    save_bundle(
        goodnet_from(suspect, result.goodnet_state),
        out / "goodnet",
        arch=m.arch,
        arch_kwargs=m.arch_kwargs,
        class_names=m.class_names,
        input_spec=m.input,
        meta={
            "role": "goodnet",
            "round": 0,
            "created_by": "trainer prepare",
            "created_at": datetime.now(UTC).isoformat(),
            "metrics": metrics,
            "gate_split": result.config["gate_split"],
            "selection": {k: v for k, v in report.items() if k != "candidates"},
        },
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    grid_heatmap(
        {(c.alpha, c.gamma): c.clean_accuracy for c in result.candidates},
        out / "grid_ca.png",
        title=f"GoodNet candidates: held-out CA (suspect {100 * result.suspect_accuracy:.1f}%)",
        chosen=(chosen.alpha, chosen.gamma),
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
) -> tuple[GridResult, Path]:
    """Validate, run the grid as round 0, then publish and activate the (badnet, goodnet) pair."""
    cfg.validate()
    check_validation(suspect, valid)
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
        )
    return result, path
