"""The generic repair round: claim -> repair -> gate -> publish, for every repairer.

The lease, the gate and publication are written once here; a defense's repairer
(``trainer.defenses.REPAIRERS``) only turns the round's context into new models.

1. Refuse bad input before the round exists: a config that does not validate, no active
   round, validation data of the wrong shape, too few pending or kept samples, a repairer
   whose own inputs are unreadable. (A round the watcher already claimed is failed instead.)
2. Keep the pending samples the original suspect is confident on (``selection``).
3. The repairer makes the new members from the active pair, the kept samples and the clean
   validation data less the gate split.
4. The gate (``gate``): the served clean accuracy on the gate split, overall and per
   class, against the round it replaces and against round 0. A failed gate marks the
   round ``rejected``, sets its samples aside (consumed by the rejected round, so the
   same flood cannot retry forever) and activates nothing.
5. Save the bundles and the round's manifest (its defense), register them, activate the
   round and mark its samples consumed, in one transaction. A crash marks it ``failed``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle, save_bundle
from core.db import transaction
from core.defenses import load_defense_modules, with_policy
from core.errors import DataError, UserError
from core.pair import ModelPair, load_pair
from core.quarantine import active_round, finish_round, mark_consumed
from trainer.data import Dataset
from trainer.loop import accuracy
from trainer.repair.base import Progress, Repaired, Repairer, RoundContext
from trainer.repair.config import RepairConfig
from trainer.repair.gate import gate_round
from trainer.repair.selection import (
    confident,
    load_origin,
    pending_quarantine,
    strip_kept,
    suspect_of,
)
from trainer.rounds import mark_failed, publish_round, running_round
from trainer.splits import check_validation, gate_split, split_record


@dataclass
class RepairOutcome:
    round: int
    # succeeded, awaiting_approval or rejected (a crash raises; benchmarks add "refused")
    status: str
    metrics: dict[str, Any]
    path: Path | None  # the round directory, when it succeeded


@dataclass
class _Setup:
    pair: ModelPair
    ids: list[int]
    pending: np.ndarray
    suspect: Bundle
    kept: np.ndarray
    repairer: Repairer
    origin: ModelPair | None  # round 0, the gate's second reference (None: no files)


def _setup(
    sessions: sessionmaker[Session],
    valid: Dataset,
    cfg: RepairConfig,
    trusted_modules: tuple[str, ...],
    make_repairer: Callable[[str, RepairConfig], Repairer],
) -> _Setup:
    """Step 1 and 2: everything read and checked before the round opens."""
    cfg.validate()
    with sessions() as session:
        info = active_round(session=session)
    if info is None:
        raise UserError("no round is active; run 'trainer prepare' to make round 0 first")
    pair = with_policy(load_pair(info, trusted_modules=trusted_modules))  # as replicas do
    check_validation(pair.badnet, valid)
    ids, pending, entropy = pending_quarantine(sessions, cfg, pair.shape)
    origin = load_origin(sessions, pair, trusted_modules)  # read once: suspect and gate
    suspect = suspect_of(pair, origin)
    kept = confident(suspect, pending[strip_kept(pair, entropy, cfg)], cfg)
    repairer = make_repairer(pair.defense.name, cfg)
    repairer.check(pair, sessions)
    return _Setup(pair, ids, pending, suspect, kept, repairer, origin)


def _gate_split_note(pair: ModelPair, gate: Dataset, cfg: RepairConfig, round_no: int) -> str:
    """Why the gate may be stricter than theta, when round K's GoodNet trained on the split
    (prepared before the split was reserved, or on other data); '' when it did not."""
    if pair.goodnet is None and pair.round == 0:
        return ""  # the suspect as given: it never trained on the defender's data
    reserved = split_record(gate, cfg.gate_fraction)
    if pair.member(pair.roles[-1]).manifest.meta.get("gate_split") == reserved:
        return ""
    return (
        f"round {round_no}: round {pair.round}'s {pair.roles[-1]} does not name this gate split "
        f"({len(gate)} validation images) as held out of its training (prepared before the "
        "split was reserved, or on other data), so its accuracy there may be optimistic and "
        f"the gate stricter than {cfg.ca_drop:g} points"
    )


def _default_repairer(defense: str, cfg: RepairConfig) -> Repairer:
    from trainer.defenses import make_repairer

    return make_repairer(defense, cfg)


def run_repair_round(
    *,
    sessions: sessionmaker[Session],
    store: Path,
    round_no: int,
    valid: Dataset,
    cfg: RepairConfig,
    trusted_modules: tuple[str, ...] = (),
    owner: str | None = None,
    opened: bool = False,
    progress: Progress = lambda message: None,
    make_repairer: Callable[[str, RepairConfig], Repairer] = _default_repairer,
    approval: str = "auto",
) -> RepairOutcome:
    """Run round ``round_no`` (opened here unless the caller ``opened`` it) to its end, with
    the repairer of the active round's defense; with ``approval`` 'manual' a round that
    passes its gate waits for 'trainer approve' instead of serving."""
    start = time.perf_counter()
    try:  # refuse bad input before the round exists (a claimed round is failed instead)
        setup = _setup(sessions, valid, cfg, trusted_modules, make_repairer)
    except BaseException as exc:
        if opened:
            mark_failed(sessions, round_no, f"{type(exc).__name__}: {exc}")
        raise
    with running_round(sessions, round_no, owner=owner, opened=opened):
        pair = setup.pair
        train, gate = gate_split(valid, cfg.gate_fraction)
        note = _gate_split_note(pair, gate, cfg, round_no)
        if note:
            progress(note)
        progress(
            f"round {round_no}: {len(setup.kept)} of {len(setup.pending)} quarantined images "
            f"kept (suspect confidence >= {cfg.min_score:g})"
        )
        ctx = RoundContext(round_no, pair, setup.suspect, setup.kept, train, gate, cfg, progress)
        repaired = setup.repairer.repair(ctx)
        metrics = _round_metrics(setup, ctx, repaired, held_out=not note)
        if not metrics["gate_passed"]:
            return _reject(sessions, ctx, metrics, start, setup.ids)
        metrics["seconds"] = time.perf_counter() - start
        manual = approval == "manual"
        path = publish_round(
            sessions=sessions,
            store=store,
            round_no=round_no,
            write=lambda out: _write(out, ctx, repaired, metrics, held_out=not note),
            metrics=metrics,
            samples_used=len(setup.ids),
            activated_by=owner or "trainer",
            after_register=lambda session: consume(session, setup.ids, round_no),
            defense=pair.defense,
            activate=not manual,
            status="awaiting_approval" if manual else "succeeded",
        )
        members = metrics["members"]
        state = (
            f"awaits approval ('trainer approve --round {round_no}'; round {pair.round} serves)"
            if manual
            else "is active"
        )
        each = ", ".join(f"{role} {100 * m['after']:.2f}%" for role, m in members.items())
        progress(
            f"round {round_no} {state}: served CA "
            f"{100 * metrics['clean_accuracy_served']:.2f}% ({each}) on the gate split, "
            f"{len(setup.ids)} samples, {metrics['seconds']:.0f}s"
        )
        return RepairOutcome(
            round_no, "awaiting_approval" if manual else "succeeded", metrics, path
        )


def _round_metrics(
    setup: _Setup, ctx: RoundContext, repaired: Repaired, *, held_out: bool
) -> dict[str, Any]:
    """The gate's verdict and each member's gate accuracy, before the repairer's metrics."""
    pair, gate, spec = ctx.pair, ctx.gate, ctx.pair.badnet.manifest.input
    before = {role: pair.member(role).model for role in pair.roles}
    assert pair.policy is not None  # with_policy resolved it
    origin = None
    if setup.origin is not None and setup.origin.roles == pair.roles:
        origin = {r: setup.origin.member(r).model for r in pair.roles}
    gate_metrics, passed = gate_round(
        before, repaired.models, gate, spec, ctx.cfg, pair.policy, pair.defense.params, origin
    )

    members = {
        role: {
            "before": accuracy(before[role], gate.x, gate.y, spec),
            "after": accuracy(repaired.models[role], gate.x, gate.y, spec),
        }
        for role in pair.roles
    }
    metrics = {
        "defense": pair.defense.name,
        "base_round": pair.round,
        "samples": len(setup.ids),
        "samples_kept": len(setup.kept),
        "gate": gate_metrics,
        "gate_passed": passed,
        "gate_held_out": held_out,
        "members": members,
        "clean_accuracy_served": gate_metrics["served clean accuracy"]["after"],
    }
    if "goodnet" in members:
        metrics["clean_accuracy_goodnet"] = members["goodnet"]["after"]
    if getattr(pair.policy, "note", ""):  # shown by 'trainer status'
        metrics["note"] = pair.policy.note  # type: ignore[attr-defined]
    _merge(metrics, repaired.metrics)
    return metrics


