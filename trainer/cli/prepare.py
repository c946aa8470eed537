"""``trainer prepare`` (round 0, the pre-deployment step) and ``trainer prune``."""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import MofNCompleteColumn, Progress

from core.bundle import load_bundle
from core.db import open_store, safe_url, session_factory, transaction
from core.defenses import get_defense
from core.pair import DEFAULT_DEFENSE
from core.quarantine import (
    prune_consumed,
)
from trainer.cleanse import BBDConfig
from trainer.cli.bbd import run_bbd_step
from trainer.cli.common import (
    DbOpt,
    StoreOpt,
    _floats,
    _load,
    _open_sessions,
    _settings,
    app,
    err_console,
    out_console,
    use_ray,
)
from trainer.defenses import BBD_STEPS, prepare_step
from trainer.grid import run_ray, run_sequential
from trainer.options import config_options
from trainer.prepare import DEFAULT_ALPHAS, DEFAULT_GAMMAS, PrepareConfig
from trainer.report import grid_table
from trainer.splits import check_validation
from trainer.strip import StripConfig, prepare_strip_round


@app.command("prepare")
@config_options(BBDConfig)
@config_options(StripConfig)
@config_options(PrepareConfig)
def prepare_cmd(
    model: Annotated[Path, typer.Option(help="The suspect model's bundle (possibly a BadNet).")],
    valid: Annotated[
        str,
        typer.Option(
            help="Clean validation data spec; bare fashion-mnist means its 1,000-image valid split."
        ),
    ] = "fashion-mnist",
    alphas: Annotated[
        str, typer.Option(help="Learning-rate multiples of the suspect's base rate.")
    ] = ",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
    gammas: Annotated[
        str, typer.Option(help="Noise fractions (of the 4x4 cells replaced).")
    ] = ",".join(f"{g:g}" for g in DEFAULT_GAMMAS),
    schedule: Annotated[
        str,
        typer.Option(
            help="Learning-rate schedule per candidate: cosine (decays to 0) or constant (the paper's)."
        ),
    ] = PrepareConfig.schedule,
    augment: Annotated[
        str, typer.Option(help="Batch jitter: shift, flip, both comma-separated, or none.")
    ] = ",".join(PrepareConfig.augment),
    base_lr: Annotated[
        float | None,
        typer.Option(help="Base learning rate. Default: the one in the bundle's meta, else 1e-3."),
    ] = None,
    parallel: Annotated[
        bool | None,
        typer.Option(
            "--parallel/--sequential",
            help="Run the grid's candidates or Neural Cleanse's classes as Ray tasks. "
            "Default: when Ray starts and there are 2+ threads.",
        ),
    ] = None,
    defense: Annotated[
        str,
        typer.Option(
            help="The defense round 0 serves and later rounds carry ('trainer defenses')."
        ),
    ] = DEFAULT_DEFENSE,
    db: DbOpt = None,
    store: StoreOpt = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Run the defense's pre-deployment step and register, then activate, round 0: the
    GoodNet grid (NNoculation), fitting STRIP beside the suspect alone (CoDefend), or the
    Fine-Pruned twin and Neural Cleanse's targets (BBD)."""
    settings = _settings(db, store)
    step = prepare_step(defense)  # an unknown defense stops here, before any training
    given = overrides or {}
    strip_names = _option_names(StripConfig)
    bbd_names = _option_names(BBDConfig)
    cfg = PrepareConfig(
        alphas=_floats(alphas, "--alphas"),
        gammas=_floats(gammas, "--gammas"),
        schedule=schedule,  # type: ignore[arg-type]  # validated below
        augment=tuple(a.strip() for a in augment.split(",") if a.strip() not in ("", "none")),
        **{k: v for k, v in given.items() if k not in strip_names | bbd_names},
    )
    cfg.validate()
    strip = StripConfig(seed=cfg.seed, **{k: v for k, v in given.items() if k in strip_names})
    strip.validate(settings.strip_max_overlays)
    bbd = BBDConfig(seed=cfg.seed, **{k: v for k, v in given.items() if k in bbd_names})
    bbd.validate()
    suspect = load_bundle(model, trusted_modules=settings.trusted_arch_modules)
    data = _load(valid, settings, "valid")
    check_validation(suspect, data)
    sessions = _open_sessions(settings)
    common = dict(defense=defense, suspect_dir=model, suspect=suspect, valid=data)
    if get_defense(defense).prepare in BBD_STEPS:
        run_bbd_step(step, common, bbd, settings, sessions, cfg.gate_fraction, parallel)
        return
    if step is prepare_strip_round:
        report, path = step(
            **common,
            strip=strip,
            sessions=sessions,
            store=settings.store,
            gate_fraction=cfg.gate_fraction,
        )
        _print_strip_round(report, defense, path)
        return
    result, path = _run_grid(
        step, common, cfg, strip, settings, sessions, parallel=parallel, base_lr=base_lr
    )
    _print_round_zero(result, cfg, defense, path)


def _option_names(cls: type) -> set[str]:
    """The fields of a config dataclass that are command-line options."""
    return {f.name for f in fields(cls) if "help" in f.metadata}


def _run_grid(
    step: Any,
    common: dict[str, Any],
    cfg: PrepareConfig,
    strip: StripConfig,
    settings: Any,
    sessions: Any,
    *,
    parallel: bool | None,
    base_lr: float | None,
) -> tuple[Any, Path]:
    """The GoodNet grid (NNoculation's step), on Ray when it starts, with a progress bar."""
    runner = run_ray if use_ray(parallel, settings.threads, "candidates") else run_sequential
    total = len(cfg.alphas) * len(cfg.gammas) * cfg.folds  # one run per candidate and fold
    with Progress(
        *Progress.get_default_columns(), MofNCompleteColumn(), console=err_console
    ) as bar:
        task = bar.add_task(f"GoodNet grid ({runner.__name__.removeprefix('run_')})", total=total)
        result, path = step(
            **common,
            cfg=cfg,
            sessions=sessions,
            store=settings.store,
            base_lr=base_lr,
            runner=runner,
            on_candidate=lambda c: bar.advance(task),
            strip=None if strip.strip_stage == "off" else strip,
        )
    return result, path


def _print_strip_round(report: dict[str, Any], defense: str, path: Path) -> None:
    """What CoDefend's round 0 fitted, and its served rates on the gate split."""
    fit = report["strip"]
    line = (
        f"round 0 ({defense}) is active: the suspect alone with STRIP, {fit['n']} overlays "
        f"({fit['mode']}), sigma {fit['sigma']:.4f} bits at a {100 * fit['frr']:g}% "
        f"target FRR, fitted on {report['fit_images']} clean images"
    )
    if report["gate_frr"] is not None:
        line += (
            f"; on the {report['gate_images']} gate images: CA "
            f"{100 * report['clean_accuracy_badnet']:.2f}%, FRR {100 * report['gate_frr']:.2f}%"
        )
    out_console.print(f"{line}; bundle and report in {path}")


def _print_round_zero(result: Any, cfg: PrepareConfig, defense: str, path: Path) -> None:
    """The grid's table, the choice, and round 0's accuracies on the gate split."""
    sel = result.selection
    out_console.print(
        grid_table(
            [asdict(c) for c in result.candidates],
            chosen=(sel.candidate.alpha, sel.candidate.gamma),
            threshold=sel.threshold,
            margin_se=cfg.margin_se,
        )
    )
    if not sel.qualified:
        out_console.print(
            f"no candidate kept clean accuracy within {cfg.ca_drop:g} points; kept the smallest drop instead"
        )
    out_console.print(
        f"round 0 ({defense}) is active: badnet CA {100 * result.suspect_accuracy:.2f}%, goodnet CA {100 * sel.candidate.clean_accuracy:.2f}% "
        f"(alpha {sel.candidate.alpha:g}x, gamma {sel.candidate.gamma:.1f}) in {result.seconds:.0f}s; bundles and report in {path}"
    )
    if result.gate_accuracy:
        gate = result.config["gate_split"]
        out_console.print(
            f"on the {gate['images']} validation images reserved for the repair gate: "
            f"badnet CA {100 * result.gate_accuracy['badnet']:.2f}%, "
            f"goodnet CA {100 * result.gate_accuracy['goodnet']:.2f}%"
        )


@app.command("prune")
def prune_cmd(
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than", min=0.0, help="Age in days of the consumed samples to delete."
        ),
    ],
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Delete quarantined samples that a round consumed more than N days ago (pending ones stay)."""
    settings = _settings(db, store)
    engine = open_store(settings.db_url)
    with transaction(session_factory(engine)) as session:
        deleted = prune_consumed(session=session, older_than=timedelta(days=older_than))
    engine.dispose()
    out_console.print(
        f"deleted {deleted} consumed samples older than {older_than:g} days from {safe_url(settings.db_url)}"
    )
