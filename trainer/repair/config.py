"""The repair round's run hyperparameters: one dataclass, each field's help written once.

``trainer retrain`` and ``trainer watch`` turn the fields with help text into command-line
options (``trainer.options``); the watcher under
``gateway serve`` reads the same fields from the JSON file ``BQG_REPAIR_CONFIG`` names.
docs/DECISIONS.md gives the measurements behind each default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from trainer.cyclegan import DEFAULT_PRESET, PRESETS, CycleGANConfig
from trainer.options import option_field
from trainer.splits import GATE_FRACTION

TREATMENTS = ("gan", "masked", "both")
TEACHERS = ("suspect", "self")
MAX_CURVE_DEGREE = 5


@dataclass
class RepairConfig:
    cyclegan: CycleGANConfig = field(default_factory=lambda: PRESETS[DEFAULT_PRESET])
    clean_images: int = option_field(500, "Clean validation images for the CycleGAN (domain A).")
    max_samples: int | None = option_field(
        None, "Quarantined images a round uses (None: every pending one)."
    )
    min_samples: int = option_field(
        1, "Refuse a round with fewer pending samples of the model's shape."
    )
    max_client_share: float = option_field(
        1.0,
        "The largest share of a round's samples one client may give (1: no cap). Set it "
        "below 1 only where BQG_CLIENT_HEADER or peer addresses tell real clients apart.",
    )
    min_score: float = option_field(
        0.99,
        "Learn only from samples the suspect answers with at least this confidence "
        "(0 keeps every sample, as the paper does).",
    )
    min_kept: int = option_field(16, "Refuse a round that keeps fewer samples than this.")
    strip_filter: bool = option_field(
        False,
        "Learn only from samples whose STRIP entropy is at or below the round's sigma "
        "(rounds prepared with --strip-stage); the rest are set aside with the round.",
    )
    epochs: int = option_field(20, "Fine-tuning epochs.")
    lr: float = option_field(5e-4, "Fine-tuning learning rate.")
    batch_size: int = option_field(64, "Fine-tuning batch size.")
    distill: float = option_field(
        1.0, "Weight of the suspect's answer on the clean original in each fine-tuning target."
    )
    teacher: str = option_field(
        "suspect", "Distil from round 0's suspect ('suspect') or from each member itself."
    )
    split_by_label: bool = option_field(
        True, "One CycleGAN per suspect label with at least min_kept kept samples."
    )
    ca_drop: float = option_field(
        3.0, "The gate's theta: how many points the served clean accuracy may drop."
    )
    class_drop: float = option_field(
        10.0,
        "The gate's per-class floor: how many points any one class's served accuracy may "
        "drop, against the round it replaces and against round 0 (a larger drop fails "
        "only when a sign test says it is not chance).",
    )
    max_clean_suspect: float = option_field(
        10.0, "The gate's bound on clean gate images flagged suspect, in percent."
    )
    gate_fraction: float = option_field(
        GATE_FRACTION, "Share of the validation data held out for the gate."
    )
    views: int = option_field(3, "Views of each clean image treated: itself, then jittered copies.")
    treatment: str = option_field(
        "both", "Per view: 'gan' (gen_ab's copy), 'masked' (its localized part), or 'both'."
    )
    replay: bool = option_field(
        True,
        "Also treat with the triggers earlier rounds learned, so the repair keeps them out "
        "(off: learn from this round's samples alone).",
    )
    quarantine_views: int = option_field(
        3,
        "Fine-tune on this many views of each kept quarantined image, with targets that never "
        "name the trigger's label (0: none, as the paper does).",
    )
    transplant: bool = option_field(
        True,
        "When the kept samples share a stamped trigger (a patch in one place), treat with its "
        "real pixels in place of gen_ab's copies.",
    )
    pixel_curve: int = option_field(
        2,
        "Treat a trigger without a stamp with gen_ab's change fitted as a curve of this degree "
        "per pixel (0: gen_ab's own copies, the paper's treatment).",
    )
    borderline: int = option_field(
        200,
        "Treat, once more with each new trigger, this many validation images the active "
        "GoodNet finds nearest the trigger's target (0: none, as the paper does).",
    )
    seed: int = option_field(0, "Seed of the round's random draws.")

    def validate(self) -> None:
        self.cyclegan.validate()
        _check(
            self.clean_images >= 1 and self.min_samples >= 1 and self.epochs >= 1,
            "clean_images, min_samples and epochs must be at least 1",
        )
        _check(
            self.max_samples is None or self.max_samples >= self.min_samples,
            "max_samples must be at least min_samples",
        )
        _check(
            0 < self.max_client_share <= 1,
            f"max_client_share must lie in (0, 1], got {self.max_client_share}",
        )
        _check(self.class_drop >= 0, f"class_drop must be 0 or more points, got {self.class_drop}")
        _check(self.ca_drop >= 0, f"theta (--ca-drop) must be 0 or more points, got {self.ca_drop}")
        _check(
            self.teacher in TEACHERS, f"teacher must be 'suspect' or 'self', got {self.teacher!r}"
        )
        _check(0 <= self.min_score < 1, f"min_score must lie in [0, 1), got {self.min_score}")
        _check(self.min_kept >= 1, "min_kept must be at least 1")
        _check(0 < self.gate_fraction < 1, "gate_fraction must lie strictly between 0 and 1")
        _check(
            0 <= self.max_clean_suspect <= 100,
            f"max_clean_suspect must lie in [0, 100] percent, got {self.max_clean_suspect}",
        )
        _check(self.views >= 1, f"views must be at least 1, got {self.views}")
        _check(
            0 <= self.pixel_curve <= MAX_CURVE_DEGREE,
            f"pixel_curve must lie in 0..{MAX_CURVE_DEGREE} (0: gen_ab's raw copies), "
            f"got {self.pixel_curve}",
        )
        _check(
            self.quarantine_views >= 0,
            f"quarantine_views must be 0 or more, got {self.quarantine_views}",
        )
        _check(self.borderline >= 0, f"borderline must be 0 or more images, got {self.borderline}")
        _check(
            self.treatment in TREATMENTS,
            f"treatment must be one of {', '.join(TREATMENTS)}, got {self.treatment!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def with_preset(cfg: RepairConfig, preset: str | None) -> RepairConfig:
    """``cfg`` with the CycleGAN preset named ``preset`` (None keeps its own)."""
    if preset is None:
        return cfg
    if preset not in PRESETS:
        raise UserError(f"unknown CycleGAN preset {preset!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, cyclegan=PRESETS[preset])


def load_repair_config(path: Path | None) -> RepairConfig:
    """The run a JSON file of field values asks for (``preset`` names the CycleGAN size);
    None gives the defaults. An unknown field or a bad value is a clear error."""
    if path is None:
        return RepairConfig()
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the repair config {path}: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object of RepairConfig fields")
    preset = values.pop("preset", None)
    known = {f.name for f in dataclasses.fields(RepairConfig)} - {"cyclegan"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown repair fields {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(RepairConfig)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise UserError(f"{path}: {name} must be {hints[name]}, got {value!r}")
    cfg = with_preset(RepairConfig(**values), preset)
    cfg.validate()
    return cfg


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (an int fits a float; a bool fits no number)."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and (int in allowed or float in allowed):
        return True
    return any(isinstance(value, t) for t in allowed if isinstance(t, type) and t is not bool)
