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
    """Train ``model`` in place on uint8 images ``x`` (N, H, W, C) with labels ``y``.

    Returns one record per epoch: mean loss, training accuracy and seconds.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    seed_everything(cfg.seed)
    inputs = spec.to_tensor(x)  # (N, C, H, W) float32, converted once
    labels = torch.tensor(np.asarray(y), dtype=torch.int64)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    steps = (len(inputs) + cfg.batch_size - 1) // cfg.batch_size
    history: list[dict[str, float]] = []
    with _progress() as bar:
        task = bar.add_task(desc, total=cfg.epochs * steps, status="", visible=progress)
        for epoch in range(cfg.epochs):
            model.train()
            start, total_loss, correct = time.perf_counter(), 0.0, 0
            for idx in torch.randperm(len(inputs), generator=order_gen).split(cfg.batch_size):
                logits = model(inputs[idx])
                loss = loss_fn(logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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


def predict(model: nn.Module, x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Predicted labels (N,) for uint8 images (N, H, W, C)."""
    return batched_logits(model, spec, x).argmax(1).numpy().astype(np.int64)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec) -> float:
    """Fraction of ``x`` labelled ``y``; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x, spec) == np.asarray(y)).mean())
