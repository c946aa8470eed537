"""BBD's pre-deployment steps (paper 004, §3 and §4.1): the suspect beside its Fine-Pruned
twin R, and for the targeted rule the target classes Neural Cleanse flags.

- ``fine-pruning``: R is the suspect Fine-Pruned on the clean validation data less the
  gate split (Liu et al., RAID'18, §4).
- ``bbd``: the same R, plus a Neural Cleanse scan of every class of the suspect (Wang et
  al., S&P'19, §IV); its flagged classes are the manifest's ``targets``, and the reversed
  triggers are kept in the round directory for a person and for unlearning.

Only clean validation data is used, never a trigger, and never the gate split, so the gate
of a later round measures on images none of this saw.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle, save_bundle
from core.defenses.bbd import NO_TARGETS
from core.pair import RoundDefense
from trainer.cleanse import BBDConfig, save_triggers, scan, scan_record
from trainer.data import Dataset
from trainer.fineprune import Pruned, fine_prune, resolve_layer
from trainer.loop import predict
from trainer.rounds import publish_round_zero
from trainer.splits import GATE_FRACTION, check_validation, gate_split, split_record

Progress = Callable[[str], None]


def pruned_meta(pruned: Pruned) -> dict[str, Any]:
    """What R's bundle records of its pruning, for a person: later fine-tuning keeps the
    zeros by finding them in the weights (``fineprune.pruned_channels``), not from here."""
    return {"layer": pruned.layer, "channels": pruned.channels}


def save_twin(out: Path, suspect: Bundle, pruned: Pruned, meta: dict[str, Any]) -> None:
    m = suspect.manifest
    save_bundle(
        pruned.model,
        out,
        arch=m.arch,
        arch_kwargs=m.arch_kwargs,
        class_names=m.class_names,
        input_spec=m.input,
        meta={"role": "goodnet", "pruned": pruned_meta(pruned), **meta},
    )


def neural_cleanse(
    suspect: Bundle, data: Dataset, cfg: BBDConfig, parallel: bool, progress: Progress
) -> tuple[list[Any], dict[str, Any]]:
    """Every class's reversed trigger for ``suspect`` and the anomaly table."""
    clean = cfg.search_images(data)
    classes = list(range(suspect.manifest.num_classes))
    m = suspect.manifest
    triggers = scan(
        suspect.model, m.input, clean, classes, cfg.cleanse(), parallel=parallel, progress=progress
    )
    return triggers, scan_record(triggers, cfg.nc_threshold)


def prepare_bbd_round(
    *,
    defense: str,
    suspect_dir: Path,
    suspect: Bundle,
    valid: Dataset,
    bbd: BBDConfig,
    sessions: sessionmaker[Session],
    store: Path,
    targeted: bool,
    parallel: bool = False,
    gate_fraction: float = GATE_FRACTION,
    progress: Progress = lambda message: None,
) -> tuple[dict[str, Any], Path]:
    """Round 0 of a BBD stack: the suspect as badnet/, R as goodnet/, and (``targeted``)
    the Neural Cleanse targets; publishes and activates it."""
    bbd.validate()
    check_validation(suspect, valid)
    start = time.perf_counter()
    rest, gate = gate_split(valid, gate_fraction)
    m = suspect.manifest
    resolve_layer(suspect.model, m.input, bbd.layer)  # a bad --layer fails before the scan
    params: dict[str, Any] = {"bbd": bbd.to_dict()}
    triggers: list[Any] = []
    if targeted:  # first: the targets set the twin's pruning budget
        triggers, table = neural_cleanse(suspect, rest, bbd, parallel, progress)
        params.update(targets=table["flagged"], neural_cleanse=table)
    pruned = fine_prune(
        suspect.model, m.input, rest, layer=bbd.layer, budget=bbd.budget(params.get("targets")),
        fit_cfg=bbd.prune_fit(), progress=progress,
    )  # fmt: skip
    params["fine_pruning"] = _public(pruned.record)
    report = {**params, **_gate_report(suspect, pruned, gate, params.get("targets"))}
    report["seconds"] = time.perf_counter() - start
    if targeted and not params["targets"]:
        report["note"] = NO_TARGETS
        progress(NO_TARGETS)
    meta = {
        "round": 0,
        "created_by": "trainer prepare",
        "created_at": datetime.now(UTC).isoformat(),
        "metrics": {"clean_accuracy_gate": report["clean_accuracy_goodnet"]},
        "gate_split": split_record(gate, gate_fraction),
    }

    def write(out: Path) -> None:
        shutil.copytree(suspect_dir, out / "badnet")
        save_twin(out / "goodnet", suspect, pruned, meta)
        if triggers:  # written before round.json, so the manifest records the digest
            params["triggers_sha256"] = save_triggers(out, triggers)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    metrics = {k: v for k, v in report.items() if k != "bbd"}
    return report, publish_round_zero(
        sessions, store, write, metrics, RoundDefense(defense, params)
    )


def _gate_report(
    suspect: Bundle, pruned: Pruned, gate: Dataset, targets: list[int] | None
) -> dict[str, Any]:
    """The gate split, which neither the scan nor the pruning saw: each member's accuracy,
    and the rule's false rejections there (targeted: the suspect answers a target and R
    disputes it; untargeted: any disagreement)."""
    spec = suspect.manifest.input
    bad, twin = predict(suspect.model, gate.x, spec), predict(pruned.model, gate.x, spec)
    watched = np.isin(bad, targets) if targets else np.ones(len(bad), dtype=bool)
    return {
        "gate_images": len(gate),
        "clean_accuracy_badnet": float(np.mean(bad == gate.y)) if len(gate) else None,
        "clean_accuracy_goodnet": float(np.mean(twin == gate.y)) if len(gate) else None,
        "gate_frr": float(np.mean(watched & (twin != bad))) if len(gate) else None,
    }


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A pruning record for the manifest: without the per-step accuracy curve."""
    return {k: v for k, v in record.items() if k not in ("curve", "finetune")}