def _merge(metrics: dict[str, Any], more: dict[str, Any]) -> None:
    """Add a repairer's metrics; it may not overwrite the runner's (the gate's verdict)."""
    clash = sorted(set(metrics) & set(more))
    if clash:
        raise ValueError(f"the repairer's metrics {clash} would overwrite the round's own")
    metrics.update(more)


def _reject(
    sessions: sessionmaker[Session],
    ctx: RoundContext,
    metrics: dict[str, Any],
    start: float,
    ids: list[int],
) -> RepairOutcome:
    """Fail the gate: the round's samples are set aside with it, nothing is activated."""
    metrics["seconds"] = time.perf_counter() - start
    with transaction(sessions) as session:
        consume(session, ids, ctx.round_no)
        finish_round(
            session=session,
            round_no=ctx.round_no,
            status="rejected",
            samples_used=len(ids),
            metrics=metrics,
        )
    ctx.progress(
        f"round {ctx.round_no} rejected by its gate on the gate split: "
        f"{'; '.join(metrics['gate']['failures'])}. Round {ctx.pair.round} keeps serving; "
        f"its {len(ids)} samples are set aside"
    )
    return RepairOutcome(ctx.round_no, "rejected", metrics, None)


def _write(
    out: Path, ctx: RoundContext, repaired: Repaired, metrics: dict[str, Any], *, held_out: bool
) -> None:
    """The round directory: both bundles, the repairer's files, and report.json."""
    reserved = split_record(ctx.gate, ctx.cfg.gate_fraction)
    for role in ctx.pair.roles:
        m = ctx.pair.member(role).manifest
        save_bundle(
            repaired.models[role],
            out / role,
            arch=m.arch,
            arch_kwargs=m.arch_kwargs,
            class_names=m.class_names,
            input_spec=m.input,
            meta={
                "role": role,
                "round": ctx.round_no,
                "created_by": "trainer repair",
                "created_at": datetime.now(UTC).isoformat(),
                "base_round": ctx.pair.round,
                "metrics": {"clean_accuracy_gate": metrics["members"][role]["after"]},
                # held out of its whole lineage's training, or not known to be
                "gate_split": reserved if held_out else None,
            },
        )
    _merge(metrics, repaired.write(out))  # e.g. the learned triggers' digest, registered
    (out / "report.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def consume(session: Session, ids: list[int], round_no: int) -> None:
    """Mark the round's samples consumed; all of them must still be pending."""
    marked = mark_consumed(session=session, sample_ids=ids, round_no=round_no)
    if marked != len(ids):
        raise DataError(
            f"{len(ids) - marked} of round {round_no}'s samples were consumed meanwhile "
            "by another round; nothing was activated"
        )


def run_claimed_round(
    settings: Any,
    sessions: sessionmaker[Session],
    *,
    round_no: int,
    owner: str,
    cfg: RepairConfig,
    valid: Dataset,
    progress: Progress,
) -> RepairOutcome:
    """A round ``owner`` has claimed in the store, with the store, trust and defense modules
    of ``settings``."""
    load_defense_modules(settings.defense_modules)
    return run_repair_round(
        sessions=sessions,
        store=settings.store,
        round_no=round_no,
        valid=valid,
        cfg=cfg,
        trusted_modules=tuple(settings.trusted_arch_modules),
        owner=owner,
        opened=True,
        progress=progress,
        approval=settings.repair_approval,
    )
