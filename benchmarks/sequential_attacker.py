"""The sequential attacker (NNoculation §4.2.3, Table 8; issue 6) on the multi-target BadNet.

    python -m benchmarks.sequential_attacker [--zoo var/zoo] [--attack multi-target]

The zoo's multi-target BadNet has three triggers, each with its own target. The attacker
uses two of them first, and the third only after the defender has repaired the first two:
1. Round 0: ``prepare`` with its defaults.
2. Phase 1: the first half of the stream split, 10% of it triggered with triggers 1 and 2 in
   turn, through the gateway's ensemble code; its first 200 distinct disagreements go into
   the store. Round 1 (``run_repair_round``, what the watcher runs) repairs from them.
3. Phase 2: the second half, then the whole stream split again (an attacker re-sends), 10%
   triggered with trigger 3 only, served by round 1's pair; its first 200 distinct
   disagreements go into the store, and round 2 repairs from them. (The second half alone
   gave 93: round 1's pair disagrees on fewer of trigger 3's images than round 0's did.)
ASR per trigger and CA on the held-out split after each stage. The gateway answers with the
GoodNet's label whenever the models disagree, so the GoodNet's rates are the gateway's.
Goal: after round 1, ASR <= 3% for triggers 1 and 2; after round 2, for all three; and a CA
drop <= 3 points against the BadNet.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.repair_round import ASR_MAX, CA_DROP_MAX, collect, gate, stamp, store_quarantine
from benchmarks.results import (
    RESULTS_DIR,
    checks_line,
    defender_data,
    provenance,
    publish,
    trigger_images,
)
from core.bundle import Bundle, load_bundle
from core.db import open_store, session_factory
from core.pair import load_pair
from core.quarantine import active_round
from trainer.attacks.poison import (
    Attack,
    attack_success_rates,
    clean_target_rates,
    target_rates_by_class,
)
from trainer.data import Dataset
from trainer.lab import attack_of
from trainer.loop import accuracy
from trainer.prepare import PrepareConfig, prepare_round_zero
from trainer.repair import RepairConfig, confident_mask, run_repair_round

NAME = "sequential_attacker"


def _stage(stage: str, bundle: Bundle, heldout: Dataset, attack: Attack) -> dict[str, Any]:
    rates = attack_success_rates(bundle.predict, heldout, attack)
    floor = clean_target_rates(bundle.predict, heldout, attack)
    ca = accuracy(bundle.model, heldout.x, heldout.y, bundle.manifest.input)
    print(stage, f"CA {100 * ca:.2f}", {k: round(100 * v, 2) for k, v in rates.items()}, flush=True)
    return {"stage": stage, "ca": ca, "asr": rates, "clean_target": floor}


def _residual(bundle: Bundle, heldout: Dataset, attack: Attack, stage: dict[str, Any]) -> dict:
    """Per true class, for each trigger the stage leaves above ASR_MAX: which classes the
    trigger still moves to its target, beside how often they get that label clean."""
    return {
        g.name: target_rates_by_class(
            bundle.predict, heldout, g, num_classes=attack.num_classes, seed=attack.seed
        )
        for g in attack.firing
        if stage["asr"][g.name] > ASR_MAX
    }


def run(zoo_dir: Path) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    attack = attack_of(zoo_dir)
    if attack is None or len(attack.firing) < 3:
        raise SystemExit(f"{zoo_dir} is not a BadNet with three triggers")
    n = len(data["stream"])
    half = n // 2
    phases = [
        ("round 1", data["stream"].take(slice(0, half)), attack.firing[:2]),
        # round 1 removes most of what it serves, so the second half alone fills about 90:
        # the attacker goes on re-sending the stream split, until N = 200 as in round 1
        ("round 2", data["stream"].take(np.r_[half:n, 0:n]), attack.firing[2:3]),
    ]
    cfg = RepairConfig()
    suspect = load_bundle(zoo_dir)
    stages = [_stage("BadNet", suspect, data["heldout"], attack)]
    rounds: list[dict[str, Any]] = []
    residual: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
        prepare_round_zero(
            suspect_dir=zoo_dir,
            suspect=load_bundle(zoo_dir),
            valid=data["valid"],
            cfg=PrepareConfig(),
            sessions=sessions,
            store=store,
        )
        for round_no, (label, stream, groups) in enumerate(phases, start=1):
            with sessions() as s:
                info = active_round(session=s)
                assert info is not None
                pair = load_pair(info)
            if round_no == 1:
                stages.append(
                    _stage("round 0 GoodNet", pair.member("goodnet"), data["heldout"], attack)
                )
            q = collect(pair, stream, groups, seed=round_no)
            kept = confident_mask(suspect, q["images"], cfg.min_score)  # as the round filters
            store_quarantine(sessions, q)
            start = time.perf_counter()
            outcome = run_repair_round(
                sessions=sessions,
                store=store,
                round_no=round_no,
                valid=data["valid"],
                cfg=cfg,
                progress=lambda m: print(m, flush=True),
            )
            row: dict[str, Any] = {
                "round": round_no,
                "triggers_streamed": [g.name for g in groups],
                "quarantined": len(q["images"]),
                "quarantine_precision": q["precision"],
                "kept": int(kept.sum()),
                "kept_precision": float(q["poisoned"][kept].mean()) if kept.any() else 0.0,
                "requests": q["requests_until_full"],
                "status": outcome.status,
                "round_seconds": time.perf_counter() - start,
                # this round's own stamps; the replayed triggers' come first
                "stamp_pixels": outcome.metrics["stamp_pixels"][
                    len(outcome.metrics["replayed_triggers"]) :
                ],
                "gate": outcome.metrics.get("gate"),
            }
            rounds.append(row)
            if outcome.path is None:
                print(f"{label} was {outcome.status}: {outcome.metrics.get('gate')}", flush=True)
                break
            for role in ("goodnet", "badnet"):
                member = load_bundle(outcome.path / role)
                stage = _stage(
                    f"{label} {'GoodNet' if role == 'goodnet' else 'BadNet member'}",
                    member,
                    data["heldout"],
                    attack,
                )
                stages.append(stage)
                if role == "goodnet":  # the last round's is the one reported
                    residual = {"stage": stage["stage"]} | _residual(
                        member, data["heldout"], attack, stage
                    )
            png = RESULTS_DIR / f"{NAME}_round{round_no}_trigger.png"
            shutil.copy(outcome.path / "trigger.png", png)
            row["trigger_png"] = png.name
    names = [g.name for g in attack.firing]
    by_stage = {s["stage"]: s for s in stages}
    badnet_ca = by_stage["BadNet"]["ca"]
    r1, r2 = by_stage.get("round 1 GoodNet"), by_stage.get("round 2 GoodNet")
    return {
        "provenance": started,
        "threads": threads,
        "attack": zoo_dir.name,
        "triggers": names,
        "class_names": list(data["heldout"].class_names),
        "repair": {k: v for k, v in cfg.to_dict().items() if k != "cyclegan"},
        "cyclegan": cfg.cyclegan.to_dict(),
        "stages": stages,
        "rounds": rounds,
        "residual": residual,
        "checks": {
            "round1_removes_streamed_triggers": r1 is not None
            and all(r1["asr"][n] <= ASR_MAX for n in names[:2]),
            "round2_removes_all_three": r2 is not None
            and all(r2["asr"][n] <= ASR_MAX for n in names),
            "ca_within_3_points": r2 is not None and 100 * (badnet_ca - r2["ca"]) <= CA_DROP_MAX,
        },
    }


def render(data: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    names = data["triggers"]
    lines = [
        "## The sequential attacker (issue 6; NNoculation Table 8)",
        "",
        f"The {data['attack']} BadNet: three triggers with three targets. Round 0 from `prepare` (default grid). "
        "Phase 1 streams the first half of the stream split with 10% of it triggered by "
        f"{' and '.join(names[:2])}; round 1 repairs from its first 200 distinct disagreements. Phase 2 streams the "
        f"second half and then the whole stream split again, with 10% triggered by {names[2]} only, served by round 1; "
        "round 2 repairs from its first 200 distinct disagreements. "
        "CA and ASR on the 5,000-image held-out split; the GoodNet rows are the gateway's answers. "
        "In brackets, each model's clean target rate: how often it gives the trigger's target to the same "
        "images without the trigger, the floor no repair of the backdoor lowers.",
        "",
        "| stage | CA % | " + " | ".join(f"ASR {n} % (clean)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for s in data["stages"]:
        lines.append(
            f"| {s['stage']} | {pct(s['ca'])} | "
            + " | ".join(f"{pct(s['asr'][n])} ({pct(s['clean_target'][n])})" for n in names)
            + " |"
        )
    lines += [
        "",
        "| round | triggers streamed | requests | quarantined (precision %) | kept (precision %) | stamps found (px) | gate: served CA % before -> after | status | round s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rounds"]:
        lines.append(
            f"| {r['round']} | {', '.join(r['triggers_streamed'])} | {r['requests']} | "
            f"{r['quarantined']} ({pct(r['quarantine_precision'])}) | {r['kept']} ({pct(r['kept_precision'])}) | "
            f"{stamp(r)} | {gate(r)} | {r['status']} | {r['round_seconds']:.0f} |"
        )
    lines += _render_residual(data)
    lines += [
        "",
        checks_line(data["checks"]),
        "",
    ]
    lines += trigger_images(data["rounds"], lambda r: f"round {r['round']} trigger")
    return "\n".join(lines)


def _render_residual(data: dict[str, Any]) -> list[str]:
    """Per true class, the triggers the last GoodNet leaves above the goal (none: nothing)."""
    groups = {k: v for k, v in data.get("residual", {}).items() if k != "stage"}
    lines = []
    for name, by_class in groups.items():
        lines += [
            "",
            f"Where {name} still works on the {data['residual']['stage']}: per true class, the share "
            f"labelled with {name}'s target clean and triggered.",
            "",
            "| true class | images | clean % | triggered % | images moved by the trigger |",
            "|---|---|---|---|---|",
        ]
        for c, (n, clean, hit) in sorted(by_class.items(), key=lambda kv: -(kv[1][2] - kv[1][1])):
            label = f"{c} {data['class_names'][int(c)]}" if "class_names" in data else c
            lines.append(
                f"| {label} | {n} | {100 * clean:.1f} | {100 * hit:.1f} | {round(n * (hit - clean))} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attack", default="multi-target")
    args = parser.parse_args()
    data = run(args.zoo / args.attack)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
