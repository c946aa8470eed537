"""The candidates of prepare's grid: one retraining job each, run in sequence or as Ray tasks.

A job is plain data (the suspect's weights, the data, the fit), so it can travel to a Ray
task; each returns its candidate's clean accuracy on its held-out fold, its weights, and
which held-out images it got right (Veldanda et al., AISec'21, §3.2).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from core.nets import build_model
from trainer.data import Dataset
from trainer.loop import FitConfig, distilled_targets, fit, predict
from trainer.noise import augmented


@dataclass(frozen=True)
class Candidate:
    alpha: float  # multiple of the base rate
    lr: float
    gamma: float
    clean_accuracy: float
    seconds: float
    drop_se: float = 0.0  # standard error of (suspect CA - this CA), paired over the same images


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


def train_candidate(
    job: TrainJob,
) -> tuple[Candidate, dict[str, torch.Tensor], np.ndarray]:
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
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**common)  # the cluster's resources, not ours
        else:
            ray.init(num_cpus=threads, include_dashboard=False, **common)
    except Exception:
        return False
    return True
