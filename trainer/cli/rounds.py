"""``trainer retrain``, ``watch``, ``status`` and ``rollback``: the repair rounds."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from core.db import db_now, safe_url, transaction
from core.defenses import defense_names, get_defense
from core.errors import UserError
from core.leases import retry_at, try_claim_round
from core.quarantine import (
    activate_round,
    active_round_number,
    decide_approval,
    list_rounds,
    pending_count,
)
from core.schema import RepairRound
from core.settings import Settings
from trainer.cli.common import (
    DbOpt,
    StoreOpt,
    _load,
    _open_sessions,
    _settings,
    app,
    err_console,
    getpass_user,
    out_console,
)
from trainer.grid import start_local_ray
from trainer.lease import LeaseKeeper, LeaseLost
from trainer.options import config_options
from trainer.repair import RepairConfig, load_repair_config, run_claimed_round, with_preset
from trainer.watcher import Watcher

PresetOpt = Annotated[
    str | None,
    typer.Option(
        help="CycleGAN size: fast (default; a round in about a minute on 2 CPU cores), "
        "compact, small (larger; no better in docs/RESULTS.md), or paper (Appendix A.3, "
        "hours on a CPU). A stamped (patch) trigger trains no CycleGAN at all."
    ),
]


def repair_cfg(settings: Settings, preset: str | None, overrides: dict[str, Any]) -> RepairConfig:
    """The round's run: $BQG_REPAIR_CONFIG's file (or the defaults), then the options given."""
    base = load_repair_config(settings.repair_config)
    cfg = with_preset(replace(base, **overrides), preset)
    cfg.validate()
    return cfg


@app.command("retrain")
@config_options(RepairConfig)
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
    db: DbOpt = None,
    store: StoreOpt = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Run post-deployment repair round K now, from the pending quarantined samples."""
    settings = _settings(db, store)
    if valid:
        settings.valid = valid
    if round_no < 1:
        raise UserError(f"--round {round_no}: repair rounds are 1 or more (round 0 is 'prepare')")
    cfg = repair_cfg(settings, preset, overrides or {})
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

    def progress(message: str) -> None:
        keeper.check()  # a lost lease stops the work at the next step
        err_console.print(message, markup=False, highlight=False)

    with LeaseKeeper(
        sessions, round_no=round_no, owner=owner, lease_seconds=settings.repair_lease_seconds
    ) as keeper:
        try:
            outcome = run_claimed_round(
                settings,
                sessions,
                round_no=round_no,
                owner=owner,
                cfg=cfg,
                valid=data,
                progress=progress,
            )
        except LeaseLost as exc:
            raise UserError(f"{exc} (see 'trainer status')") from None
    if outcome.status not in ("succeeded", "awaiting_approval"):
        raise SystemExit(1)


@app.command("status")
def status_cmd(db: DbOpt = None, store: StoreOpt = None) -> None:
    """Show the rounds (status, samples, CA, duration, active) and the pending count."""
    settings = _settings(db, store)
    sessions = _open_sessions(settings)
    with sessions() as session:
        active = active_round_number(session=session)
        rounds = list_rounds(session=session)
        pending = pending_count(session=session)
        not_before = retry_at(session=session, base_seconds=settings.repair_retry_seconds)
        waiting = not_before is not None and db_now(session) < not_before
    table = Table(title=f"Rounds in {safe_url(settings.db_url)}")
    for name in ("round", "status", "samples", "served CA", "duration", "active", "note"):
        note = name == "note"  # the one column that may wrap; the others read whole
        table.add_column(
            name, justify="left" if note else "right", no_wrap=not note, overflow="fold"
        )
    for r in rounds:
        table.add_row(*_round_row(r, active))
    out_console.print(table)
    out_console.print(
        f"pending quarantined samples: {pending} (a round starts at N = {settings.quarantine_threshold})"
    )
    for r in rounds:
        if r.status == "awaiting_approval":
            out_console.print(
                f"round {r.round} awaits approval: trainer approve --round {r.round} "
                "(or --decline)"
            )
    if waiting and not_before is not None:
        out_console.print(
            f"after rejected or failed rounds, the watcher starts none before "
            f"{not_before:%Y-%m-%d %H:%M:%S} UTC ('trainer retrain' may run one now)"
        )


CA_KEYS = (
    "clean_accuracy_served",
    "clean_accuracy_goodnet",
    "goodnet_clean_accuracy",
    "clean_accuracy_badnet",  # a single-model round 0 (codefend): the suspect on the gate split
)


def _round_row(r: RepairRound, active: int | None) -> tuple[str, ...]:
    """One row of 'trainer status': the round's numbers and a note on what it waits for."""
    ca = next((r.metrics[k] for k in CA_KEYS if k in r.metrics), None)
    seconds = (
        (r.finished_at - r.started_at).total_seconds() if r.finished_at and r.started_at else None
    )
    failures = r.metrics.get("gate", {}).get("failures") if r.status == "rejected" else None
    note = (
        r.error
        or ("; ".join(failures) if failures else "")
        or ("gate failed" if r.status == "rejected" else "")
    )
    if r.metrics.get("note"):  # e.g. a targeted BBD round that runs untargeted
        note = f"{note}; {r.metrics['note']}" if note else r.metrics["note"]
    if r.status == "running":
        note = f"run by {r.owner or '?'}"
    elif r.status == "awaiting_approval":
        note = "passed its gate; an operator decides"
    return (
        str(r.round),
        r.status,
        str(r.samples_used),
        "" if ca is None else f"{100 * ca:.2f}%",
        "" if seconds is None else f"{seconds:.0f}s",
        "yes" if r.round == active else "",
        note[:160],
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


@app.command("approve")
def approve_cmd(
    round_no: Annotated[
        int, typer.Option("--round", help="A round awaiting approval (see 'trainer status').")
    ],
    decline: Annotated[
        bool, typer.Option("--decline", help="Reject it instead; its samples stay set aside.")
    ] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Approve round K (it becomes active) or decline it, under BQG_REPAIR_APPROVAL=manual."""
    settings = _settings(db, store)
    sessions = _open_sessions(settings)
    by = f"trainer approve ({getpass_user()})"
    with transaction(sessions) as session:
        decide_approval(session=session, round_no=round_no, approve=not decline, by=by)
    if decline:
        out_console.print(f"round {round_no} is declined (rejected); the active round serves on")
    else:
        out_console.print(
            f"round {round_no} is approved and active; replicas pick it up on their next poll"
        )


@app.command("watch")
@config_options(RepairConfig)
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
    overrides: dict[str, Any] | None = None,
) -> None:
    """Run the repair watcher in the foreground until Ctrl-C (rounds run as Ray tasks)."""
    import logging
    import signal

    settings = _settings(db, store)
    if threshold is not None:
        if threshold < 1:
            raise UserError(f"--threshold {threshold}: N must be at least 1")
        settings.quarantine_threshold = threshold
    cfg = repair_cfg(settings, preset, overrides or {})
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


@app.command("defenses")
def defenses_cmd() -> None:
    """List the registered defenses: each a pre-deployment step, a policy and a repairer."""
    table = Table(title="defenses ('trainer prepare --defense NAME')")
    for column in ("name", "pre-deployment", "policy", "repairer", "what it does"):
        table.add_column(column)
    for name in defense_names():
        d = get_defense(name)
        policy = str(getattr(d.policy, "name", d.policy.__name__))
        table.add_row(name, d.prepare or "-", policy, d.repair or "-", d.summary)
    out_console.print(table)
