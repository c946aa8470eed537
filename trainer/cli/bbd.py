"""BBD's commands: round 0 of a ``bbd-*`` stack (through ``trainer prepare``) and
``trainer scan``, Neural Cleanse on any bundle for a person to look at."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from core.bundle import load_bundle
from trainer.cleanse import BBDConfig, save_triggers
from trainer.cli.common import _load, _settings, app, err_console, out_console, use_ray
from trainer.options import config_options
from trainer.splits import check_validation

ParallelOpt = Annotated[
    bool | None,
    typer.Option(
        "--parallel/--sequential",
        help="Search the classes as Ray tasks. Default: when Ray starts and there are 2+ threads.",
    ),
]


def anomaly_table(record: dict[str, Any]) -> Table:
    """Neural Cleanse's table: per class the mask L1, success and anomaly index; flagged
    classes (small L1, index above the threshold) are starred."""
    table = Table(
        title=f"Neural Cleanse (flag: L1 below the median, index > {record['threshold']:g})"
    )
    for name in ("class", "mask L1", "success %", "anomaly index", "flagged"):
        table.add_column(name, justify="right")
    for k, l1, s, a in zip(
        record["classes"], record["l1"], record["success"], record["anomaly_index"], strict=True
    ):
        table.add_row(
            str(k),
            "unreached" if l1 is None else f"{l1:.1f}",
            f"{100 * s:.1f}",
            f"{a:.2f}",
            "*" if k in record["flagged"] else "",
        )
    return table


def run_bbd_step(
    step: Any,
    common: dict[str, Any],
    bbd: BBDConfig,
    settings: Any,
    sessions: Any,
    gate_fraction: float,
    parallel: bool | None,
) -> None:
    """Round 0 of a BBD stack, with progress on stderr and what it found on stdout."""
    report, path = step(
        **common,
        bbd=bbd,
        sessions=sessions,
        store=settings.store,
        gate_fraction=gate_fraction,
        parallel=use_ray(parallel, settings.threads, "classes"),
        progress=lambda message: err_console.print(message, markup=False, highlight=False),
    )
    fp = report["fine_pruning"]
    if "neural_cleanse" in report:
        out_console.print(anomaly_table(report["neural_cleanse"]))
    targets = report.get("targets")
    gate = (
        f"; on the {report['gate_images']} gate images: badnet CA "
        f"{100 * report['clean_accuracy_badnet']:.2f}%, R CA "
        f"{100 * report['clean_accuracy_goodnet']:.2f}%, the rule's FRR "
        f"{100 * report['gate_frr']:.2f}%"
        if report["gate_images"]
        else ""
    )
    out_console.print(
        f"round 0 ({common['defense']}) is active: R pruned {fp['pruned']} of "
        f"{fp['channels_total']} channels of {fp['layer']!r} ({100 * fp['prune_ratio']:.0f}%)"
        + gate
        + ("" if targets is None else f"; targets {targets or 'none'}")
        + f"; bundles and report in {path}"
    )
    if report.get("note"):
        out_console.print(report["note"])


@app.command("scan")
@config_options(BBDConfig, skip=[f.name for f in fields(BBDConfig) if not f.name.startswith("nc_")])
def scan_cmd(
    model: Annotated[Path, typer.Option(help="The bundle to scan (possibly a BadNet).")],
    valid: Annotated[
        str, typer.Option(help="Clean data the search starts from (as for 'prepare').")
    ] = "fashion-mnist",
    out: Annotated[
        Path | None,
        typer.Option(help="Where the masks and patterns go. Default: nc-scan/<model's name>."),
    ] = None,
    parallel: ParallelOpt = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Neural Cleanse on every class of a bundle: print the anomaly table and write each
    class's reversed mask and pattern (PNG and safetensors). Registers nothing."""
    from trainer.bbd import neural_cleanse

    settings = _settings(None, None)
    bundle = load_bundle(model, trusted_modules=settings.trusted_arch_modules)
    data = _load(valid, settings, "valid")
    check_validation(bundle, data)
    cfg = BBDConfig(**(overrides or {}))
    cfg.validate()
    target = out or Path("nc-scan") / model.resolve().name
    triggers, record = neural_cleanse(
        bundle,
        data,
        cfg,
        use_ray(parallel, settings.threads, "classes"),
        lambda message: err_console.print(message, markup=False, highlight=False),
    )
    save_triggers(target, triggers)
    out_console.print(anomaly_table(record))
    flagged = record["flagged"]
    out_console.print(
        f"flagged: {flagged or 'none'}; masks and patterns in {target} "
        "(nc_class<K>.png, nc_triggers.safetensors)"
    )
