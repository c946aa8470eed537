"""Fine-tuning a round's members on the treatment set (Veldanda et al., AISec'21, §3.3).

Targets mix the label with the original suspect's answer on the *clean* original
(distillation, as ``prepare`` does): the treated copy learns "answer as if the trigger were
not there", and the member learns back the suspect's clean accuracy, the best we have.
Why the teacher is round 0's suspect and not the active member, and the learning rate:
docs/DECISIONS.md ("Fine-tuning").
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from core.bundle import Bundle
from trainer.data import Dataset
from trainer.loop import FitConfig, distilled_targets, fit
from trainer.repair.config import RepairConfig


def finetune(
    bundle: Bundle,
    clean: Dataset,
    treated: np.ndarray,
    cfg: RepairConfig,
    teacher: Bundle,
    real: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Any, float]:
    """A copy of ``bundle``'s model fine-tuned on clean + treated images; (model, seconds).

    Targets mix the label with ``teacher``'s answer on the clean original, for the clean and
    the treated copy alike. ``real`` adds quarantined images with their own soft targets
    (``trainer.repair.treatment.counter_targets``).
    """
    start = time.perf_counter()
    model = copy.deepcopy(bundle.model)
    spec = bundle.manifest.input
    x = np.concatenate([clean.x, treated])
    y = np.tile(clean.y, 1 + len(treated) // len(clean))
    targets = distilled_targets(
        teacher.model, spec, clean.x, y, cfg.distill, bundle.manifest.num_classes
    )
    if real is not None:
        soft = real[1] if targets.ndim == 2 else real[1].argmax(1)
        x, targets = np.concatenate([x, real[0]]), np.concatenate([targets, soft])
    fit_cfg = FitConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        schedule="cosine",
        augment=("shift",),
    )
    fit(model, x, targets, spec, fit_cfg, progress=False)
    return model.eval(), time.perf_counter() - start
