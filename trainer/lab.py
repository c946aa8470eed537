"""The BadNet lab: fabricate backdoored models and measure CA and ASR.

Used by ``trainer fabricate`` / ``trainer evaluate`` and by the benchmarks. The attack's
full description goes into the bundle's ``meta["attack"]`` so that anyone holding the
bundle can rebuild the triggered test set (the defender's tools never read it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Bundle, InputSpec, Manifest, read_manifest, save_bundle
from core.errors import DataError, UserError
from core.nets import build_model
from trainer.attacks.poison import Attack, attack_success_rates, build_attack, poison
from trainer.data import Dataset
from trainer.loop import FitConfig, accuracy, fit, predict, seed_everything

CLEAN = "clean"  # the attack name that fabricates a clean reference model


@dataclass
class FabricateResult:
    manifest: Manifest
    clean_accuracy: float
    asr: dict[str, float]
    seconds: float


def input_spec_for(data: Dataset) -> InputSpec:
    """Per-channel mean and std of the training images (rounded; they are recorded)."""
    h, w, c = data.image_shape
    pixels = data.x.reshape(-1, c).astype(np.float64) / 255.0
    return InputSpec(
        channels=c,  # type: ignore[arg-type]
        height=h,
        width=w,
        mean=[round(float(m), 4) for m in pixels.mean(0)],
        std=[round(max(float(s), 1e-3), 4) for s in pixels.std(0)],
    )


def check_labels(data: Dataset, num_classes: int) -> None:
    if len(data) and int(data.y.max()) >= num_classes:
        raise DataError(
            f"{data.source} has label {int(data.y.max())}, but the model has {num_classes} classes"
        )


def fabricate(
    *,
    train: Dataset,
    heldout: Dataset,
    attack_name: str,
    target: int,
    out: Path,
    arch: str = "fmnist-cnn",
    poison_rate: float | None = None,
    params: dict[str, Any] | None = None,
    fit_config: FitConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FabricateResult:
    """Train a BadNet (or, with ``attack_name="clean"``, a clean model) and save its bundle."""
    cfg = fit_config or FitConfig()
    num_classes = train.num_classes
    attack: Attack | None = None
    if attack_name != CLEAN:
        attack = build_attack(
            attack_name,
            target=target,
            num_classes=num_classes,
            image_shape=train.image_shape,
            poison_rate=poison_rate,
            seed=cfg.seed,
            params=params,
        )
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    if heldout.image_shape != train.image_shape:
        raise DataError(
            f"held-out images are {heldout.image_shape}, training images {train.image_shape}"
        )
    check_labels(heldout, num_classes)
    spec = input_spec_for(train)
    h, w, c = train.image_shape
    arch_kwargs = {"in_channels": c, "num_classes": num_classes, "height": h, "width": w}
    seed_everything(cfg.seed)  # the initial weights follow the seed too
    model = build_model(arch, arch_kwargs)
    data = poison(train, attack)[0] if attack else train
    start = time.perf_counter()
    history = fit(
        model, data.x, data.y, spec, cfg, desc=f"fabricate {attack_name}", progress=progress
    )
    seconds = time.perf_counter() - start
    ca = accuracy(model, heldout.x, heldout.y, spec)
    asr = attack_success_rates(lambda x: predict(model, x, spec), heldout, attack) if attack else {}
    meta = {
        "role": "badnet" if attack else "clean",
        "attack": attack.to_dict() if attack else None,
        "fit": cfg.to_dict(),
        "data": {"train": train.source, "train_size": len(train), "heldout": heldout.source},
        "metrics": {"clean_accuracy": ca, "asr": asr, "train_seconds": seconds},
        "history": history,
        "provenance": {
            "created_by": "trainer fabricate",
            "created_at": datetime.now(UTC).isoformat(),
        },
    }
    manifest = save_bundle(
        model,
        out,
        arch=arch,
        arch_kwargs=arch_kwargs,
        class_names=train.class_names,
        input_spec=spec,
        meta=meta,
        overwrite=overwrite,
    )
    return FabricateResult(manifest, ca, asr, seconds)


def attack_of(bundle_dir: Path) -> Attack | None:
    """The attack recorded in a (BadNet) bundle's manifest; weights are not read."""
    recorded = read_manifest(bundle_dir).meta.get("attack")
    if not recorded:
        return None
    try:
        return Attack.from_dict(recorded)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{bundle_dir} records an attack we cannot rebuild: {exc}") from None


def evaluate(bundle: Bundle, data: Dataset, attack: Attack | None) -> dict[str, Any]:
    """CA on ``data`` and, when an attack is given, ASR per trigger group."""
    spec = bundle.manifest.input
    spec.check(data.x)
    check_labels(data, bundle.manifest.num_classes)
    if attack and attack.num_classes != bundle.manifest.num_classes:
        raise UserError(
            f"the attack targets {attack.num_classes} classes, "
            f"the model has {bundle.manifest.num_classes}"
        )
    result: dict[str, Any] = {
        "clean_accuracy": accuracy(bundle.model, data.x, data.y, spec),
        "n": len(data),
    }
    if attack:
        result["attack"] = attack.name
        result["asr"] = attack_success_rates(bundle.predict, data, attack)
    return result
