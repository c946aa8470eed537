"""Round 0's files for NNoculation: the suspect as badnet/, the GoodNet, the report and
the grid's heat map (``trainer.prepare`` makes them; ``trainer.rounds`` publishes them)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.bundle import Bundle, save_bundle
from core.nets import build_model

if TYPE_CHECKING:
    from trainer.prepare import GridResult


def goodnet_from(suspect: Bundle, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(suspect.manifest.arch, suspect.manifest.arch_kwargs)
    model.load_state_dict(state)
    return model.eval()


def report_dict(result: GridResult, suspect: Bundle) -> dict[str, Any]:
    chosen = result.selection.candidate
    return {
        "suspect_sha256": suspect.manifest.weights_sha256,
        "suspect_clean_accuracy": result.suspect_accuracy,
        "threshold": result.selection.threshold,
        "qualified": result.selection.qualified,
        "chosen": asdict(chosen),
        "candidates": [asdict(c) for c in result.candidates],
        "runner": result.runner,
        "seconds": result.seconds,
        "config": result.config,
        "gate_accuracy": result.gate_accuracy,
    }


def write_round_zero(out: Path, *, suspect_dir: Path, suspect: Bundle, result: GridResult) -> None:
    """Fill a round directory: the suspect unchanged as badnet/, the GoodNet, the report."""
    from trainer.report import grid_heatmap

    shutil.copytree(suspect_dir, out / "badnet")
    chosen = result.selection.candidate
    report = report_dict(result, suspect)
    m = suspect.manifest
    metrics = {"clean_accuracy_estimate": chosen.clean_accuracy}
    if "goodnet" in result.gate_accuracy:  # held out, as the repair rounds' own
        metrics["clean_accuracy_gate"] = result.gate_accuracy["goodnet"]
    save_bundle(
        goodnet_from(suspect, result.goodnet_state),
        out / "goodnet",
        arch=m.arch,
        arch_kwargs=m.arch_kwargs,
        class_names=m.class_names,
        input_spec=m.input,
        meta={
            "role": "goodnet",
            "round": 0,
            "created_by": "trainer prepare",
            "created_at": datetime.now(UTC).isoformat(),
            "metrics": metrics,
            "gate_split": result.config["gate_split"],
            "selection": {k: v for k, v in report.items() if k != "candidates"},
        },
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    grid_heatmap(
        {(c.alpha, c.gamma): c.clean_accuracy for c in result.candidates},
        out / "grid_ca.png",
        title=f"GoodNet candidates: held-out CA (suspect {100 * result.suspect_accuracy:.1f}%)",
        chosen=(chosen.alpha, chosen.gamma),
    )
