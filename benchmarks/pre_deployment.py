"""Pre-deployment defense on every BadNet of the zoo (NNoculation stage 1, issue 4).

    python -m benchmarks.pre_deployment [--zoo var/zoo] [--attacks ...]

Needs the bundles of ``python -m benchmarks.badnet_zoo``. For each BadNet it runs
``prepare`` (the same code as ``trainer prepare``, Ray-parallel) on the defender's 1,000
validation images into a fresh store, then measures the BadNet's and the GoodNet's CA and
ASR on the held-out split. Only this benchmark knows the triggers; ``prepare`` never does.
It also times one prepare in sequence and in parallel, in the same run.

Goals: every GoodNet's CA within 3 points of its BadNet's; median GoodNet ASR <= 40% and
none above 70%; one prepare with the default grid in <= 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import RESULTS_DIR, checks_line, provenance, publish
from core.bundle import load_bundle
from core.db import open_store, session_factory
from core.settings import Settings
from trainer.attacks.poison import ATTACKS, firing_success_rate
from trainer.data import Dataset, load_fashion_mnist
from trainer.grid import run_ray, run_sequential, start_local_ray
from trainer.lab import attack_of
from trainer.loop import accuracy, predict, set_threads
from trainer.prepare import PrepareConfig, goodnet_from, grid_search, prepare_round_zero
from trainer.report import grid_heatmap

NAME = "pre_deployment"
CA_DROP_MAX, MEDIAN_ASR_MAX, ASR_MAX, SECONDS_MAX = 3.0, 0.40, 0.70, 600.0


def _asr(predict_fn: Any, heldout: Dataset, zoo_dir: Path) -> float:
    """Mean ASR over the attack's firing triggers (its covers are not attacks)."""
    attack = attack_of(zoo_dir)
    assert attack is not None
    return firing_success_rate(predict_fn, heldout, attack)


def one_attack(
    name: str, zoo: Path, valid: Dataset, heldout: Dataset, cfg: PrepareConfig
) -> dict[str, Any]:
    suspect_dir = zoo / name
    suspect = load_bundle(suspect_dir)
    spec = suspect.manifest.input
    with tempfile.TemporaryDirectory() as tmp:
        sessions = session_factory(open_store(f"sqlite:///{tmp}/q.db"))
        start = time.perf_counter()
        result, path = prepare_round_zero(
            suspect_dir=suspect_dir,
            suspect=suspect,
            valid=valid,
            cfg=cfg,
            sessions=sessions,
            store=Path(tmp),
            runner=run_ray,
            keep_states=True,
        )
        seconds = time.perf_counter() - start
        goodnet = load_bundle(path / "goodnet")
    grid = result  # every candidate's weights were kept for the ASR heatmap
    cand_asr = {
        (c.alpha, c.gamma): _asr(
            lambda x, s=state: predict(goodnet_from(suspect, s), x, spec), heldout, suspect_dir
        )
        for c, state in zip(grid.candidates, grid.states, strict=True)
    }
    chosen = (result.selection.candidate.alpha, result.selection.candidate.gamma)
    ca_png = grid_heatmap(
        {(c.alpha, c.gamma): c.clean_accuracy for c in grid.candidates},
        RESULTS_DIR / f"{NAME}_{name}_ca.png",
        title=f"{name}: cross-fitted validation CA",
        chosen=chosen,
    )
    asr_png = grid_heatmap(
        cand_asr,
        RESULTS_DIR / f"{NAME}_{name}_asr.png",
        title=f"{name}: ASR on the test split (first fold's weights)",
        chosen=chosen,
        cmap="magma",
    )
    row = {
        "attack": name,
        "badnet_ca": accuracy(suspect.model, heldout.x, heldout.y, spec),
        "badnet_asr": _asr(suspect.predict, heldout, suspect_dir),
        "goodnet_ca": accuracy(goodnet.model, heldout.x, heldout.y, spec),
        "goodnet_asr": _asr(goodnet.predict, heldout, suspect_dir),
        "alpha": chosen[0],
        "gamma": chosen[1],
        "qualified": result.selection.qualified,
        "prepare_seconds": seconds,
        "plots": [ca_png.name, asr_png.name],
    }
    print({k: v for k, v in row.items() if k != "plots"}, flush=True)
    return row


