"""BBD's training parts around the two algorithms: the settings, a Neural Cleanse scan of
every class (parallel Ray tasks when Ray runs), its files, and unlearning.

The scan and its files serve ``trainer scan`` (a person looks at what was found), the
``bbd`` pre-deployment step (its flagged classes are the targeted rule's T) and the
``neural-cleanse`` repairer (Wang et al., S&P'19, §V-C: unlearning).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.bundle import InputSpec
from core.errors import BundleError, UserError
from trainer.data import Dataset
from trainer.fineprune import (
    Budget,
    conv_layers,
    held_at_zero,
    pruned_channels,
    resolve_layer,
)
from trainer.loop import FitConfig, fit
from trainer.neural_cleanse import (
    CleanseConfig,
    Trigger,
    anomaly_indices,
    flagged_classes,
    reverse_trigger,
)
from trainer.options import option_field

TRIGGERS_FILE = "nc_triggers.safetensors"


@dataclass
class BBDConfig:
    """Fine-Pruning, Neural Cleanse and unlearning; fields with help text are options of
    ``trainer prepare`` and ``trainer scan``, and a round's repairs reuse its values."""

    prune_drop: float = option_field(
        4.0, "Fine-Pruning: prune until validation accuracy has dropped this many points."
    )
    prune_frr: float = option_field(
        0.01,
        "bbd-targeted, when Neural Cleanse flags a target: prune R while the clean validation "
        "inputs its rule would reject stay within this share (--prune-drop otherwise).",
    )
    layer: str | None = option_field(
        None, "Fine-Pruning: the Conv2d to prune, by module name (default: the last one run)."
    )
    prune_epochs: int = option_field(10, "Fine-Pruning: fine-tuning epochs on clean data.")
    prune_lr: float = option_field(1e-3, "Fine-Pruning: fine-tuning SGD learning rate.")
    nc_epochs: int = option_field(40, "Neural Cleanse: most epochs per class (early stop).")
    nc_images: int = option_field(500, "Neural Cleanse: clean images the search draws from.")
    nc_threshold: float = option_field(
        2.0, "Neural Cleanse: flag a small-trigger class whose anomaly index is above this."
    )
    unlearn_fraction: float = option_field(
        0.2, "Unlearning: share of the clean images stamped with each flagged trigger."
    )
    unlearn_epochs: int = option_field(1, "Unlearning: fine-tuning epochs.")
    unlearn_lr: float = option_field(1e-3, "Unlearning: Adam learning rate.")
    seed: int = 0

    def validate(self) -> None:
        Budget(self.prune_drop, self.prune_frr).check()  # the pruning limits' own checks
        checks = [
            (self.prune_epochs >= 0, "--prune-epochs must be 0 or more"),
            (
                self.nc_epochs >= 1 and self.nc_images >= 1,
                "--nc-epochs and --nc-images must be >= 1",
            ),
            (0 < self.unlearn_fraction <= 1, "--unlearn-fraction must lie in (0, 1]"),
            (self.unlearn_epochs >= 1, "--unlearn-epochs must be at least 1"),
            (self.prune_lr > 0 and self.unlearn_lr > 0, "learning rates must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def search_images(self, data: Dataset) -> np.ndarray:
        """``nc_images`` clean images drawn at random (seeded): data may come sorted by
        class, and a search on a few classes' images would favour those classes."""
        order = np.random.default_rng(self.seed).permutation(len(data))
        return data.x[np.sort(order[: self.nc_images])]

    def cleanse(self) -> CleanseConfig:
        return CleanseConfig(epochs=self.nc_epochs, seed=self.seed)

    def budget(self, targets: list[int] | None = None) -> Budget:
        """Fine-Pruning's stop rule: the FRR budget for a targeted twin with targets, else
        the accuracy drop."""
        if targets:
            return Budget(self.prune_drop, self.prune_frr, tuple(targets))
        return Budget(self.prune_drop)

    def prune_fit(self) -> FitConfig:
        """BBD §4.1: fine-tune R with SGD at lr 1e-3 on clean data."""
        return FitConfig(
            epochs=self.prune_epochs, lr=self.prune_lr, optimizer="sgd", seed=self.seed
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _search(job: tuple[nn.Module, InputSpec, np.ndarray, int, CleanseConfig]) -> Trigger:
    torch.set_num_threads(1)
    return reverse_trigger(*job)


def scan(
    model: nn.Module,
    spec: InputSpec,
    clean: np.ndarray,
    classes: list[int],
    cfg: CleanseConfig,
    *,
    parallel: bool,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Trigger]:
    """Each class's reversed trigger, one Ray task per class when ``parallel`` (one worker
    per task, so a finished task's memory goes with it), else in sequence."""
    jobs = [(model, spec, clean, t, cfg) for t in classes]
    found: dict[int, Trigger] = {}

    def done(t: Trigger) -> None:
        found[t.target] = t
        progress(
            f"neural cleanse: class {t.target}: mask L1 {t.l1:.1f}, success "
            f"{100 * t.success:.1f}%, {t.epochs} epochs, {t.seconds:.0f}s "
            f"({len(found)}/{len(jobs)})"
        )

    if parallel:
        import ray

        remote = ray.remote(num_cpus=1, max_calls=1)(_search)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
    else:
        for job in jobs:
            done(reverse_trigger(*job))
    return [found[t] for t in classes]


def scan_record(triggers: list[Trigger], threshold: float) -> dict[str, Any]:
    """The anomaly table as a manifest records it: per class L1, index, success, and the
    flagged classes (targets)."""
    l1 = [t.l1 for t in triggers]
    index = anomaly_indices(l1)
    flagged = flagged_classes(l1, threshold)
    return {
        "classes": [t.target for t in triggers],
        "l1": [None if not np.isfinite(v) else round(float(v), 3) for v in l1],
        "anomaly_index": [round(float(v), 3) for v in index],
        "success": [round(t.success, 4) for t in triggers],
        "threshold": threshold,
        "flagged": [triggers[i].target for i in flagged],
    }


def save_triggers(out: Path, triggers: list[Trigger], name: str = TRIGGERS_FILE) -> str:
    """Masks and patterns as safetensors (``mask_<t>``, ``pattern_<t>``) in ``name`` and one
    PNG per class; returns the safetensors file's sha256, recorded with the round."""
    from trainer.report import reversed_trigger_figure

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t in triggers:
        tensors[f"mask_{t.target}"] = torch.tensor(np.array(t.mask, dtype=np.float32))
        tensors[f"pattern_{t.target}"] = torch.tensor(np.array(t.pattern, dtype=np.float32))
        reversed_trigger_figure(t.mask, t.pattern, out / f"nc_class{t.target}.png", t.target, t.l1)
    path = out / name
    save_file(tensors, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_triggers(directory: Path, sha256: str, targets: list[int]) -> list[Trigger]:
    """The reversed triggers of ``targets`` from a round directory, checked against the
    digest its manifest recorded (no unpickling: safetensors)."""
    path = Path(directory) / TRIGGERS_FILE
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise BundleError(f"{path} does not match the digest its round recorded")
        tensors = load_file(str(path))
        return [
            Trigger(t, tensors[f"mask_{t}"].numpy(), tensors[f"pattern_{t}"].numpy(), 0, 0, 0, 0)
            for t in targets
        ]
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"cannot read the reversed triggers in {path}: {exc}") from None


def unlearn(
    model: nn.Module, spec: InputSpec, clean: Dataset, triggers: list[Trigger], cfg: BBDConfig
) -> nn.Module:
    """A copy of ``model`` fine-tuned on ``clean`` with ``unlearn_fraction`` of it stamped by
    each trigger (disjoint parts) and kept at its true label (Wang et al. §V-C); channels
    Fine-Pruning zeroed stay at zero (``pruned_channels``)."""
    x = clean.x.copy()
    order = np.random.default_rng(cfg.seed).permutation(len(clean))
    k = max(1, round(cfg.unlearn_fraction * len(clean)))
    for i, t in enumerate(triggers):
        part = order[i * k : (i + 1) * k]  # fewer (or none) once the data runs out
        x[part] = t.stamp(clean.x[part])
    model = copy.deepcopy(model)
    convs = conv_layers(model, spec)
    layer = resolve_layer(model, spec, cfg.layer) if convs else None
    remove = held_at_zero(model, layer, pruned_channels(model, layer)) if layer else None
    fit_cfg = FitConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, batch_size=32, seed=cfg.seed)
    fit(model, x, clean.y, spec, fit_cfg, progress=False)
    if remove is not None:
        remove()
    return model.eval()
