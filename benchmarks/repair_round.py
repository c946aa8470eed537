"""One post-deployment repair round per BadNet (issue 6; NNoculation Table 5's last stage).

    python -m benchmarks.repair_round [--zoo var/zoo] [--attacks patch blend all-to-all filter multi-trigger]
                                      [--preset fast] [--epochs E] [--quick-prepare]

For each BadNet of the zoo (``python -m benchmarks.badnet_zoo``):
1. Round 0: ``prepare`` with its defaults (the full grid, about 3 minutes an attack), as a
   user runs it; ``--quick-prepare`` takes one candidate (alpha 2, gamma 0.3) instead.
2. The quarantine: the Fashion-MNIST stream split with 10% triggered inputs, decided by the
   gateway's own ensemble code (``decide_batch``, GoodNet policy); its first 200 distinct
   disagreements go into the store, as the gateway's writer would put them.
3. ``run_repair_round`` (the code the watcher runs), timed. It keeps the samples the suspect
   answers with confidence >= 0.99 (``RepairConfig.min_score``); both precisions are given.
4. CA and ASR on the held-out split of the BadNet, round 0 and round 1. The gateway answers
   with the GoodNet's label whenever the two disagree, so its answers are the GoodNet's.
Goal: ASR <= 3% and CA within 3 points of the BadNet after the round; <= 15 minutes a round.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results import (
    RESULTS_DIR,
    checks_line,
    defender_data,
    provenance,
    publish,
    trigger_images,
)
from core.bundle import load_bundle
from core.db import open_store, session_factory, transaction
from core.defenses import decide_batch
from core.defenses.nnoculation import GoodNetPolicy
from core.errors import UserError
from core.pair import load_pair
from core.quarantine import NewSample, active_round, add_samples
from trainer.attacks.poison import (
    TriggerGroup,
    attacker_stream,
    clean_target_rate,
    firing_success_rate,
)
from trainer.cyclegan import DEFAULT_PRESET, PRESETS
from trainer.data import Dataset
from trainer.lab import attack_of
from trainer.loop import accuracy
from trainer.prepare import PrepareConfig, prepare_round_zero
from trainer.repair import (
    RepairConfig,
    RepairOutcome,
    confident_mask,
    describe_gate,
    run_repair_round,
)

NAME = "repair_round"
DEFAULT_ATTACKS = [
    "patch",
    "blend",
    "all-to-all",
    "filter",
    "multi-trigger",
]  # the issue's four, and three stamps on one target
ASR_MAX, CA_DROP_MAX, SECONDS_MAX = 0.03, 3.0, 900.0
QUARANTINE = 200


def _rates(bundle: Any, heldout: Dataset, zoo_dir: Path) -> tuple[float, float, float]:
    """CA, ASR, and the rate at which the model answers the target with no trigger
    (``clean_target_rate``: the part of the ASR that is clean error)."""
    attack = attack_of(zoo_dir)
    assert attack is not None
    asr = firing_success_rate(bundle.predict, heldout, attack)
    floor = clean_target_rate(bundle.predict, heldout, attack)
    return accuracy(bundle.model, heldout.x, heldout.y, bundle.manifest.input), asr, floor


def collect(
    pair: Any, stream: Dataset, firing: Sequence[TriggerGroup], seed: int = 0
) -> dict[str, Any]:
    """Stream with 10% triggered inputs (the ``firing`` groups in turn) through the ensemble.

    The first 200 distinct disagreements, as the gateway's writer would store them.
    """
    x, poisoned = attacker_stream(stream.x, firing, 0.10, seed)
    decisions = decide_batch(pair, x, GoodNetPolicy())
    flagged = [i for i, d in enumerate(decisions) if d.suspect]
    seen: set[bytes] = set()
    chosen: list[int] = []
    for i in flagged:
        key = x[i].tobytes()
        if key not in seen:
            seen.add(key)
            chosen.append(i)
        if len(chosen) == QUARANTINE:
            break
    last = chosen[-1] if chosen else 0
    return {
        "images": x[chosen],
        "decisions": [decisions[i] for i in chosen],
        "requests_until_full": last + 1,
        "poisoned": poisoned[chosen],
        "precision": float(poisoned[chosen].mean()) if chosen else 0.0,
        "recall": float(np.isin(np.flatnonzero(poisoned[: last + 1]), flagged).mean()),
    }


def store_quarantine(sessions: Any, q: dict[str, Any]) -> None:
    """Put ``collect``'s disagreements into the store as the gateway's writer would."""
    with transaction(sessions) as s:
        add_samples(
            session=s,
            samples=[
                NewSample.from_image(
                    img,
                    badnet_label=d.badnet_label,
                    goodnet_label=d.goodnet_label,
                    badnet_score=d.badnet_score,
                    goodnet_score=d.goodnet_score,
                    served_round=d.round,
                    detector="disagreement",
                )
                for img, d in zip(q["images"], q["decisions"], strict=True)
            ],
        )


ONE_CANDIDATE = PrepareConfig(alphas=(2.0,), gammas=(0.3,), ca_drop=100.0)


def round_zero_and_quarantine(
    zoo_dir: Path, data: dict[str, Dataset], prep: PrepareConfig, store: Path
) -> tuple[Any, Any, dict[str, Any]]:
    """Round 0 from ``prepare`` in ``store`` (SQLite ``q.db``), then ``collect``'s quarantine
    stored as the gateway's writer would: (sessions, round 0's pair, the quarantine)."""
    sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
    prepare_round_zero(
        suspect_dir=zoo_dir,
        suspect=load_bundle(zoo_dir),
        valid=data["valid"],
        cfg=prep,
        sessions=sessions,
        store=store,
    )
    with sessions() as s:
        info = active_round(session=s)
        assert info is not None
        pair = load_pair(info)
    attack = attack_of(zoo_dir)
    assert attack is not None
    q = collect(pair, data["stream"], attack.firing)
    store_quarantine(sessions, q)
    return sessions, pair, q


def one_attack(
    name: str, zoo: Path, data: dict[str, Dataset], cfg: RepairConfig, prep: PrepareConfig
) -> dict[str, Any]:
    zoo_dir = zoo / name
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        sessions, pair, q = round_zero_and_quarantine(zoo_dir, data, prep, store)
        kept = confident_mask(pair.badnet, q["images"], cfg.min_score)
        start = time.perf_counter()
        try:
            outcome = run_repair_round(
                sessions=sessions,
                store=store,
                round_no=1,
                valid=data["valid"],
                cfg=cfg,
                progress=lambda m: print(m, flush=True),
            )
        except UserError as exc:  # the round would not start (too few samples): a row says so
            print(exc, flush=True)
            outcome = RepairOutcome(1, "refused", {"refusal": str(exc)}, None)
        seconds = time.perf_counter() - start
        metrics = outcome.metrics
        row: dict[str, Any] = {
            "attack": name,
            "quarantined": len(q["images"]),
            "quarantine_precision": q["precision"],
            "quarantine_recall": q["recall"],
            "kept": int(kept.sum()),
            "kept_precision": float(q["poisoned"][kept].mean()) if kept.any() else 0.0,
            "requests_until_full": q["requests_until_full"],
            "status": outcome.status,
            "round_seconds": seconds,
            "cyclegan_seconds": metrics.get("cyclegan_seconds", 0.0),
            "stamp_pixels": metrics.get("stamp_pixels"),
            "gate": metrics.get("gate", {}),
            "gate_held_out": metrics.get("gate_held_out"),
            **({"refusal": metrics["refusal"]} if "refusal" in metrics else {}),
        }
        for stage, bundle in (
            ("badnet", load_bundle(zoo_dir)),
            ("round0_goodnet", pair.goodnet),
        ):
            row[f"{stage}_ca"], row[f"{stage}_asr"], row[f"{stage}_clean_target"] = _rates(
                bundle, data["heldout"], zoo_dir
            )
        if outcome.path is not None:
            for role in ("badnet", "goodnet"):
                repaired = load_bundle(outcome.path / role)
                (
                    row[f"round1_{role}_ca"],
                    row[f"round1_{role}_asr"],
                    row[f"round1_{role}_clean_target"],
                ) = _rates(repaired, data["heldout"], zoo_dir)
            png = RESULTS_DIR / f"{NAME}_{name}_trigger.png"
            shutil.copy(outcome.path / "trigger.png", png)
            row["trigger_png"] = png.name
    print({k: v for k, v in row.items() if k != "trigger_png"}, flush=True)
    return row


def run(zoo: Path, attacks: list[str], cfg: RepairConfig, prep: PrepareConfig) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    rows = [one_attack(name, zoo, data, cfg, prep) for name in attacks]
    done = [r for r in rows if r["status"] == "succeeded"]
    return {
        "provenance": started,
        "threads": threads,
        "prepare": "one candidate (alpha 2, gamma 0.3)"
        if prep is ONE_CANDIDATE
        else "default grid",
        "cyclegan": cfg.cyclegan.to_dict(),
        "repair": {k: v for k, v in cfg.to_dict().items() if k != "cyclegan"},
        "rows": rows,
        "checks": {
            "asr_at_most_3": bool(done)
            and len(done) == len(rows)
            and all(r["round1_goodnet_asr"] <= ASR_MAX for r in done),
            "ca_within_3_points": bool(done)
            and all(100 * (r["badnet_ca"] - r["round1_goodnet_ca"]) <= CA_DROP_MAX for r in done),
            "round_at_most_15_min": all(r["round_seconds"] <= SECONDS_MAX for r in rows),
        },
    }


def quarantine_views(repair: dict[str, Any]) -> str:
    """', plus N views of each kept quarantined image' when the round fine-tuned on them."""
    n = repair.get("quarantine_views", 0)
    return f", plus {n} views of each kept quarantined image" if n else ""


def borderline(repair: dict[str, Any]) -> str:
    """', and the N validation images ... treated once more' when the round did so."""
    n = repair.get("borderline", 0)
    return (
        f", and the {n} validation images the active GoodNet finds nearest the trigger's "
        "target treated once more"
        if n
        else ""
    )


def transplant(repair: dict[str, Any]) -> str:
    """The sentences on stamped triggers and on the others, as the round treated them."""
    degree = repair.get("pixel_curve", 0)
    curve = (
        f"gen_ab's change fitted as a curve of degree {degree} per pixel, in both copies"
        if degree
        else "gen_ab alone"
    )
    if not repair.get("transplant"):
        return f" Every trigger is treated with {curve}." if degree else ""
    return (
        " When a fifth or more of the kept images share a stamp (the same rare pixels in one "
        "small place), both treated copies take those pixels from real kept images that "
        "carry it, in place of gen_ab's (column `stamp px`: its size, `+` between several "
        f"stamps; `-`: none found, treated with {curve})."
    )


def stamp(r: dict[str, Any]) -> str:
    """The stamps each trigger group's round found: sizes joined by `+`, groups by `, `."""
    return ", ".join("+".join(map(str, g)) for g in r.get("stamp_pixels") or [] if g) or "-"


