"""The smallest CycleGAN and epoch budget that still repairs (issue 6; NNoculation App. A.3).

    python -m benchmarks.cyclegan_size [--zoo var/zoo] [--attacks blend filter] [--seeds 0 1]
        [--configs 4x1x5 8x1x2 8x1x5 8x1x10 16x2x5 16x2x10 32x3x10]

The paper's CycleGAN (ngf 64, 9 residual blocks, 200 epochs, batch 1) takes hours on a CPU,
and the time a round takes is the time an attacker keeps winning. For each BadNet named:
1. Round 0 from ``prepare`` with one candidate (alpha 2, gamma 0.3), once.
2. One quarantine, the same for every configuration: the first 200 distinct disagreements
   of the stream split with 10% triggered inputs (``repair_round.collect``).
3. For each CycleGAN configuration and seed, ``run_repair_round`` (the watcher's code) on a
   copy of that store; the seed is both the CycleGAN's and the round's (gate split,
   fine-tuning order), so the spread is a whole round's.
4. CA and ASR of the served answers (the repaired GoodNet) on the held-out split.

A configuration *repairs* when, on every attack, its mean ASR is within 1 point of the best
configuration's and its CA within 3 points of the BadNet's. The smallest such (fewest
generator parameters, then fewest epochs) is the one to make the default. The choice holds
only for the attacks run: the first run (patch and blend) chose "compact", which then
failed the multi-trigger and combo BadNets in the NNoculation table. Since then a stamped
trigger (patch, multi-trigger, combo, all-to-all) is treated with its own stamp, and a
round trains no CycleGAN for it (``trainer.repair``): before the CycleGAN was skipped, a
run at commit 0c3dce0 (not published; its numbers are in issue 6's notes) gave the patch,
multi-trigger and combo rounds the same CA and ASR with 8x1x5, compact and small. So the
default attacks are the ones whose treatment is gen_ab's: the global triggers, blend and
filter.

``--render`` recomputes the choice and the checks from the saved JSON with this code (for a
changed rule or default), and says so under the table; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.repair_round import ASR_MAX, ONE_CANDIDATE, round_zero_and_quarantine
from benchmarks.results import RESULTS_DIR, checks_line, defender_data, provenance, publish
from core.bundle import load_bundle
from core.db import open_store, session_factory
from core.errors import UserError
from trainer.attacks.poison import firing_success_rate
from trainer.cyclegan import DEFAULT_PRESET, PRESETS, CycleGANConfig
from trainer.cyclegan.models import ResnetGenerator
from trainer.lab import attack_of
from trainer.loop import accuracy
from trainer.repair import RepairConfig, run_repair_round

NAME = "cyclegan_size"
ASR_SLACK, CA_DROP_MAX = 0.01, 3.0
SIZES = {  # key: (ngf and ndf, residual blocks, epochs); the rest is the small preset's
    "4x1x5": (4, 1, 5),
    "8x1x2": (8, 1, 2),
    "8x1x5": (8, 1, 5),
    "8x1x10": (8, 1, 10),
    "16x2x5": (16, 2, 5),
    "16x2x10": (16, 2, 10),
    "32x3x10": (32, 3, 10),
}
KEYS = {
    key: f"ngf {ngf}, {blocks} block{'s' * (blocks > 1)}, {epochs} epochs"
    for key, (ngf, blocks, epochs) in SIZES.items()
}
CONFIGS: dict[str, CycleGANConfig] = {
    KEYS[key]: replace(PRESETS["small"], ngf=ngf, ndf=ngf, n_blocks=blocks, epochs=epochs)
    for key, (ngf, blocks, epochs) in SIZES.items()
}


def preset_of(config: dict[str, Any]) -> str | None:
    """The preset a saved configuration equals (seed aside), if any."""
    for name, preset in PRESETS.items():
        fields = {k: v for k, v in preset.to_dict().items() if k != "seed"}
        if {k: v for k, v in config.items() if k in fields} == fields:
            return name
    return None


def generator_params(cfg: CycleGANConfig, channels: int = 1) -> int:
    gen = ResnetGenerator(channels, ngf=cfg.ngf, n_blocks=cfg.n_blocks)
    return sum(p.numel() for p in gen.parameters())


def base_store(name: str, zoo: Path, data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Round 0 and the shared quarantine for one attack, in ``root``."""
    zoo_dir = zoo / name
    suspect = load_bundle(zoo_dir)
    attack = attack_of(zoo_dir)
    assert attack is not None
    _, pair, q = round_zero_and_quarantine(zoo_dir, data, ONE_CANDIDATE, root)
    heldout = data["heldout"]
    spec = suspect.manifest.input
    return {
        "attack": name,
        "quarantine_precision": q["precision"],
        "badnet_ca": accuracy(suspect.model, heldout.x, heldout.y, spec),
        "badnet_asr": firing_success_rate(suspect.predict, heldout, attack),
        "round0_ca": accuracy(pair.goodnet.model, heldout.x, heldout.y, spec),
        "round0_asr": firing_success_rate(pair.goodnet.predict, heldout, attack),
    }


