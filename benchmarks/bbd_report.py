"""The goals and the RESULTS.md section of ``benchmarks.bbd_table``."""

from __future__ import annotations

from typing import Any

from benchmarks.results import checks_line

FAR_GOAL, FRR_GOAL, SPEED_GOAL = 0.01, 0.02, 1.5
# The papers' numbers, typed from the papers for reference (DEFENSES.md).
PAPER_FP = {"MNIST-AAA (003 Table 5)": (91.31, 2.17), "CIFAR10-TCA (003 Table 5)": (78.77, 42.28)}
PAPER_BBD = {"Sunglasses (004 Table 4)": (0.0, 3.9e-5, 94.9), "Multi-trigger": (0.0, 0.0, 94.1)}
NC_PAPER = "paper 003 reports that Neural Cleanse found the right target for 2 of 8 BadNets"
MISSES = {
    "all-to-all": "every class is a target (y -> y+1), so no class's trigger is an outlier",
    "warp": "a global warp is no small patch: its mask L1 is not small",
    "filter": "a global colour filter touches every pixel: a large-norm trigger",
    "multi-target": "three targets at once pull the median and the MAD toward small L1s",
    "combo": "it fires only with both patches, while covers taught the model to ignore "
    "either alone, so no small single mask reaches it",
}


def found(row: dict[str, Any]) -> bool:
    """Whether Neural Cleanse flagged every one of the attack's true targets (one class of
    an all-to-all attack's ten is not its target found)."""
    return bool(row["targets"]) and set(row["true_target"]) <= set(row["targets"])


def checks(data: dict[str, Any]) -> dict[str, bool]:
    rows = [r for r in data["rows"] if found(r)]
    out = {
        "far_at_most_1pct_where_flagged": bool(rows)
        and all(r["bbd_targeted"]["far"] <= FAR_GOAL for r in rows),
        "frr_at_most_2pct_where_flagged": bool(rows)
        and all(r["bbd_targeted"]["frr"] <= FRR_GOAL for r in rows),
    }
    if data.get("throughput"):
        out["targeted_1.5x_ensemble"] = data["throughput"]["ratio_median"] >= SPEED_GOAL
    return out


def _p(v: float) -> str:
    return f"{100 * v:.2f}"


def _fine_pruning(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "**Fine-Pruning alone** (Liu et al.'s rule: prune until validation CA drops 4 points, "
        "then fine-tune; R's own answer through the live `bbd-untargeted` round):",
        "",
        "| attack | pruned | CA % | ASR % | suspect CA % | suspect ASR % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp, u = r["fine_pruning_4pt"], r["bbd_untargeted"]
        lines.append(
            f"| {r['attack']} | {fp['pruned']}/{fp['channels_total']} | {_p(u['r_ca'])} | "
            f"{_p(u['r_asr'])} | {_p(u['b_ca'])} | {_p(u['b_asr'])} |"
        )
    for k, (ca, asr) in PAPER_FP.items():
        lines.append(f"| paper: {k} | | {ca} | {asr} | | |")
    return lines


def _neural_cleanse(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "**Neural Cleanse** (anomaly index per class, 0-9; flagged: L1 below the median and "
        "index above 2; CA/ASR after unlearning the flagged triggers, served live):",
        "",
        "| attack | true target | flagged | right? | anomaly index by class | CA % after | ASR % after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nc = r["neural_cleanse"]
        idx = " ".join(f"{a:.1f}" for a in nc["anomaly_index"])
        after = r.get("unlearned")
        ca, asr = (_p(after["r_ca"]), _p(after["r_asr"])) if after else ("n/a", "n/a")
        lines.append(
            f"| {r['attack']} | {r['true_target']} | {r['targets'] or 'none'} | "
            f"{'yes' if found(r) else 'no'} | {idx} | {ca} | {asr} |"
        )
    hits = sum(found(r) for r in rows)
    lines += ["", f"Ours: the right target for {hits} of {len(rows)} BadNets; {NC_PAPER}."]
    lines += [
        f"- {k}: {why}."
        for k, why in MISSES.items()
        if not any(r["attack"] == k and found(r) for r in rows)
    ]
    return lines


def _bbd(rows: list[dict[str, Any]], load: dict[str, Any] | None) -> list[str]:
    lines = [
        "",
        "**BBD** (held-out split; FRR: clean inputs rejected; FAR: triggered inputs answered "
        "with the attacker's label; accuracy on the clean inputs answered; forwards per clean "
        "request):",
        "",
        "| attack | rule | R pruned | FRR % | FAR % | triggered rejected % | accuracy % | forwards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, rule, fp in (
            ("bbd_targeted", "targeted", r["fine_pruning_budget"]),
            ("bbd_untargeted", "untargeted", r["fine_pruning_4pt"]),
        ):
            m = r[key]
            lines.append(
                f"| {r['attack']} | {rule} | {fp['pruned']}/{fp['channels_total']} | {_p(m['frr'])} | "
                f"{_p(m['far'])} | {_p(m['rejected_triggered'])} | {_p(m['accuracy_answered'])} | "
                f"{1 + m['r_share_clean']:.2f} |"
            )
    for k, (frr, far, acc) in PAPER_BBD.items():
        lines.append(f"| paper: {k} | targeted | | {frr} | {far} | | {acc} | |")
    if load:
        runs = ", ".join(f"{a:.2f}" for a in load["ratios"])
        lines += [
            "",
            f"Throughput, concurrency 8, {load['requests']} clean held-out requests: "
            f"`bbd-targeted` / `nnoculation` ensemble = {load['ratio_median']:.2f}x "
            f"(median; runs {runs}). The policies alone, in process on batches of 32: "
            f"{load['in_process']['ratio']:.2f}x.",
        ]
    return lines


def render(data: dict[str, Any]) -> str:
    rows = data["rows"]
    lines = [
        "BBD (paper 004), Fine-Pruning (Liu et al., RAID'18) and Neural Cleanse (Wang et "
        "al., S&P'19) on the eight-attack zoo, through the live gateway, held-out split. "
        f"Goals: {checks_line(data['checks'])}.",
        "",
        *_fine_pruning(rows),
        *_neural_cleanse(rows),
        *_bbd(rows, data.get("throughput")),
    ]
    return "\n".join(lines) + "\n"