def gate(r: dict[str, Any]) -> str:
    """The round's gate: served clean accuracy on the gate split, before -> after, in %."""
    ca = (r.get("gate") or {}).get("served clean accuracy")
    return f"{100 * ca['before']:.2f} -> {100 * ca['after']:.2f}" if ca else "-"


def held_out(rows: list[dict[str, Any]]) -> str:
    """The sentence on the gate split: held out of round 0's training too, or not."""
    flags = {r.get("gate_held_out") for r in rows if r["status"] != "refused"}
    if flags == {True}:
        return (
            " The gate split is the 20% of the validation data that neither round 0's GoodNet "
            "(prepare refits it on the rest) nor round 1 trains on, so the gate's before and "
            "after are both held-out accuracies."
        )
    if flags == {None}:  # a run from before the split was reserved
        return (
            " Round 0's GoodNet was refitted on the gate split too, so the gate's before is "
            "optimistic."
        )
    return " Rows differ in whether round 0 left the gate split out (`gate_held_out`)."


def render(data: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    g = data["cyclegan"]
    lines = [
        "## One repair round per BadNet (issue 6)",
        "",
        f"Round 0 from `prepare` ({data['prepare']}); the quarantine is the first {QUARANTINE} distinct "
        "disagreements of the stream split with 10% triggered inputs, decided by the gateway's ensemble code; round 1 is "
        f"`run_repair_round` (what the watcher runs) with the CycleGAN at ngf {g['ngf']}, ndf {g['ndf']}, {g['n_blocks']} "
        f"residual block{'s' if g['n_blocks'] != 1 else ''}, {g['epochs']} epochs, batch {g['batch_size']}, and {data['repair']['epochs']} fine-tuning epochs at lr {data['repair']['lr']:g} "
        f"on {data['repair'].get('views', 1)} views of each clean image with treatment "
        f"`{data['repair'].get('treatment', 'gan')}`"
        f"{quarantine_views(data['repair'])}{borderline(data['repair'])}; "
        f"it learns from the quarantined images the suspect answers with confidence >= {data['repair']['min_score']:g} "
        f"(kept).{transplant(data['repair'])}{held_out(data['rows'])} "
        "CA and ASR on the 5,000-image held-out split. The gateway answers with the GoodNet's label whenever the models "
        "disagree, so the GoodNet columns are the gateway's answers. The last column is how often the round 1 "
        "GoodNet answers the target on the same held-out images *without* a trigger: that part of its ASR is clean "
        "error, which no backdoor repair removes.",
        "",
        "| attack | BadNet CA / ASR % | round 0 GoodNet CA / ASR % | round 1 GoodNet CA / ASR % | round 1 BadNet CA / ASR % | "
        "quarantine precision / recall % | kept (precision %) | stamp px | requests to fill | gate: served CA % before -> after | "
        "round s (CycleGAN s) | round 1 GoodNet: target on clean images % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        r1g = (
            f"{pct(r['round1_goodnet_ca'])} / {pct(r['round1_goodnet_asr'])}"
            if r["status"] == "succeeded"
            else f"no round: {r['refusal']}"
            if r["status"] == "refused"
            else f"rejected by the gate: {describe_gate(r['gate'])}"
        )
        r1b = (
            f"{pct(r['round1_badnet_ca'])} / {pct(r['round1_badnet_asr'])}"
            if r["status"] == "succeeded"
            else "-"
        )
        lines.append(
            f"| {r['attack']} | {pct(r['badnet_ca'])} / {pct(r['badnet_asr'])} | "
            f"{pct(r['round0_goodnet_ca'])} / {pct(r['round0_goodnet_asr'])} | {r1g} | {r1b} | "
            f"{pct(r['quarantine_precision'])} / {pct(r['quarantine_recall'])} | "
            f"{r['kept']} ({pct(r['kept_precision'])}) | {stamp(r)} | {r['requests_until_full']} | {gate(r)} | "
            f"{r['round_seconds']:.0f} ({r['cyclegan_seconds']:.0f}) | "
            f"{pct(r['round1_goodnet_clean_target']) if 'round1_goodnet_clean_target' in r else '-'} |"
        )
    lines += [
        "",
        checks_line(data["checks"]),
        "",
        "Recovered triggers (clean, gen_ab(clean), quarantined examples; mean difference on the right):",
        "",
    ]
    lines += trigger_images(data["rows"], lambda r: f"{r['attack']} trigger")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--epochs", type=int, default=None, help="CycleGAN epochs (preset's)")
    parser.add_argument(
        "--quick-prepare", action="store_true", help="round 0 from one candidate, not the grid"
    )
    args = parser.parse_args()
    gan = PRESETS[args.preset]
    if args.epochs:
        gan = replace(gan, epochs=args.epochs)
    prep = ONE_CANDIDATE if args.quick_prepare else PrepareConfig()
    data = run(args.zoo, args.attacks, RepairConfig(cyclegan=gan), prep)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
