"""Behaviour kept across a refactor: two runs of ``benchmarks.repair_round``, before and after.

    python -m benchmarks.refactor_check --before BEFORE.json --after AFTER.json

Each input is the ``docs/results/repair_round.json`` a run wrote (the same zoo, attacks,
seed and options, on the commits its provenance names). For every attack, round 1's CA and
ASR of both members must agree to the last digit; the table shows them side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.results import checks_line, provenance, publish

NAME = "refactor_check"
COMPARED = [
    "status",
    "kept",
    "round1_goodnet_ca",
    "round1_goodnet_asr",
    "round1_badnet_ca",
    "round1_badnet_asr",
]


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per attack, the compared values of both runs and whether each agrees exactly."""
    rows = []
    after_rows = {r["attack"]: r for r in after["rows"]}
    for b in before["rows"]:
        a = after_rows.get(b["attack"], {})
        values = {k: {"before": b.get(k), "after": a.get(k)} for k in COMPARED}
        rows.append(
            {
                "attack": b["attack"],
                "values": values,
                "identical": all(v["before"] == v["after"] for v in values.values()),
                "round_seconds": {"before": b["round_seconds"], "after": a.get("round_seconds")},
            }
        )
    fields = {
        part: {
            "differ": sorted(
                k for k in set(before[part]) & set(after[part]) if before[part][k] != after[part][k]
            ),
            "only_before": {k: before[part][k] for k in set(before[part]) - set(after[part])},
            "only_after": {k: after[part][k] for k in set(after[part]) - set(before[part])},
        }
        for part in ("repair", "cyclegan")
    }
    # a field the refactor moved elsewhere (the policy, now the round's defense) may go;
    # every field both runs have must agree
    same_setup = not any(f["differ"] for f in fields.values())
    return {
        "provenance": provenance(),
        "before": before["provenance"],
        "after": after["provenance"],
        "config_fields": fields,
        "rows": rows,
        "checks": {
            "same_config": same_setup,
            "round1_identical": bool(rows) and all(r["identical"] for r in rows),
        },
    }


def render(data: dict[str, Any]) -> str:
    b, a = data["before"], data["after"]
    lines = [
        "## Behaviour kept across the repair refactor (issue 30)",
        "",
        f"`{b['command']}` at commit `{b['commit']}` ({b['date']}) against the same command at "
        f"`{a['commit']}` ({a['date']}): round 1 on the same zoo BadNets, seed and options. "
        "Each cell is before / after; the round's wall time is the one value allowed to move.",
        "",
        "| attack | kept | round 1 GoodNet CA % | round 1 GoodNet ASR % | round 1 BadNet CA % | "
        "round 1 BadNet ASR % | identical | round s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in data["rows"]:
        v = r["values"]
        cells = [f"{v['kept']['before']} / {v['kept']['after']}"] + [
            f"{pct(v[k]['before'])} / {pct(v[k]['after'])}" for k in COMPARED[2:]
        ]
        s = r["round_seconds"]
        lines.append(
            f"| {r['attack']} | {' | '.join(cells)} | {'yes' if r['identical'] else 'NO'} | "
            f"{s['before']:.0f} / {s['after'] or 0:.0f} |"
        )
    moved = {k: v for f in data["config_fields"].values() for k, v in f["only_before"].items()}
    added = {k: v for f in data["config_fields"].values() for k, v in f["only_after"].items()}
    if moved or added:
        lines += [
            "",
            f"Config fields only before: {moved or 'none'}; only after: {added or 'none'}. "
            "Every field both runs have agrees.",
        ]
    lines += ["", checks_line(data["checks"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    args = parser.parse_args()
    data = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
