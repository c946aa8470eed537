"""STRIP's detection on the BadNet zoo, and its cost in the live gateway (issue 32).

    python -m benchmarks.strip_detection [--zoo var/zoo] [--attacks patch ...]
        [--dev-images 500] [--heldout-images 1000] [--requests 600] [--skip-load]

1. Detection, per BadNet of the zoo (``python -m benchmarks.badnet_zoo``). The overlay pool
   (100 images, one per class first) and sigma come from the defender's validation split
   less the gate split, as ``trainer prepare --defense codefend`` fits them. Each input's
   entropy against each overlay is computed once, so N = 8, 16, 32 and 100 are the pool's
   first N overlays (N = 8 has fewer overlays than Fashion-MNIST's 10 classes, which
   ``prepare`` refuses; it is measured here for the cost curve). FRR: clean images flagged.
   FAR: triggered images (true class not the target) that STRIP lets through and the
   suspect answers with the attacker's label; "missed" counts every unflagged triggered
   image. Both overlay modes, at a target FRR of 1% and 5%, on the dev split (the stream;
   choices are made here) and on the held-out split (reported only).
2. Cost. One local Ray Serve: the ``nnoculation`` ensemble (the zoo's patch BadNet and
   clean model) and a ``codefend`` app per N, the same PNG stream (10% triggered) at 8 and
   32 clients, interleaved and repeated; throughput and p99 as ratios to the ensemble. In
   process, one batch of 32 through the batched policy against a loop of N forwards shows
   what batching buys. Goal: at N = 16, at least 0.5x the ensemble's throughput.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.nnoculation_table import ATTACKS
from benchmarks.results import defender_data, provenance, publish
from benchmarks.strip_load import load_runs
from benchmarks.strip_report import render
from core.bundle import Bundle, load_bundle
from core.strip import MODES, StripParams, superimpose
from core.strip import entropy_matrix as strip_entropies
from trainer.attacks.poison import Attack, counted, triggered
from trainer.data import Dataset
from trainer.lab import attack_of
from trainer.splits import gate_split
from trainer.strip import fit_sigma, overlay_pool

NAME = "strip_detection"
NS = (8, 16, 32, 100)
FRRS = (0.01, 0.05)


def entropy_matrix(bundle: Bundle, x: np.ndarray, pool: np.ndarray, mode: str) -> np.ndarray:
    """(len(x), len(pool)): each input's entropy against each overlay."""
    return strip_entropies(lambda blends: bundle.logits(blends).softmax(1), x, pool, mode)


