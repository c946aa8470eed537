"""Quarantine precision with and without STRIP's filter beside NNoculation's pair (issue 32).

    python -m benchmarks.strip_filter [--zoo var/zoo] [--attacks patch ...] [--overlays 32]

Per BadNet of the zoo: round 0 of ``nnoculation`` with STRIP as its second stage on the
disagreements (``trainer prepare --strip-stage disagreements``; the one-candidate GoodNet
of benchmarks.nnoculation_table, alpha 2 and gamma 0.3, to keep the run short), then a
stream with 10% triggered inputs through the round's own policy, offline. What the pair
quarantines (its disagreements) is compared with what ``trainer retrain --strip-filter``
keeps of it (entropy at or below sigma): precision (triggered share), and recall (the
triggered inputs it still holds). The dev split (the stream) decides whether the filter is
on by default; the held-out split is reported.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.nnoculation_table import ATTACKS, ONE_CANDIDATE
from benchmarks.results import defender_data, provenance, publish
from core.bundle import load_bundle
from core.db import open_store, session_factory
from core.defenses import decide_batch, with_policy
from core.pair import load_round_pair
from trainer.attacks.poison import attacker_stream
from trainer.data import Dataset
from trainer.lab import attack_of
from trainer.prepare import prepare_round_zero
from trainer.strip import StripConfig

NAME = "strip_filter"


def rates(suspect: np.ndarray, keep: np.ndarray, poisoned: np.ndarray) -> dict[str, Any]:
    """Precision and recall of the quarantine ``suspect``, and of its ``keep`` part."""
    out: dict[str, Any] = {}
    for label, mask in (("pair", suspect), ("filtered", suspect & keep)):
        out[f"{label}_samples"] = int(mask.sum())
        out[f"{label}_precision"] = float(poisoned[mask].mean()) if mask.any() else float("nan")
        out[f"{label}_recall"] = float(mask[poisoned].mean())
    return out


def one(zoo: Path, name: str, data: dict[str, Dataset], overlays: int) -> dict[str, Any]:
    attack = attack_of(zoo / name)
    assert attack is not None
    with tempfile.TemporaryDirectory() as tmp:
        sessions = session_factory(open_store(f"sqlite:///{tmp}/q.db"))
        prepare_round_zero(
            suspect_dir=zoo / name,
            suspect=load_bundle(zoo / name),
            valid=data["valid"],
            cfg=ONE_CANDIDATE,
            sessions=sessions,
            store=Path(tmp),
            strip=StripConfig(strip_overlays=overlays, strip_stage="disagreements"),
        )
        with sessions() as s:
            pair = with_policy(load_round_pair(s, 0))
    assert pair.policy is not None
    sigma = float(pair.defense.params["strip"]["sigma"])
    row: dict[str, Any] = {"attack": name, "sigma": sigma}
    for split in ("stream", "heldout"):
        x, poisoned = attacker_stream(data[split].x, attack.firing, 0.10, seed=3)
        decisions = decide_batch(pair, x, pair.policy)
        suspect = np.array([d.suspect for d in decisions])
        h = np.array([np.nan if d.entropy is None else d.entropy for d in decisions])
        row[split] = rates(suspect, ~(h > sigma), poisoned)
    print(f"== {name}: {row}", flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    rows = [one(args.zoo, name, data, args.overlays) for name in args.attacks]
    return {"provenance": started, "threads": threads, "overlays": args.overlays, "rows": rows}


def _mean(rows: list[dict[str, Any]], split: str, key: str) -> float:
    vals = [r[split][key] for r in rows if not np.isnan(r[split][key])]
    return float(np.mean(vals)) if vals else float("nan")


def render(data: dict[str, Any]) -> str:
    lines = [
        "## Quarantine precision with STRIP's filter beside the pair (issue 32)",
        "",
        f"NNoculation's round 0 (one-candidate GoodNet) with STRIP on its disagreements "
        f"(N = {data['overlays']}, sigma at 1% FRR); a 10%-triggered stream through the "
        "round's policy, offline. Pair: every disagreement (what the quarantine holds); "
        "filtered: those whose entropy is at or below sigma (what `--strip-filter` keeps).",
        "",
    ]
    for split, title in (("heldout", "Held-out split"), ("stream", "Dev split (the stream)")):
        lines += [
            f"### {title}",
            "",
            "| attack | pair samples | pair precision | pair recall | filtered samples | "
            "filtered precision | filtered recall |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            v = r[split]
            lines.append(
                f"| {r['attack']} | {v['pair_samples']} | {100 * v['pair_precision']:.1f}% | "
                f"{100 * v['pair_recall']:.1f}% | {v['filtered_samples']} | "
                f"{100 * v['filtered_precision']:.1f}% | {100 * v['filtered_recall']:.1f}% |"
            )
        lines += [
            "",
            f"Mean precision {100 * _mean(data['rows'], split, 'pair_precision'):.1f}% -> "
            f"{100 * _mean(data['rows'], split, 'filtered_precision'):.1f}%, mean recall "
            f"{100 * _mean(data['rows'], split, 'pair_recall'):.1f}% -> "
            f"{100 * _mean(data['rows'], split, 'filtered_recall'):.1f}%.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--overlays", type=int, default=StripConfig.strip_overlays)
    args = parser.parse_args()
    data = run(args)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md")


if __name__ == "__main__":
    main()