def timing(zoo: Path, valid: Dataset, cfg: PrepareConfig) -> dict[str, float]:
    """One prepare's grid on the patch BadNet, in sequence and in parallel, same run."""
    suspect = load_bundle(zoo / "patch")
    start = time.perf_counter()
    grid_search(suspect, valid, cfg, runner=run_sequential)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    grid_search(suspect, valid, cfg, runner=run_ray)
    parallel = time.perf_counter() - start
    return {"sequential_s": sequential, "parallel_s": parallel, "speedup": sequential / parallel}


def run(zoo: Path, attacks: list[str]) -> dict[str, Any]:
    settings = Settings()
    started = provenance()  # the commit and time the run began with
    threads = set_threads(settings.threads)
    if not start_local_ray(threads):
        raise SystemExit("Ray did not start; this benchmark measures the parallel grid")
    valid = load_fashion_mnist(settings.fashion_mnist_dir, "valid")
    heldout = load_fashion_mnist(settings.fashion_mnist_dir, "heldout")
    cfg = PrepareConfig()
    rows = [one_attack(name, zoo, valid, heldout, cfg) for name in attacks]
    asrs = [r["goodnet_asr"] for r in rows]
    return {
        "provenance": started,
        "threads": threads,
        "config": {**cfg.__dict__},
        "valid_size": len(valid),
        "rows": rows,
        "timing": timing(zoo, valid, cfg),
        "checks": {
            "ca_within_3_points": all(
                100 * (r["badnet_ca"] - r["goodnet_ca"]) <= CA_DROP_MAX for r in rows
            ),
            "median_goodnet_asr_at_most_40": statistics.median(asrs) <= MEDIAN_ASR_MAX,
            "no_goodnet_asr_above_70": max(asrs) <= ASR_MAX,
        },
    }


def render(data: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    c = data["config"]
    t = data["timing"]
    lines = [
        "## Pre-deployment GoodNets (issue 4)",
        "",
        f"`trainer prepare` on each zoo BadNet: {data['valid_size']} validation images, "
        f"alphas {list(c['alphas'])} x base rate, gammas {list(c['gammas'])}, {c['epochs']} epochs per candidate, theta {c['ca_drop']} points. "
        f"Each candidate's clean accuracy for the selection rule is cross-fitted over {c['folds']} folds "
        f"(trained without a fold, scored on it, pooled over all {data['valid_size']} images); "
        f"the chosen (alpha, gamma) is then {'retrained on all of them' if c['refit'] else 'kept as trained'}. "
        f"Retraining: {c['schedule']} learning-rate schedule, targets distilled (weight {c['distill']}) from the suspect's answers on the clean originals, "
        f"batch jitter {', '.join(c['augment']) or 'none'}. "
        "CA and ASR on the 5,000-image held-out test split; ASR is the mean over firing triggers.",
        "",
        "| attack | BadNet CA % | BadNet ASR % | GoodNet CA % | GoodNet ASR % | CA drop (points) | chosen alpha, gamma | within theta | prepare s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['attack']} | {pct(r['badnet_ca'])} | {pct(r['badnet_asr'])} | {pct(r['goodnet_ca'])} | {pct(r['goodnet_asr'])} | "
            f"{100 * (r['badnet_ca'] - r['goodnet_ca']):.2f} | {r['alpha']:g}x, {r['gamma']:.1f} | {'yes' if r['qualified'] else 'no'} | {r['prepare_seconds']:.0f} |"
        )
    asrs = sorted(r["goodnet_asr"] for r in data["rows"])
    lines += [
        "",
        f"Median GoodNet ASR {pct(statistics.median(asrs))}%, max {pct(max(asrs))}%. "
        + checks_line(data["checks"]),
        "",
        f"Timing, default grid ({len(c['alphas']) * len(c['gammas'])} candidates) on the patch BadNet, same run: "
        f"sequential {t['sequential_s']:.0f} s, Ray-parallel {t['parallel_s']:.0f} s, speed-up {t['speedup']:.2f}x "
        f"({data['threads']} CPU threads).",
        "",
        "CA (left) and ASR (right) over the grid, the chosen GoodNet starred (as the paper's Figure 4):",
        "",
    ]
    for r in data["rows"]:
        lines.append(
            f"![{r['attack']} CA](results/{r['plots'][0]}) ![{r['attack']} ASR](results/{r['plots'][1]})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    args = parser.parse_args()
    data = run(args.zoo, args.attacks)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