def attack_inputs(
    data: Dataset, attack: Attack, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(clean x, triggered x, their targets, their true labels): ``count`` of each, the
    triggered ones spread over the firing groups, true class never the target."""
    rng = np.random.default_rng(seed)
    clean = data.x[rng.permutation(len(data))[:count]]
    parts = []
    for g in attack.firing:
        x, targets = triggered(data, g, num_classes=attack.num_classes, seed=attack.seed)
        keep, _ = counted(data, g, attack.num_classes)  # the rows triggered() kept
        parts.append((x, targets, data.y[keep]))
    x = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[1] for p in parts])
    truth = np.concatenate([p[2] for p in parts])
    pick = rng.permutation(len(x))[:count]
    return clean, x[pick], targets[pick], truth[pick]


def rates(
    h_clean: np.ndarray, h_trig: np.ndarray, obey: np.ndarray, sigma: float
) -> dict[str, float]:
    flagged = h_trig <= sigma
    return {
        "frr": float(np.mean(h_clean <= sigma)),
        "far": float(np.mean(~flagged & obey)),
        "missed": float(np.mean(~flagged)),
    }


def detect(
    zoo: Path, name: str, data: dict[str, Dataset], counts: dict[str, int]
) -> dict[str, Any]:
    """One BadNet's STRIP rates: mode x FRR x N x split."""
    bundle = load_bundle(zoo / name)
    attack = attack_of(zoo / name)
    assert attack is not None
    rest, _ = gate_split(data["valid"])
    idx = overlay_pool(rest, max(NS), bundle.manifest.num_classes, seed=0)
    fit_x = np.delete(rest.x, idx, axis=0)
    pool = rest.x[idx]
    splits = {s: attack_inputs(data[s], attack, counts[s], seed=1) for s in ("stream", "heldout")}
    row: dict[str, Any] = {"attack": name, "fit_images": len(fit_x), "results": []}
    start = time.perf_counter()
    for mode in MODES:
        h_fit = entropy_matrix(bundle, fit_x, pool, mode)
        h = {
            s: (entropy_matrix(bundle, c, pool, mode), entropy_matrix(bundle, t, pool, mode))
            for s, (c, t, _, _) in splits.items()
        }
        obey = {s: bundle.predict(t) == targets for s, (_, t, targets, _) in splits.items()}
        for n in NS:
            for frr in FRRS:
                sigma = fit_sigma(h_fit[:, :n].mean(1), frr)
                for s in splits:
                    c, t = h[s][0][:, :n].mean(1), h[s][1][:, :n].mean(1)
                    row["results"].append(
                        {"mode": mode, "n": n, "target_frr": frr, "split": s, "sigma": sigma}
                        | rates(c, t, obey[s], sigma)
                    )
        row[f"asr_{mode}"] = {s: float(obey[s].mean()) for s in splits}
    row["seconds"] = time.perf_counter() - start
    print(f"== {name}: {row['seconds']:.0f} s", flush=True)
    return row


def strip_params(bundle: Bundle, valid: Dataset, n: int, mode: str) -> StripParams:
    """The pool's first ``n`` overlays and sigma at 1% FRR, fitted as ``detect`` fits them."""
    rest, _ = gate_split(valid)
    idx = overlay_pool(rest, max(NS), bundle.manifest.num_classes, seed=0)
    pool = rest.x[idx[:n]]
    h = entropy_matrix(bundle, np.delete(rest.x, idx, axis=0), pool, mode).mean(1)
    return StripParams(pool, fit_sigma(h, 0.01), mode, 0.01, "disagreements")


def batching(bundle: Bundle, images: np.ndarray, pool: np.ndarray, mode: str) -> dict[str, float]:
    """ms for one request batch of 32 through STRIP: one forward over all B*N blends
    against one forward per overlay (1 thread, as a replica runs)."""
    torch.set_num_threads(1)
    batch = images[:32]

    def batched() -> None:
        bundle.logits(superimpose(batch, pool, mode))

    def looped() -> None:
        for i in range(len(pool)):
            bundle.logits(superimpose(batch, pool[i : i + 1], mode))

    out = {}
    for label, fn in (("batched_ms", batched), ("looped_ms", looped)):
        fn()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[label] = 1000 * float(np.median(times))
    out["speedup"] = out["looped_ms"] / out["batched_ms"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    counts = {"stream": args.dev_images, "heldout": args.heldout_images}
    result: dict[str, Any] = {
        "provenance": started,
        "threads": threads,
        "ns": list(NS),
        "frrs": list(FRRS),
        "counts": counts,
        "rows": [detect(args.zoo, name, data, counts) for name in args.attacks],
    }
    mode = args.load_mode
    bundle = load_bundle(args.zoo / "patch")
    params = {n: strip_params(bundle, data["valid"], n, mode) for n in NS}
    result["batching"] = {
        str(n): batching(bundle, data["stream"].x, params[n].pool, mode) for n in NS
    }
    torch.set_num_threads(threads)
    if not args.skip_load:
        result["load"] = load_runs(args.zoo, data["stream"], params, args.requests, args.repeats)
        result["load"]["mode"] = mode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--dev-images", type=int, default=500)
    parser.add_argument("--heldout-images", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load-mode", choices=MODES, default="add")
    parser.add_argument("--skip-load", action="store_true", help="detection only")
    args = parser.parse_args()
    data = run(args)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md")


if __name__ == "__main__":
    main()
