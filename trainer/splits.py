"""The defender's clean validation data: the gate split, the folds, and the checks.

Every model the gateway serves leaves the gate split out of its training, so a repair
round's gate compares held-out accuracies on both sides (docs/DECISIONS.md, "The gate
split"); ``split_record`` is how a bundle's manifest names the split it left out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from core.bundle import Bundle
from core.errors import DataError
from trainer.data import Dataset
from trainer.lab import check_labels

GATE_FRACTION = 0.2  # the validation data the repair gate scores on and nothing trains on
GATE_SEED = 0  # fixed, so that prepare and every round reserve the same images


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


def cross_fit_splits(
    valid: Dataset, *, folds: int, holdout_fraction: float, seed: int
) -> list[tuple[Dataset, Dataset]]:
    """(retrain, score) pairs: K stratified folds, or the single holdout when folds is 1.

    Every image is scored exactly once across the folds, so a candidate's pooled accuracy
    is over the whole validation set.
    """
    if folds == 1:
        return [split_validation(valid, holdout_fraction, seed)]
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(valid), dtype=np.int64)
    for label in np.unique(valid.y):
        members = rng.permutation(np.flatnonzero(valid.y == label))
        fold_of[members] = (np.arange(len(members)) + int(rng.integers(folds))) % folds
    return [
        (
            valid.take(np.flatnonzero(fold_of != k)),
            valid.take(np.flatnonzero(fold_of == k)),
        )
        for k in range(folds)
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
