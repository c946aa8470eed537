"""The one fit/evaluate loop that every trainer in this project reuses.

Deterministic for a seed and a thread count: ``seed_everything`` seeds torch, NumPy and
Python in one place, and the shuffling order comes from a generator seeded from it.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from core.bundle import InputSpec, batched_logits


@dataclass
class FitConfig:
    """Hyperparameters of one training run; saved in the bundle's ``meta`` as they were."""

    epochs: int = 4
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr decays to 0 by the end
    augment: tuple[str, ...] = ()  # per batch: "shift" (up to 2 px), "flip" (horizontal)
    batch_size: int = 128
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None = None) -> int:
    """Let torch use ``threads`` CPU threads (default: all cores); returns the number set."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        transient=False,
    )


def _optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


AUGMENTATIONS = ("shift", "flip")
MAX_SHIFT = 2


def _augment(batch: torch.Tensor, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Label-preserving jitter of a (B, C, H, W) batch: random shifts and/or mirror images."""
    if not kinds:
        return batch
    unknown = set(kinds) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)}; known: {AUGMENTATIONS}")
    b, _, h, w = batch.shape
    if "flip" in kinds:
        mirror = torch.rand(b, generator=gen) < 0.5
        batch = torch.where(mirror[:, None, None, None], batch.flip(3), batch)
    if "shift" in kinds:
        s = MAX_SHIFT
        padded = torch.nn.functional.pad(batch, (s, s, s, s), mode="replicate")
        dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=gen).tolist()
        batch = padded[:, :, dy : dy + h, dx : dx + w]
    return batch


def _scheduler(
    opt: torch.optim.Optimizer, cfg: FitConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning rate: constant, or cosine from ``lr`` down to 0 at the last step."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    spec: InputSpec,
    cfg: FitConfig,
    *,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` in place on uint8 images ``x`` (N, H, W, C) with targets ``y``.

    ``y`` is integer labels (N,) or class probabilities (N, K) (soft targets, as in
    distillation); the loss is cross-entropy either way. Returns one record per epoch: mean
    loss, training accuracy (against the most probable class) and seconds.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    seed_everything(cfg.seed)
    inputs = spec.to_tensor(x)  # (N, C, H, W) float32, converted once
    soft = np.asarray(y).ndim == 2
    targets = torch.tensor(np.asarray(y), dtype=torch.float32 if soft else torch.int64)
    labels = targets.argmax(1) if soft else targets
    order_gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    steps = (len(inputs) + cfg.batch_size - 1) // cfg.batch_size
    sched = _scheduler(opt, cfg, total_steps=cfg.epochs * steps)
    history: list[dict[str, float]] = []
    with _progress() as bar:
        task = bar.add_task(desc, total=cfg.epochs * steps, status="", visible=progress)
        for epoch in range(cfg.epochs):
            model.train()
            start, total_loss, correct = time.perf_counter(), 0.0, 0
            for idx in torch.randperm(len(inputs), generator=order_gen).split(cfg.batch_size):
                logits = model(_augment(inputs[idx], cfg.augment, order_gen))
                loss = loss_fn(logits, targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == labels[idx]).sum())
                bar.advance(task)
            record = {
                "epoch": epoch + 1,
                "loss": total_loss / len(inputs),
                "train_acc": correct / len(inputs),
                "seconds": time.perf_counter() - start,
            }
            history.append(record)
            bar.update(task, status=f"epoch {epoch + 1} loss {record['loss']:.3f}")
    model.eval()
    return history


def distilled_targets(
    teacher: nn.Module,
    spec: InputSpec,
    x_clean: np.ndarray,
    y: np.ndarray,
    weight: float,
    num_classes: int = 0,
) -> np.ndarray:
    """Targets for ``x_clean`` followed by altered copies of it (noisy, or treated).

    ``y`` is the clean images' labels repeated once per copy. With ``weight`` > 0 each
    target mixes the one-hot label with the teacher's output distribution on the *clean*
    original (knowledge distillation, Hinton et al. 2015); 0 returns ``y`` unchanged.
    """
    if weight <= 0:
        return y
    k = max(int(np.max(y)) + 1, num_classes)
    onehot = np.eye(k, dtype=np.float32)[y]
    soft = torch.softmax(batched_logits(teacher, spec, x_clean), dim=1).numpy()
    if soft.shape[1] != k:
        raise ValueError(f"the teacher has {soft.shape[1]} classes, the labels {k}")
    copies = len(y) // len(x_clean)
    return weight * np.tile(soft, (copies, 1)) + (1 - weight) * onehot


def predict(model: nn.Module, x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Predicted labels (N,) for uint8 images (N, H, W, C)."""
    return batched_logits(model, spec, x).argmax(1).numpy().astype(np.int64)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec) -> float:
    """Fraction of ``x`` labelled ``y``; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x, spec) == np.asarray(y)).mean())
