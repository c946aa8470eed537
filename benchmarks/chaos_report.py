"""The chaos benchmark's numbers per fault window, its goals and its RESULTS.md section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.results import checks_line

KILL_WINDOW = 1.5  # s: the writer batches for 0.2 s; a killed replica's queue is younger


@dataclass
class Answer:
    sent: float  # seconds into the run
    ok: bool
    suspect: bool
    sha: str
    done: float = -1.0  # when the answer (or the error) came; -1: at ``sent``

    @property
    def at(self) -> float:
        """The time a window counts it at: when it ended, since a request in flight when a
        fault strikes fails because of that fault."""
        return self.done if self.done >= 0 else self.sent


def analyse(
    answers: list[Answer],
    faults: list[dict[str, Any]],
    stored: set[str],
    running: list[tuple[float, int]],
    end: float,
) -> list[dict[str, Any]]:
    """One row per window: before the first fault, then each fault until the next."""
    starts = [0.0] + [f["injected"] for f in faults]
    names = ["no fault (baseline)"] + [f["fault"] for f in faults]
    ordered = sorted(answers, key=lambda a: a.at)
    last_suspect: dict[str, float] = {}
    for a in ordered:
        if a.suspect:
            last_suspect[a.sha] = a.at
    rows = []
    for i, (start, name) in enumerate(zip(starts, names, strict=True)):
        stop = starts[i + 1] if i + 1 < len(starts) else end
        inside = [a for a in ordered if start <= a.at < stop]
        failed = [a.at for a in inside if not a.ok]
        # back: the first success after the window's last failure, in this window or later
        back = next((a.at for a in ordered if a.ok and failed and a.at > failed[-1]), end)
        lost = [sha for sha, t in last_suspect.items() if start <= t < stop and sha not in stored]
        row: dict[str, Any] = {
            "window": name,
            "requests": len(inside),
            "failed": len(failed),
            "suspects": len({a.sha for a in inside if a.suspect}),
            "rows_lost": len(lost),
            "most_rounds_running": max((n for t, n in running if start <= t < stop), default=0),
            "recovery_s": 0.0 if not failed else back - start,
        }
        if i > 0:
            fault = faults[i - 1]
            row.update(sigkill=fault["sigkill"], error=fault.get("error"))
            if fault["sigkill"]:  # the suspects a killed writer could still have queued
                row["suspects_in_last_batch_window"] = len(
                    {a.sha for a in answers if a.suspect and start - KILL_WINDOW <= a.at < start}
                )
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]], total: int) -> dict[str, bool]:
    faults = rows[1:]
    failed = sum(r["failed"] for r in rows)
    return {
        "every fault injected": all(r.get("error") is None for r in faults),
        "0 rows lost, no duplicate round (except SIGKILL)": all(
            r["most_rounds_running"] <= 1 and (r["sigkill"] or r["rows_lost"] == 0) for r in faults
        ),
        "SIGKILL loss <= the writer's last batch window": all(
            r["rows_lost"] <= r.get("suspects_in_last_batch_window", 0)
            for r in faults
            if r["sigkill"]
        ),
        "failed requests <= 0.5%": failed <= 0.005 * total,
        "service back within 30 s of each fault": all(r["recovery_s"] <= 30 for r in faults),
    }


def render(data: dict[str, Any]) -> str:
    setup = data["setup"]
    lines = [
        "## Chaos (issue 31)\n",
        f"{setup['minutes']:g} minutes at {setup['rate']:g} requests/s (10% triggered) against "
        "2 ingress and 2 ensemble replicas on PostgreSQL, with the repair watcher running "
        f"(a round at {setup['threshold']} samples); a fault every {setup['spacing_s']:g} s. "
        f"{data['requests']} requests, {data['failed']} failed "
        f"({100 * data['failed'] / max(data['requests'], 1):.2f}%).\n",
        "| window | requests | failed | suspects | rows lost | rounds running at most | "
        "back after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["windows"]:
        lost = str(r["rows_lost"])
        if "suspects_in_last_batch_window" in r:
            lost += f" (of {r['suspects_in_last_batch_window']} in its last 1.5 s)"
        lines.append(
            f"| {r['window']} | {r['requests']} | {r['failed']} | {r['suspects']} | {lost} | "
            f"{r['most_rounds_running']} | {r['recovery_s']:.1f} s |"
        )
    rounds = "; ".join(
        f"{r['round']} {r['status']}" + (f" ({r['error'][:90]})" if r["error"] else "")
        for r in data["rounds"]
    )
    lines.append(f"\nRounds in the store afterwards: {rounds}.")
    errors = [f"{f['fault']}: {f['error']}" for f in data["faults"] if f.get("error")]
    if errors:
        lines.append("\nFaults that could not be injected: " + "; ".join(errors) + ".")
    lines.append(f"\nGoals: {checks_line(data['checks'])}")
    return "\n".join(lines) + "\n"
