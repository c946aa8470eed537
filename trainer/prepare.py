"""Pre-deployment defense: make the GoodNet by noise-augmented retraining (NNoculation stage 1).

003_a065321fd23236f4.txt, §3.2 and §4.2.1: retrain the suspect model on the clean
validation data plus noisy copies (trainer/noise.py) at a high learning rate, over a grid
of learning-rate multiples alpha and noise fractions gamma. Keep the candidates whose clean
accuracy is within theta of the suspect's, then take the largest alpha, then the largest
gamma (Table 2). The defender has only the suspect model and clean validation data; the
functions here take nothing else, and never see a trigger or a poisoned sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle, save_bundle
from core.errors import DataError, UserError
from core.nets import build_model
from trainer.data import Dataset
from trainer.lab import check_labels
from trainer.loop import FitConfig, accuracy, fit
from trainer.noise import augmented
from trainer.rounds import publish_round, running_round

DEFAULT_ALPHAS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class PrepareConfig:
    """The grid and the retraining run; saved with the GoodNet it produced."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # multiples of the suspect's base learning rate
    gammas: tuple[float, ...] = DEFAULT_GAMMAS  # noise fractions
    ca_drop: float = 3.0  # theta, in accuracy points
    epochs: int = 10
    batch_size: int = 64
    holdout_fraction: float = 0.2  # of the validation data, kept out of retraining to measure CA
    seed: int = 0

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


@dataclass(frozen=True)
class Candidate:
    alpha: float  # multiple of the base rate
    lr: float
    gamma: float
    clean_accuracy: float
    seconds: float


@dataclass(frozen=True)
class Selection:
    candidate: Candidate
    qualified: bool  # False: none was within theta; this is the smallest drop instead
    threshold: float


def select_goodnet(
    candidates: Sequence[Candidate], *, suspect_accuracy: float, ca_drop: float
) -> Selection:
    """The paper's rule (Table 2): within theta of the suspect, then largest alpha, then gamma.

    ``ca_drop`` is theta in points (3 means 3 accuracy points). If no candidate qualifies,
    the one with the smallest drop is returned with ``qualified=False``.
    """
    if not candidates:
        raise UserError("the grid has no candidates")
    threshold = suspect_accuracy - ca_drop / 100.0
    qualified = [c for c in candidates if c.clean_accuracy >= threshold - 1e-12]
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
    threads: int = 1


def train_candidate(job: TrainJob) -> tuple[Candidate, dict[str, torch.Tensor]]:
    """Retrain a copy of the suspect on clean + noisy validation data; measure held-out CA."""
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    model = build_model(job.arch, job.arch_kwargs)
    model.load_state_dict(job.state)
    noise_seed = job.fit.seed * 1000 + round(job.gamma * 100)
    x, y = augmented(job.x_train, job.y_train, gamma=job.gamma, seed=noise_seed)
    fit(model, x, y, job.spec, job.fit, progress=False)
    ca = accuracy(model, job.x_hold, job.y_hold, job.spec)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Candidate(job.alpha, job.fit.lr, job.gamma, ca, time.perf_counter() - start), state


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


Runner = Callable[
    [list[TrainJob], Callable[[Candidate], None]], list[tuple[Candidate, dict[str, torch.Tensor]]]
]


def run_sequential(
    jobs: list[TrainJob], done: Callable[[Candidate], None]
) -> list[tuple[Candidate, dict[str, torch.Tensor]]]:
    results = []
    for job in jobs:
        job.threads = torch.get_num_threads()
        results.append(train_candidate(job))
        done(results[-1][0])
    return results


def run_ray(
    jobs: list[TrainJob], done: Callable[[Candidate], None]
) -> list[tuple[Candidate, dict[str, torch.Tensor]]]:
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
    train, hold = split_validation(valid, cfg.holdout_fraction, cfg.seed)
    spec = suspect.manifest.input
    suspect_ca = accuracy(suspect.model, hold.x, hold.y, spec)
    base = base_fit(suspect, cfg, base_lr)
    state = {k: v.detach().clone() for k, v in suspect.model.state_dict().items()}
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
        )
        for alpha in cfg.alphas
        for gamma in cfg.gammas
    ]
    results = runner(jobs, on_candidate)
    candidates = [c for c, _ in results]
    selection = select_goodnet(candidates, suspect_accuracy=suspect_ca, ca_drop=cfg.ca_drop)
    chosen = candidates.index(selection.candidate)
    return GridResult(
        suspect_accuracy=suspect_ca,
        candidates=candidates,
        selection=selection,
        goodnet_state=results[chosen][1],
        runner=runner.__name__.removeprefix("run_"),
        seconds=time.perf_counter() - start,
        config={
            **asdict(cfg),
            "base_lr": base.lr,
            "optimizer": base.optimizer,
            "retrain_size": len(train),
            "holdout_size": len(hold),
        },
        states=[state for _, state in results] if keep_states else [],
    )


def start_local_ray(threads: int) -> bool:
    """Start a local Ray for the grid; False when Ray cannot start here (then run in sequence)."""
    try:
        import ray
    except ImportError:
        return False
    if ray.is_initialized():
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(
            num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
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
    }


def write_round_zero(out: Path, *, suspect_dir: Path, suspect: Bundle, result: GridResult) -> None:
    """Fill a round directory: the suspect unchanged as badnet/, the GoodNet, the report."""
    from trainer.report import grid_heatmap

    shutil.copytree(suspect_dir, out / "badnet")
    chosen = result.selection.candidate
    report = report_dict(result, suspect)
    m = suspect.manifest
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
            "metrics": {"clean_accuracy_holdout": chosen.clean_accuracy},
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