def one_round(
    name: str, zoo: Path, data: dict[str, Any], base: Path, gan: CycleGANConfig, seed: int
) -> dict[str, Any]:
    """``run_repair_round`` with ``gan`` on a copy of ``base``; the served answers' rates."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(base, store)
        sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
        cfg = RepairConfig(cyclegan=replace(gan, seed=seed), seed=seed)
        start = time.perf_counter()
        outcome = run_repair_round(
            sessions=sessions, store=store, round_no=1, valid=data["valid"], cfg=cfg
        )
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "seed": seed,
            "status": outcome.status,
            "round_seconds": seconds,
            "cyclegan_seconds": outcome.metrics["cyclegan_seconds"],
            "cyclegans": sum(g["cyclegan"] for g in outcome.metrics["trigger_groups"]),
            "gate": outcome.metrics["gate"],
        }
        if outcome.path is not None:
            served = load_bundle(outcome.path / "goodnet")
            attack = attack_of(zoo / name)
            assert attack is not None
            heldout = data["heldout"]
            row["ca"] = accuracy(served.model, heldout.x, heldout.y, served.manifest.input)
            row["asr"] = firing_success_rate(served.predict, heldout, attack)
    print(f"  {name} seed {seed}: {row}", flush=True)
    return row


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "succeeded"]
    return {
        "succeeded": len(done),
        "runs": len(runs),
        "asr": float(np.mean([r["asr"] for r in done])) if done else None,
        "ca": float(np.mean([r["ca"] for r in done])) if done else None,
        "cyclegan_seconds": float(np.mean([r["cyclegan_seconds"] for r in runs])),
        "round_seconds": float(np.mean([r["round_seconds"] for r in runs])),
    }


def choose(data: dict[str, Any]) -> dict[str, Any]:
    """Which configurations repair (see the module doc), and the smallest of them."""
    repairs: dict[str, bool] = {}
    for label, per_attack in data["results"].items():
        ok = True
        for attack in data["attacks"]:
            s = per_attack[attack["attack"]]["summary"]
            best = min(
                r[attack["attack"]]["summary"]["asr"]
                for r in data["results"].values()
                if r[attack["attack"]]["summary"]["asr"] is not None
            )
            ok = ok and (
                s["succeeded"] == s["runs"]
                and s["asr"] <= best + ASR_SLACK + 1e-12
                and 100 * (attack["badnet_ca"] - s["ca"]) <= CA_DROP_MAX + 1e-9
            )
        repairs[label] = ok
    seconds = {
        label: float(np.mean([v["summary"]["cyclegan_seconds"] for v in per.values()]))
        for label, per in data["results"].items()
    }
    passing = [label for label, ok in repairs.items() if ok]
    configs = data["configs"]
    smallest = (
        min(passing, key=lambda k: (configs[k]["generator_params"], configs[k]["epochs"]))
        if passing
        else None
    )
    return {"repairs": repairs, "cyclegan_seconds": seconds, "smallest": smallest}


def checks(data: dict[str, Any]) -> dict[str, bool]:
    smallest = data["choice"]["smallest"]
    return {
        "some_configuration_repairs": smallest is not None,
        "default_is_the_smallest_that_repairs": smallest is not None
        and preset_of(data["configs"][smallest]) == DEFAULT_PRESET,
    }


def run(
    zoo: Path, attacks: list[str], seeds: list[int], work: Path, labels: list[str]
) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    for name in attacks:
        if attack_of(zoo / name) is None:
            raise UserError(f"{zoo / name} is not a BadNet; run 'python -m benchmarks.badnet_zoo'")
    shutil.rmtree(work, ignore_errors=True)
    bases: list[dict[str, Any]] = []
    configs = {label: CONFIGS[label] for label in labels}
    results: dict[str, dict[str, Any]] = {label: {} for label in configs}
    for name in attacks:
        root = work / name
        root.mkdir(parents=True)
        print(f"== {name}: round 0 and the quarantine", flush=True)
        bases.append(base_store(name, zoo, data, root))
        for label, gan in configs.items():
            print(f"== {name}: {label}", flush=True)
            runs = [one_round(name, zoo, data, root, gan, seed) for seed in seeds]
            results[label][name] = {"runs": runs, "summary": summarise(runs)}
    out: dict[str, Any] = {
        "provenance": started,
        "default_preset": DEFAULT_PRESET,
        "threads": threads,
        "seeds": seeds,
        "attacks": bases,
        "configs": {
            label: gan.to_dict() | {"generator_params": generator_params(gan)}
            for label, gan in configs.items()
        },
        "results": results,
    }
    out["choice"] = choose(out)
    out["checks"] = checks(out)
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def render(data: dict[str, Any]) -> str:
    names = [a["attack"] for a in data["attacks"]]
    lines = [
        "## CycleGAN size and epoch budget (issue 6)",
        "",
        "Per attack: round 0 from `prepare` with one candidate (alpha 2, gamma 0.3); one quarantine, the first 200 "
        "distinct disagreements of the stream split with 10% triggered inputs, shared by every configuration; then "
        f"`run_repair_round` (the watcher's code) per configuration and seed ({', '.join(map(str, data['seeds']))}; the "
        "seed is the CycleGAN's and the round's). CA and ASR are the served answers' (the repaired GoodNet) on the "
        "5,000-image held-out split, means over the seeds whose round succeeded (each seed in brackets; a round its gate "
        "rejected serves nothing new and has no rates). A configuration repairs when, on "
        f"every attack, its mean ASR is within {100 * ASR_SLACK:g} point of the best configuration's and its CA within "
        f"{CA_DROP_MAX:g} points of the BadNet's. A stamped trigger (patch, all-to-all, multi-trigger, combo) is "
        "treated with its own stamp and its round trains no CycleGAN (`trainer/repair/nnoculation.py`), so only global "
        "triggers depend on the size.",
        "",
        "| CycleGAN | generator parameters | CycleGAN s | round s | "
        + " | ".join(f"{n} CA % | {n} ASR % (per seed)" for n in names)
        + " | repairs |",
        "|---|---|---|---|" + "---|---|" * len(names) + "---|",
    ]
    choice = data["choice"]
    missed = [
        n
        for n in names
        if all(
            per[n]["summary"]["asr"] is None or per[n]["summary"]["asr"] > ASR_MAX
            for per in data["results"].values()
        )
    ]
    for label, per in data["results"].items():
        preset = preset_of(data["configs"][label])
        cells = [
            label + (f" (`{preset}`)" if preset else ""),
            f"{data['configs'][label]['generator_params']:,}",
            f"{choice['cyclegan_seconds'][label]:.0f}",
            f"{np.mean([v['summary']['round_seconds'] for v in per.values()]):.0f}",
        ]
        for n in names:
            s = per[n]["summary"]
            seeds = ", ".join(
                _pct(r["asr"]) if r.get("asr") is not None else r["status"] for r in per[n]["runs"]
            )
            cells += [_pct(s["ca"]), f"{_pct(s['asr'])} ({seeds})"]
        cells.append("yes" if choice["repairs"][label] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Before the round: "
        + "; ".join(
            f"{a['attack']} BadNet CA {_pct(a['badnet_ca'])} / ASR {_pct(a['badnet_asr'])}, round 0 CA "
            f"{_pct(a['round0_ca'])} / ASR {_pct(a['round0_asr'])}, quarantine {_pct(a['quarantine_precision'])}% "
            "triggered"
            for a in data["attacks"]
        )
        + ".",
        "",
        f"Smallest configuration that repairs (fewest generator parameters, then epochs), on "
        f"{', '.join(names)} only: {choice['smallest'] or 'none'}. The default preset: "
        f"`{data['default_preset']}`.",
        "",
        "The rule is relative to the best configuration run. No configuration reached the issue's "
        f"ASR <= {100 * ASR_MAX:g}% on: " + (", ".join(missed) or "none") + ".",
        "",
        checks_line(data["checks"]),
        "",
    ]
    if "rendered" in data:
        r = data["rendered"]
        lines += [
            f"The choice, the `repairs` column and the checks were recomputed from the measured numbers "
            f"by `{r['command']}` at commit `{r['commit']}`, {r['date']}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", default=["blend", "filter"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("var/cyclegan_size"))
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(KEYS),
        default=list(KEYS),
        help="configurations to run (ngf x blocks x epochs; default all)",
    )
    parser.add_argument(
        "--render", action="store_true", help="recompute the choice from the saved JSON; no runs"
    )
    args = parser.parse_args()
    if args.render:
        saved = RESULTS_DIR / f"{NAME}.json"
        if not saved.exists():
            raise SystemExit(f"error: {saved} does not exist; run without --render first")
        data = json.loads(saved.read_text())
        data["default_preset"] = DEFAULT_PRESET
        data["choice"] = choose(data)
        data["checks"] = checks(data)
        data["rendered"] = provenance()
        publish(NAME, data, render)
        print(f"re-rendered {saved}; checks: {data['checks']}")
        return
    try:
        data = run(args.zoo, args.attacks, args.seeds, args.work, [KEYS[k] for k in args.configs])
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
