"""CoDefend through the live gateway (issue 32), on the NNoculation table's protocol.

    python -m benchmarks.codefend_table [--zoo var/zoo] [--work var/codefend]
        [--attacks patch ...] [--overlays 32] [--threshold 200] [--timeout 600]

Per BadNet of the zoo, with ``benchmarks.nnoculation_table.one_run`` and ``--defense
codefend``: round 0 is the suspect alone with STRIP fitted on the defender's validation
split (``trainer prepare --defense codefend``); the gateway and the repair watcher run
locally; a stream with 10% triggered inputs is sent until the gateway answers from round 1
(N = 200 STRIP-flagged samples, then the CycleGAN round on the single model); CA and ASR on
the held-out split are measured through the gateway's HTTP answers before and after. An
attack STRIP does not flag reaches no round within ``--timeout``: the table says so, with
STRIP's held-out FAR from ``benchmarks.strip_detection``.
Goal (better than the paper): ASR <= 2% and a CA drop <= 1 point, where STRIP detects it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.nnoculation_table import ATTACKS, ONE_CANDIDATE, Options, Phase, one_run
from benchmarks.results import RESULTS_DIR, checks_line, defender_data, provenance, publish
from core.errors import UserError
from trainer.cyclegan import DEFAULT_PRESET
from trainer.lab import attack_of
from trainer.strip import StripConfig

NAME = "codefend_table"
# CoDefend (paper 000) Table 4, CA / ASR % before -> after its repair
PAPER_TABLE4 = {
    "MNIST-A": ((98.70, 100), (98.62, 1.97)),
    "GTSRB-B": ((95.80, 100), (95.26, 2.06)),
    "CIFAR10-C": ((88.27, 100), (87.18, 2.53)),
    "CIFAR100-D": ((68.37, 100), (68.05, 3.47)),
}
ASR_GOAL, CA_DROP_GOAL = 0.02, 0.01


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "stream", "heldout")
    opts = Options(
        work=args.work.resolve(),
        prepare=ONE_CANDIDATE,  # unused: codefend prepares no GoodNet
        threshold=args.threshold,
        preset=args.preset,
        timeout=args.timeout,
        defense="codefend",
        strip=StripConfig(strip_overlays=args.overlays, strip_mode=args.mode),
    )
    rows = []
    for name in args.attacks:
        attack = attack_of(args.zoo / name)
        if attack is None:
            raise UserError(
                f"{args.zoo / name} is not a BadNet; run 'python -m benchmarks.badnet_zoo'"
            )
        phases = [Phase(data["stream"].x, attack.firing)]
        rows.append(one_run(name, args.zoo / name, data, phases, 0.10, opts))
    out = {
        "provenance": started,
        "threads": threads,
        "overlays": args.overlays,
        "mode": args.mode,
        "threshold": args.threshold,
        "timeout": args.timeout,
        "preset": args.preset,
        "rows": rows,
        "strip_far": _strip_far(args.overlays),
    }
    out["checks"] = checks(rows)
    return out


def _strip_far(n: int) -> dict[str, Any]:
    """STRIP's held-out FAR and missed rate at 1% FRR per attack, from strip_detection."""
    path = RESULTS_DIR / "strip_detection.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    near = min(saved["ns"], key=lambda k: abs(k - n))
    return {
        row["attack"]: next(
            {"n": near, "far": r["far"], "missed": r["missed"]}
            for r in row["results"]
            if r["mode"] == "add" and r["n"] == near and r["target_frr"] == 0.01
            and r["split"] == "heldout"
        )
        for row in saved["rows"]
    }  # fmt: skip


def _stages(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    by = {s["stage"]: s for s in row["stages"]}
    return by["BadNet alone"], by.get("round 1")


def checks(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Per attack that reached round 1 (STRIP detected it): the goal holds."""
    out = {}
    for row in rows:
        alone, after = _stages(row)
        if after is None:
            continue
        out[row["label"]] = bool(
            after["asr"] <= ASR_GOAL and alone["ca"] - after["ca"] <= CA_DROP_GOAL
        )
    return out


def render(data: dict[str, Any]) -> str:
    lines = [
        "## CoDefend through the live gateway (issue 32)",
        "",
        f"The suspect alone with STRIP (N = {data['overlays']}, mode {data['mode']}, sigma at "
        f"1% FRR on the validation split), a 10%-triggered stream until round 1 (N = "
        f"{data['threshold']} flagged samples, CycleGAN preset {data['preset']}), CA and ASR on "
        "the held-out split through the gateway's HTTP answers. The gateway serves the model's "
        "label (codefend), so round 0's answers are the suspect's.",
        "",
        "| attack | BadNet CA | BadNet ASR | round 1 CA | round 1 ASR | CA drop | requests to swap | "
        "quarantine precision | STRIP held-out FAR @1% | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        alone, after = _stages(row)
        far = data["strip_far"].get(row["label"])
        far_txt = f"{100 * far['far']:.1f}%" if far else "-"
        rd = row["rounds"][0] if row["rounds"] else {}
        if after is None:
            why = rd.get("reason", "no round")
            what = "gate rejected round 1" if "rejected" in why else "no round 1 (not detected)"
            lines.append(
                f"| {row['label']} | {100 * alone['ca']:.2f} | {100 * alone['asr']:.2f} | - | - "
                f"| - | {what}: {why[:90]} | - | {far_txt} | - |"
            )
            continue
        goal = data["checks"].get(row["label"])
        lines.append(
            f"| {row['label']} | {100 * alone['ca']:.2f} | {100 * alone['asr']:.2f} | "
            f"{100 * after['ca']:.2f} | {100 * after['asr']:.2f} | "
            f"{100 * (alone['ca'] - after['ca']):.2f} | {rd.get('requests_until_swap')} | "
            f"{100 * rd.get('precision', 0):.1f}% | {far_txt} | "
            f"{'PASS' if goal else 'FAIL'} |"
        )
    lines += [
        "",
        "CoDefend Table 4 (CA / ASR %, before -> after): "
        + "; ".join(
            f"{k} {b[0]:g} / {b[1]:g} -> {a[0]:g} / {a[1]:g}" for k, (b, a) in PAPER_TABLE4.items()
        )
        + " (post-repair ASR 1.66-3.47%, CA drop 0.08-1.11 points).",
        "",
        f"Goals (ASR <= 2%, CA drop <= 1 point, where STRIP detects the attack): "
        f"{checks_line(data['checks']) or 'no attack reached round 1'}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--work", type=Path, default=Path("var/codefend"))
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--overlays", type=int, default=StripConfig.strip_overlays)
    parser.add_argument("--mode", default=StripConfig.strip_mode)
    parser.add_argument("--threshold", type=int, default=200, help="N: flagged samples a round")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="CycleGAN preset")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait a swap")
    args = parser.parse_args()
    try:
        data = run(args)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
