"""Neural Cleanse (Wang et al., S&P'19, §IV): reverse-engineer each class's smallest
trigger, flag the classes whose trigger is anomalously small, and unlearn them.

A backdoor target needs a far smaller change to reach than a clean class does (Wang et
al. §III-B), so for each class t a mask m and pattern p in [0, 1] (tanh-parameterised)
are optimised on clean images x for CE(f((1 - m) x + m p), t) + lambda |m|_1. Lambda
follows the original schedule (§IV-C and the authors' code): 0 until the attack succeeds
(>= 0.99) for ``patience`` epochs, then 1e-3, doubled after ``patience`` successful epochs
and divided by 2^1.5 after as many failed ones; the smallest successful mask is kept, and
the search stops when that L1 has not improved by 0.1% for 5 x ``patience`` epochs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.bundle import InputSpec

CONSISTENCY = 1.4826  # MAD -> standard deviation for normal data (Wang et al. §IV-A)


@dataclass(frozen=True)
class CleanseConfig:
    """One class's trigger search: the original's schedule and a budget for the CPU."""

    epochs: int = 40  # upper bound; the early stop usually ends sooner
    steps: int = 8  # mini-batches per epoch
    batch_size: int = 64
    lr: float = 0.1  # Adam, betas (0.5, 0.9)
    init_cost: float = 1e-3
    patience: int = 5
    success: float = 0.99
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trigger:
    """A reversed trigger: mask (H, W) and pattern (H, W, C) in [0, 1], for one class."""

    target: int
    mask: np.ndarray
    pattern: np.ndarray
    l1: float  # the mask's L1 norm; inf when no mask reached the success rate
    success: float  # the attack success rate the kept mask reached
    epochs: int
    seconds: float

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """``x`` (N, H, W, C) uint8 with the trigger laid on: (1 - m) x + m p."""
        m = self.mask[None, :, :, None]
        out = (1 - m) * (x.astype(np.float32) / 255.0) + m * self.pattern[None]
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with no parameter gradients; its flags are restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(training)


def _normaliser(spec: InputSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] NHWC pixels -> the model's NCHW input (``InputSpec.to_tensor`` on floats)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    factor = 255.0 / spec.scale
    return lambda x: (x.permute(0, 3, 1, 2) * factor - mean) / std


def reverse_trigger(
    model: nn.Module, spec: InputSpec, x: np.ndarray, target: int, cfg: CleanseConfig
) -> Trigger:
    """The smallest mask and pattern that send clean ``x`` to ``target`` (module doc)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + target)
    h, w, c = spec.shape
    mask_p = (torch.rand(h, w, 1, generator=gen) * 2 - 1).mul(2).requires_grad_()
    pattern_p = (torch.rand(h, w, c, generator=gen) * 2 - 1).mul(2).requires_grad_()
    opt = torch.optim.Adam([mask_p, pattern_p], lr=cfg.lr, betas=(0.5, 0.9))
    norm = _normaliser(spec)
    images = torch.from_numpy(x.astype(np.float32) / 255.0)
    labels = torch.full((cfg.batch_size,), target, dtype=torch.int64)
    state = _Schedule(cfg)
    with _frozen(model):
        for _ in range(cfg.epochs):
            state.epochs += 1
            hits = 0
            for _ in range(cfg.steps):
                batch = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)]
                mask = torch.tanh(mask_p) / 2 + 0.5
                pattern = torch.tanh(pattern_p) / 2 + 0.5
                logits = model(norm((1 - mask) * batch + mask * pattern))
                ce = nn.functional.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                (ce + state.cost * mask.sum()).backward()
                opt.step()
                hits += int((logits.argmax(1) == target).sum())
            with torch.no_grad():
                mask = torch.tanh(mask_p) / 2 + 0.5
                pattern = torch.tanh(pattern_p) / 2 + 0.5
            success = hits / (cfg.steps * cfg.batch_size)
            if state.step(success, float(mask.sum()), mask, pattern):
                break
    best_mask, best_pattern = state.best_or(mask, pattern)
    return Trigger(
        target,
        best_mask[..., 0].numpy(),
        best_pattern.numpy(),
        state.best_l1,
        state.best_success,
        state.epochs,
        time.perf_counter() - start,
    )


class _Schedule:
    """Lambda's adaptation, the best successful mask so far, and the early stop."""

    def __init__(self, cfg: CleanseConfig) -> None:
        self.cfg = cfg
        self.cost = 0.0
        self.epochs = 0
        self.up = self.down = self.set_counter = self.stale = 0
        self.best_l1 = math.inf
        self.best_success = 0.0
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None

    def step(self, success: float, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> bool:
        """Record one epoch; True when the search should stop."""
        cfg, ok = self.cfg, success >= self.cfg.success
        if ok and l1 < self.best_l1:
            improved = l1 < self.best_l1 * 0.999
            self.best_l1, self.best_success = l1, success
            self.best = (mask.clone(), pattern.clone())
            self.stale = 0 if improved else self.stale + 1
        elif self.best is not None:
            self.stale += 1
        if self.cost == 0:
            self.set_counter = self.set_counter + 1 if ok else 0
            if self.set_counter >= cfg.patience:
                self.cost = cfg.init_cost
            return False
        self.up, self.down = (self.up + 1, 0) if ok else (0, self.down + 1)
        if self.up >= cfg.patience:
            self.up, self.cost = 0, self.cost * 2
        elif self.down >= cfg.patience:
            self.down, self.cost = 0, self.cost / 2**1.5
        return self.stale >= 5 * cfg.patience

    def best_or(
        self, mask: torch.Tensor, pattern: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.best if self.best is not None else (mask, pattern)


def anomaly_indices(l1: list[float] | np.ndarray) -> np.ndarray:
    """Each class's anomaly index |L1 - median| / (1.4826 MAD) (Wang et al. §IV-A); an
    unreached class (L1 inf) gets index 0, and all are 0 when the MAD is 0."""
    values = np.asarray(l1, dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return np.zeros(len(values))
    med = np.median(finite)
    mad = CONSISTENCY * np.median(np.abs(finite - med))
    if mad == 0:
        return np.zeros(len(values))
    out = np.abs(values - med) / mad
    out[~np.isfinite(values)] = 0.0
    return out


def flagged_classes(l1: list[float] | np.ndarray, threshold: float = 2.0) -> list[int]:
    """The classes whose L1 is below the median and whose anomaly index is above
    ``threshold`` (2 in Wang et al. §IV-A: a normal class exceeds it with p < 0.05)."""
    values = np.asarray(l1, dtype=float)
    index = anomaly_indices(values)
    med = np.median(values[np.isfinite(values)]) if np.isfinite(values).any() else 0.0
    return [int(k) for k in np.flatnonzero((values < med) & (index > threshold))]
