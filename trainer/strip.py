"""Fitting STRIP on the defender's clean data, and CoDefend's pre-deployment step.

Sigma is the entropy percentile that gives the target false-rejection rate on clean
validation images (issue 32; DEFENSES.md, "Choosing sigma"): CoDefend reads it off
histograms (paper 000 §4.2), and BBD fits it on poisoned data a defender does not have.
Only clean validation data is used, never a trigger, and never the gate split, so a
round's gate measures the served FRR on images the fit did not see.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from core.bundle import Bundle, InputSpec, batched_logits
from core.defenses import get_defense
from core.errors import DataError, UserError
from core.pair import RoundDefense
from core.strip import MODES, STAGES, StripParams
from trainer.data import Dataset
from trainer.options import option_field
from trainer.rounds import publish_round_zero
from trainer.splits import GATE_FRACTION, check_validation, gate_split

MIN_TAIL = 5  # clean fit images expected at or below sigma; fewer leave the FRR unmeasured


@dataclass
class StripConfig:
    """STRIP's fit; fields with help text are ``trainer prepare`` options."""

    strip_overlays: int = option_field(
        32, "N: clean overlay images per input (CoDefend uses 100); each costs a forward."
    )
    strip_mode: str = option_field(
        "add", "How an overlay is laid on: 'add' (saturating sum) or 'blend' (0.5/0.5)."
    )
    strip_frr: float = option_field(
        0.01, "The clean false-rejection rate sigma is fitted to (0.01 or 0.05 are usual)."
    )
    strip_stage: str = option_field(
        "off",
        "Beside a pair (nnoculation, nnoculation-reject): STRIP on its 'disagreements', on "
        "'all' inputs, or 'off'. CoDefend's own STRIP is always on.",
    )
    seed: int = 0

    def validate(self, max_overlays: int | None = None) -> None:
        if self.strip_overlays < 1:
            raise UserError("--strip-overlays must be at least 1")
        if max_overlays is not None and self.strip_overlays > max_overlays:
            raise UserError(
                f"--strip-overlays {self.strip_overlays} is above the configured maximum of "
                f"{max_overlays} (BQG_STRIP_MAX_OVERLAYS): each overlay is a forward per request"
            )
        if self.strip_mode not in MODES:
            raise UserError(f"--strip-mode must be one of {', '.join(MODES)}")
        if not 0 < self.strip_frr < 0.5:
            raise UserError(f"--strip-frr is a rate in (0, 0.5), got {self.strip_frr:g}")
        if self.strip_stage not in ("off", *STAGES):
            raise UserError(f"--strip-stage must be off, {' or '.join(STAGES)}")


def overlay_pool(valid: Dataset, n: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of ``n`` overlays from ``valid``: one of each class first, then at random.

    Every class is present so that no overlay set leans toward one label (paper 000 §3.2
    draws N = 100 of 500 validation images); refuses fewer overlays than classes.
    """
    present = np.unique(valid.y)
    if n < num_classes or len(present) < num_classes:
        raise DataError(
            f"STRIP needs at least one clean overlay per class: {num_classes} classes, "
            f"{n} overlays asked (--strip-overlays), {len(present)} classes in the "
            "validation data it draws from"
        )
    order = np.random.default_rng(seed).permutation(len(valid))
    firsts = [int(order[np.flatnonzero(valid.y[order] == c)[0]]) for c in present]
    rest = [int(i) for i in order if i not in set(firsts)]
    return np.array(firsts + rest[: n - len(firsts)], dtype=np.int64)


def fit_sigma(entropies: np.ndarray, frr: float) -> float:
    """The largest clean entropy such that at most ``frr`` of ``entropies`` lie at or below
    it: flagging H <= sigma rejects about ``frr`` of clean inputs."""
    k = int(np.floor(frr * len(entropies)))
    if k < MIN_TAIL:
        need = int(np.ceil(MIN_TAIL / frr))
        raise DataError(
            f"sigma at a {100 * frr:g}% false-rejection rate needs at least {need} clean "
            f"images besides the overlays ({MIN_TAIL} expected below it); there are "
            f"{len(entropies)}. Give more validation data or a larger --strip-frr"
        )
    return float(np.sort(entropies)[k - 1])


def softmax_runner(model: nn.Module, spec: InputSpec) -> Callable[[np.ndarray], Any]:
    return lambda x: batched_logits(model, spec, x).softmax(1)


def fit_strip(
    model: nn.Module, spec: InputSpec, num_classes: int, data: Dataset, cfg: StripConfig
) -> StripParams:
    """Draw the overlay pool from ``data`` and fit sigma on the rest of it."""
    idx = overlay_pool(data, cfg.strip_overlays, num_classes, cfg.seed)
    fit = np.setdiff1d(np.arange(len(data)), idx)
    pool = data.x[idx]
    stage = "disagreements" if cfg.strip_stage == "off" else cfg.strip_stage
    params = StripParams(pool, 0.0, cfg.strip_mode, cfg.strip_frr, stage)
    h = params.entropies(softmax_runner(model, spec), data.x[fit])
    return StripParams(pool, fit_sigma(h, cfg.strip_frr), cfg.strip_mode, cfg.strip_frr, stage)


def strip_defense(
    defense: str, suspect: Bundle, data: Dataset, cfg: StripConfig
) -> tuple[RoundDefense, StripParams | None]:
    """Round 0's manifest entry for ``defense``: STRIP fitted on ``data`` when the stack
    runs it (a single-model STRIP stack, or a pair with ``--strip-stage``)."""
    single = get_defense(defense).members == ("badnet",)
    if not single and cfg.strip_stage == "off":
        return RoundDefense(defense), None
    m = suspect.manifest
    params = fit_strip(suspect.model, m.input, m.num_classes, data, cfg)
    return RoundDefense(defense, {"strip": params.to_dict()}), params


def prepare_strip_round(
    *,
    defense: str,
    suspect_dir: Path,
    suspect: Bundle,
    valid: Dataset,
    strip: StripConfig,
    sessions: sessionmaker[Session],
    store: Path,
    gate_fraction: float = GATE_FRACTION,
    **_: Any,
) -> tuple[dict[str, Any], Path]:
    """CoDefend's pre-deployment step: the suspect alone, with STRIP fitted on the
    validation data less the gate split; publishes and activates round 0."""
    check_validation(suspect, valid)
    start = time.perf_counter()
    rest, gate = gate_split(valid, gate_fraction)
    manifest, params = strip_defense(defense, suspect, rest, strip)  # refuses before round 0
    assert params is not None
    flagged = params.entropies(softmax_runner(suspect.model, suspect.manifest.input), gate.x)
    report = {
        "strip": {k: v for k, v in params.to_dict().items() if k != "pool"},
        "config": asdict(strip),
        "fit_images": len(rest) - params.n,
        "gate_images": len(gate),
        "gate_frr": float(np.mean(flagged <= params.sigma)) if len(gate) else None,
        "clean_accuracy_badnet": float(np.mean(suspect.predict(gate.x) == gate.y))
        if len(gate)
        else None,
        "seconds": time.perf_counter() - start,
    }

    def write(out: Path) -> None:
        shutil.copytree(suspect_dir, out / "badnet")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    metrics = {k: v for k, v in report.items() if k != "config"}
    return report, publish_round_zero(sessions, store, write, metrics, manifest)
