"""``trainer``: the operator's command line (typer).

Bad input ends with one line on stderr saying what to fix, and exit status 2. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import InputSpec, load_bundle
from core.db import open_store, safe_url, session_factory, transaction
from core.errors import UserError
from core.quarantine import (
    activate_round,
    active_round_number,
    list_rounds,
    pending_count,
    prune_consumed,
    try_claim_round,
)
from core.settings import Settings, load_settings
from trainer.attacks.poison import ATTACKS, Attack, build_attack
from trainer.data import Dataset, load_data
from trainer.importer import import_weights
from trainer.lab import CLEAN, attack_of, evaluate, fabricate
from trainer.loop import FitConfig, set_threads
from trainer.prepare import (
    DEFAULT_ALPHAS,
    DEFAULT_GAMMAS,
    PrepareConfig,
    check_validation,
    prepare_round_zero,
    run_ray,
    run_sequential,
    start_local_ray,
)
from trainer.repair import RepairConfig, repair_config, run_claimed_round
from trainer.report import grid_table
from trainer.watcher import Watcher

app = typer.Typer(
    help="Train, import, evaluate and repair the models the gateway serves (NNoculation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL. Default: $BQG_DB, else sqlite:///<store>/quarantine.db."
    ),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", help="Store directory for bundles and rounds. Default: $BQG_STORE or var/store."
    ),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help=(
            "Attack parameter override KEY=VALUE (size, row, col, pattern, alpha, "
            "gamma, lift, strength, cover_rate, ...); repeatable."
        ),
    ),
]


def _settings(db: str | None, store: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if db:
        overrides["db"] = db
    if store:
        overrides["store"] = store
    settings = load_settings(**overrides)
    set_threads(settings.threads)
    return settings


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _load(spec: str, settings: Settings, default_split: str) -> Dataset:
    data = load_data(
        spec, fashion_mnist_dir=settings.fashion_mnist_dir, default_split=default_split
    )
    if len(data) == 0:
        raise UserError(f"{spec} holds no images")
    return data


def _metrics_table(title: str, ca: float, asr: dict[str, float]) -> Table:
    table = Table(title=title, min_width=min(len(title) + 4, 100))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("clean accuracy (CA)", f"{100 * ca:.2f}%")
    for name, rate in asr.items():
        table.add_row(f"ASR ({name})", f"{100 * rate:.2f}%")
    return table


@app.command("fabricate")
def fabricate_cmd(
    out: Annotated[Path, typer.Option(help="Directory for the new bundle.")],
    attack: Annotated[
        str, typer.Option(help=f"Attack: {', '.join(ATTACKS)}, or '{CLEAN}' for a clean model.")
    ] = "patch",
    target: Annotated[
        int, typer.Option(help="Attacker's target class (all-to-all: ignored, y -> y+1).")
    ] = 0,
    dataset: Annotated[
        str,
        typer.Option(help="Training data spec; bare fashion-mnist means its 60k training images."),
    ] = "fashion-mnist",
    heldout: Annotated[
        str | None,
        typer.Option(
            help=(
                "Evaluation data spec. Default: fashion-mnist:heldout for "
                "fashion-mnist, else 10% of --dataset."
            )
        ),
    ] = None,
    poison_rate: Annotated[
        float, typer.Option(help="Fraction of training samples that carry a firing trigger.")
    ] = 0.1,
    param: ParamOpt = None,
    arch: Annotated[
        str,
        typer.Option(
            help="Architecture: fmnist-cnn, nnoculation-cla, color-cnn, or package.module:Class."
        ),
    ] = "fmnist-cnn",
    epochs: Annotated[int, typer.Option(min=1)] = FitConfig.epochs,
    lr: Annotated[float, typer.Option(min=0.0)] = FitConfig.lr,
    batch_size: Annotated[int, typer.Option(min=1)] = FitConfig.batch_size,
    seed: Annotated[int, typer.Option()] = FitConfig.seed,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on the first N images only (quick runs).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Train a BadNet with the chosen attack and save it as a bundle (the BadNet lab)."""
    settings = _settings(db, store)
    train = _load(dataset, settings, "train")
    if heldout is not None:
        held = _load(heldout, settings, "heldout")
    elif dataset.partition(":")[0] == "fashion-mnist":
        held = _load("fashion-mnist:heldout", settings, "heldout")
    else:
        cut = max(1, len(train) // 10)
        train, held = (
            train.take(slice(cut, None)),
            train.take(slice(0, cut), source=f"{train.source}[:{cut}]"),
        )
    if limit:
        train = train.take(slice(0, limit))
    result = fabricate(
        train=train,
        heldout=held,
        attack_name=attack,
        target=target,
        out=out,
        arch=arch,
        poison_rate=poison_rate,
        params=_parse_params(param),
        fit_config=FitConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
        overwrite=overwrite,
        progress=sys.stderr.isatty(),
    )
    out_console.print(
        _metrics_table(
            f"{attack} model on {held.source} ({result.seconds:.0f}s training)",
            result.clean_accuracy,
            result.asr,
        )
    )
    out_console.print(f"saved bundle {out}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Option(help="Bundle directory to evaluate.")],
    data: Annotated[
        str, typer.Option(help="Data spec; bare fashion-mnist means the held-out test split.")
    ] = "fashion-mnist",
    attack_from: Annotated[
        Path | None,
        typer.Option(
            help="Take the triggers from this bundle's recorded attack (e.g. the BadNet)."
        ),
    ] = None,
    attack: Annotated[
        str | None, typer.Option(help="Or build this attack with its defaults.")
    ] = None,
    target: Annotated[int, typer.Option(help="Target class for --attack.")] = 0,
    param: ParamOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Print clean accuracy (CA) and attack success rate (ASR) per trigger."""
    settings = _settings(db, store)
    bundle = load_bundle(model, trusted_modules=settings.trusted_arch_modules)
    dataset = _load(data, settings, "heldout")
    chosen: Attack | None
    if attack:
        chosen = build_attack(
            attack,
            target=target,
            num_classes=bundle.manifest.num_classes,
            image_shape=bundle.manifest.input.shape,
            params=_parse_params(param),
        )
    else:
        chosen = attack_of(attack_from or model)
    result = evaluate(bundle, dataset, chosen)
    if as_json:
        out_console.print_json(json.dumps(result))
    else:
        out_console.print(
            _metrics_table(
                f"{model} on {dataset.source}", result["clean_accuracy"], result.get("asr", {})
            )
        )


@app.command("import")
def import_cmd(
    arch: Annotated[str, typer.Option(help="Registered architecture or package.module:Class.")],
    weights: Annotated[
        Path,
        typer.Option(
            help="state_dict file (.pt/.pth via torch.load(weights_only=True), or .safetensors)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the new bundle.")],
    num_classes: Annotated[int, typer.Option(min=2)] = 10,
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated class names. Default: 0..K-1.")
    ] = None,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB).")] = 1,
    height: Annotated[int, typer.Option(min=1)] = 28,
    width: Annotated[int, typer.Option(min=1)] = 28,
    scale: Annotated[float, typer.Option(help="Pixels are divided by this first.")] = 255.0,
    mean: Annotated[
        str, typer.Option(help="Per-channel mean after scaling, comma-separated.")
    ] = "0.0",
    std: Annotated[
        str, typer.Option(help="Per-channel std after scaling, comma-separated.")
    ] = "1.0",
    arch_kwargs: Annotated[str, typer.Option(help="Extra constructor arguments as JSON.")] = "{}",
    overwrite: Annotated[bool, typer.Option()] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Wrap a PyTorch state_dict as a bundle. Never unpickles code."""
    _settings(db, store)
    names = (
        [n.strip() for n in class_names.split(",")]
        if class_names
        else [str(i) for i in range(num_classes)]
    )
    if len(names) != num_classes:
        raise UserError(f"--class-names has {len(names)} names for --num-classes {num_classes}")
    try:
        spec = InputSpec(
            channels=channels,  # type: ignore[arg-type]
            height=height,
            width=width,
            scale=scale,
            mean=[float(v) for v in mean.split(",")] * (channels if "," not in mean else 1),
            std=[float(v) for v in std.split(",")] * (channels if "," not in std else 1),
        )
        extra = json.loads(arch_kwargs)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"bad input description: {exc}") from None
    if not isinstance(extra, dict):
        raise UserError("--arch-kwargs must be a JSON object")
    import_weights(
        arch=arch,
        weights=weights,
        out=out,
        class_names=names,
        input_spec=spec,
        arch_kwargs=extra,
        overwrite=overwrite,
    )
    out_console.print(f"saved bundle {out}")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _open_sessions(settings: Settings) -> sessionmaker[Session]:
    return session_factory(open_store(settings.db_url))


@app.command("prepare")
def prepare_cmd(
    model: Annotated[Path, typer.Option(help="The suspect model's bundle (possibly a BadNet).")],
    valid: Annotated[
        str,
        typer.Option(
            help="Clean validation data spec; bare fashion-mnist means its 1,000-image valid split."
        ),
    ] = "fashion-mnist",
    ca_drop: Annotated[
        float, typer.Option(help="theta: the most clean accuracy, in points, the GoodNet may lose.")
    ] = PrepareConfig.ca_drop,
    epochs: Annotated[
        int, typer.Option(help="Retraining epochs per candidate.")
    ] = PrepareConfig.epochs,
    alphas: Annotated[
        str, typer.Option(help="Learning-rate multiples of the suspect's base rate.")
    ] = ",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
    gammas: Annotated[
        str, typer.Option(help="Noise fractions (of the 4x4 cells replaced).")
    ] = ",".join(f"{g:g}" for g in DEFAULT_GAMMAS),
    base_lr: Annotated[
        float | None,
        typer.Option(help="Base learning rate. Default: the one in the bundle's meta, else 1e-3."),
    ] = None,
    parallel: Annotated[
        bool | None,
        typer.Option(
            "--parallel/--sequential",
            help="Run candidates as Ray tasks. Default: when Ray starts and there are 2+ threads.",
        ),
    ] = None,
    distill: Annotated[
        float,
        typer.Option(
            help="Weight (0..1) of the suspect's own answers on the clean originals in every retraining target; 0 is the paper's plain labels."
        ),
    ] = PrepareConfig.distill,
    schedule: Annotated[
        str,
        typer.Option(
            help="Learning-rate schedule per candidate: cosine (decays to 0) or constant (the paper's)."
        ),
    ] = PrepareConfig.schedule,
    augment: Annotated[
        str, typer.Option(help="Batch jitter: shift, flip, both comma-separated, or none.")
    ] = ",".join(PrepareConfig.augment),
    margin_se: Annotated[
        float,
        typer.Option(
            help="A candidate qualifies when its CA drop plus this many standard errors is within theta; 0 is the paper's rule."
        ),
    ] = PrepareConfig.margin_se,
    folds: Annotated[
        int,
        typer.Option(
            help="Cross-fitting folds for each candidate's CA estimate; 1 is one 20% holdout."
        ),
    ] = PrepareConfig.folds,
    seed: Annotated[int, typer.Option()] = PrepareConfig.seed,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Make the GoodNet (NNoculation pre-deployment) and register, then activate, round 0."""
    settings = _settings(db, store)
    cfg = PrepareConfig(
        alphas=_floats(alphas, "--alphas"),
        gammas=_floats(gammas, "--gammas"),
        ca_drop=ca_drop,
        epochs=epochs,
        seed=seed,
        distill=distill,
        margin_se=margin_se,
        folds=folds,
        schedule=schedule,  # type: ignore[arg-type]  # validated below
        augment=tuple(a.strip() for a in augment.split(",") if a.strip() not in ("", "none")),
    )
    cfg.validate()
    suspect = load_bundle(model, trusted_modules=settings.trusted_arch_modules)
    data = _load(valid, settings, "valid")
    check_validation(suspect, data)
    sessions = _open_sessions(settings)
    use_ray = parallel if parallel is not None else settings.threads > 1
    runner = run_ray if use_ray and start_local_ray(settings.threads) else run_sequential
    if use_ray and runner is run_sequential:
        err_console.print("Ray could not start here; running the candidates in sequence")
    total = len(cfg.alphas) * len(cfg.gammas) * cfg.folds  # one run per candidate and fold
    with Progress(
        *Progress.get_default_columns(), MofNCompleteColumn(), console=err_console
    ) as bar:
        task = bar.add_task(f"GoodNet grid ({runner.__name__.removeprefix('run_')})", total=total)
        result, path = prepare_round_zero(
            suspect_dir=model,
            suspect=suspect,
            valid=data,
            cfg=cfg,
            sessions=sessions,
            store=settings.store,
            base_lr=base_lr,
            runner=runner,
            on_candidate=lambda c: bar.advance(task),
        )
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
        f"round 0 is active: badnet CA {100 * result.suspect_accuracy:.2f}%, goodnet CA {100 * sel.candidate.clean_accuracy:.2f}% "
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


def _repair_cfg(
    settings: Settings,
    preset: str | None,
    ca_drop: float | None,
    min_score: float | None = None,
    quarantine_views: int | None = None,
    pixel_curve: int | None = None,
    borderline: int | None = None,
) -> RepairConfig:
    cfg = repair_config(settings, preset=preset)
    if ca_drop is not None:
        cfg.ca_drop = ca_drop
    if min_score is not None:
        cfg.min_score = min_score
    if quarantine_views is not None:
        cfg.quarantine_views = quarantine_views
    if pixel_curve is not None:
        cfg.pixel_curve = pixel_curve
    if borderline is not None:
        cfg.borderline = borderline
    cfg.validate()
    return cfg


PresetOpt = Annotated[
    str | None,
    typer.Option(
        help="CycleGAN size: fast (default; a round in about a minute on 2 CPU cores), "
        "compact, small (larger; no better in docs/RESULTS.md), or paper (Appendix A.3, "
        "hours on a CPU). A stamped (patch) trigger trains no CycleGAN at all."
    ),
]


@app.command("retrain")
def retrain_cmd(
    round_no: Annotated[int, typer.Option("--round", help="The round to run now (1 or more).")],
    force: Annotated[
        bool,
        typer.Option(help="Run even with fewer pending samples than the threshold N."),
    ] = False,
    valid: Annotated[
        str | None,
        typer.Option(help="Clean validation data spec. Default: $BQG_VALID (fashion-mnist)."),
    ] = None,
    preset: PresetOpt = None,
    ca_drop: Annotated[
        float | None,
        typer.Option(
            help="The gate's theta: how many points the served clean accuracy may drop "
            "(default 3)."
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            help="Learn only from samples the suspect answers with at least this confidence "
            "(default $BQG_REPAIR_MIN_SCORE, 0.99; 0 keeps every sample, as the paper does)."
        ),
    ] = None,
    quarantine_views: Annotated[
        int | None,
        typer.Option(
            help="Fine-tune on this many views of each kept quarantined image, with targets "
            "that never name the trigger's label (default $BQG_REPAIR_QUARANTINE_VIEWS, 3; "
            "0 fine-tunes on treated validation images only, as the paper does)."
        ),
    ] = None,
    replay: Annotated[
        bool,
        typer.Option(
            help="Also treat with the triggers earlier rounds learned, so the repair keeps "
            "them out. --no-replay learns from this round's samples alone (and skips a round "
            "directory whose learned triggers cannot be read)."
        ),
    ] = True,
    transplant: Annotated[
        bool,
        typer.Option(
            help="When the kept samples share a stamped trigger (a patch in one place), "
            "treat with its real pixels in place of gen_ab's copies. --no-transplant "
            "treats it like a trigger without a stamp (see --pixel-curve)."
        ),
    ] = True,
    pixel_curve: Annotated[
        int | None,
        typer.Option(
            help="Treat a trigger without a stamp (blend, filter) with gen_ab's change "
            "fitted as a curve of this degree per pixel, which drops gen_ab's redrawing of "
            "each image (default $BQG_REPAIR_PIXEL_CURVE, 2; 0 treats with gen_ab's own "
            "copies, the paper's treatment)."
        ),
    ] = None,
    borderline: Annotated[
        int | None,
        typer.Option(
            help="Treat, once more with each new trigger, this many validation images of "
            "other classes that the active GoodNet finds nearest the trigger's target: the "
            "images a trigger tips over first (default $BQG_REPAIR_BORDERLINE, 200; 0: none, "
            "as the paper does)."
        ),
    ] = None,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run post-deployment repair round K now, from the pending quarantined samples."""
    settings = _settings(db, store)
    if valid:
        settings.valid = valid
    if round_no < 1:
        raise UserError(f"--round {round_no}: repair rounds are 1 or more (round 0 is 'prepare')")
    cfg = _repair_cfg(
        settings, preset, ca_drop, min_score, quarantine_views, pixel_curve, borderline
    )
    cfg.replay, cfg.transplant = replay, transplant
    sessions = _open_sessions(settings)
    with sessions() as session:
        if active_round_number(session=session) is None:
            raise UserError("no round is active; run 'trainer prepare' to make round 0 first")
        existing = {r.round: r.status for r in list_rounds(session=session)}
        pending = pending_count(session=session)
    if round_no in existing:
        raise UserError(
            f"round {round_no} already exists ({existing[round_no]}); the next free round is "
            f"{max(existing) + 1}"
        )
    if pending < settings.quarantine_threshold and not force:
        raise UserError(
            f"{pending} samples are pending, fewer than N = {settings.quarantine_threshold}; "
            "add --force to run anyway"
        )
    if pending == 0:
        raise UserError("no quarantined samples are pending; there is nothing to learn from")
    data = _load(settings.valid, settings, "valid")
    owner = f"trainer retrain ({getpass_user()})"
    lease = timedelta(seconds=settings.repair_lease_seconds)
    claimed = try_claim_round(sessions, owner=owner, lease=lease, round_no=round_no)
    if claimed is None:
        raise UserError("another round is running now (see 'trainer status'); try again after it")
    outcome = run_claimed_round(
        settings,
        sessions,
        round_no=round_no,
        owner=owner,
        cfg=cfg,
        valid=data,
        progress=lambda message: err_console.print(message, markup=False, highlight=False),
    )
    if outcome.status != "succeeded":
        raise SystemExit(1)


def getpass_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "operator"


@app.command("status")
def status_cmd(db: DbOpt = None, store: StoreOpt = None) -> None:
    """Show the rounds (status, samples, CA, duration, active) and the pending count."""
    settings = _settings(db, store)
    sessions = _open_sessions(settings)
    with sessions() as session:
        active = active_round_number(session=session)
        rounds = list_rounds(session=session)
        pending = pending_count(session=session)
    table = Table(title=f"Rounds in {safe_url(settings.db_url)}")
    for name in ("round", "status", "samples", "served CA", "duration", "active", "note"):
        table.add_column(name, justify="right" if name != "note" else "left")
    for r in rounds:
        ca = next(
            (
                r.metrics[k]
                for k in (
                    "clean_accuracy_served",
                    "clean_accuracy_goodnet",
                    "goodnet_clean_accuracy",
                )
                if k in r.metrics
            ),
            None,
        )
        seconds = (
            (r.finished_at - r.started_at).total_seconds()
            if r.finished_at and r.started_at
            else None
        )
        note = r.error or ("gate failed" if r.status == "rejected" else "")
        if r.status == "running":
            note = f"run by {r.owner or '?'}"
        table.add_row(
            str(r.round),
            r.status,
            str(r.samples_used),
            "" if ca is None else f"{100 * ca:.2f}%",
            "" if seconds is None else f"{seconds:.0f}s",
            "yes" if r.round == active else "",
            note[:80],
        )
    out_console.print(table)
    out_console.print(
        f"pending quarantined samples: {pending} (a round starts at N = {settings.quarantine_threshold})"
    )


@app.command("rollback")
def rollback_cmd(
    round_no: Annotated[int, typer.Option("--round", help="A succeeded round to serve again.")],
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Make round K active again; the gateway's replicas swap to it within seconds."""
    settings = _settings(db, store)
    sessions = _open_sessions(settings)
    with transaction(sessions) as session:
        activate_round(session=session, round_no=round_no, activated_by="trainer rollback")
    out_console.print(f"round {round_no} is active; replicas pick it up on their next poll")


@app.command("watch")
def watch_cmd(
    threshold: Annotated[
        int | None,
        typer.Option(
            "--threshold", help="N: pending samples that start a round. Default: settings (200)."
        ),
    ] = None,
    preset: PresetOpt = None,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run the repair watcher in the foreground until Ctrl-C (rounds run as Ray tasks)."""
    import logging
    import signal

    settings = _settings(db, store)
    if threshold is not None:
        if threshold < 1:
            raise UserError(f"--threshold {threshold}: N must be at least 1")
        settings.quarantine_threshold = threshold
    cfg = _repair_cfg(settings, preset, None)
    _open_sessions(settings)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    use_ray = start_local_ray(settings.threads)
    watcher = Watcher(settings, cfg, use_ray=use_ray)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    port = settings.watcher_metrics_port
    err_console.print(
        f"watching {safe_url(settings.db_url)}: a round starts at {settings.quarantine_threshold} "
        f"pending samples{'' if use_ray else ' (in process: Ray did not start)'}"
        + (f"; metrics at http://127.0.0.1:{port}/metrics" if port else "")
    )
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.stop()


def main() -> None:
    """Console-script entry: user errors become one line and exit status 2."""
    try:
        app()
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
