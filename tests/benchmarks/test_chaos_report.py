"""The chaos benchmark's accounting: per-window failures, lost rows, recovery, goals."""

from __future__ import annotations

from benchmarks.chaos_report import Answer, analyse, goals, render


def _faults() -> list[dict[str, object]]:
    return [
        {"fault": "replica SIGKILL", "sigkill": True, "injected": 10.0},
        {"fault": "database stopped", "sigkill": False, "injected": 20.0},
    ]


def test_each_window_counts_its_failures_losses_and_recovery() -> None:
    answers = [Answer(t / 2, True, t % 4 == 0, f"s{t}") for t in range(60)]  # 0-29.5 s
    answers[18] = Answer(9.0, True, True, "k")  # a suspect 1 s before the kill
    answers[25] = Answer(12.5, False, False, "x")  # a failure 2.5 s after the kill
    answers[45] = Answer(22.5, False, False, "y")
    answers[47] = Answer(23.5, False, False, "z")  # back at 24.0
    stored = {a.sha for a in answers if a.suspect} - {"s8", "s44"}  # lost: 4.0 s and 22.0 s
    rows = analyse(answers, _faults(), stored, [(1.0, 1), (21.0, 2)], end=30.0)
    base, kill, db = rows
    assert (base["requests"], base["failed"], base["rows_lost"]) == (20, 0, 1)
    assert (kill["failed"], kill["recovery_s"], kill["rows_lost"]) == (1, 3.0, 0)
    assert kill["suspects_in_last_batch_window"] == 1  # k at 9.0 s; s16 at 8.0 s is older
    assert (db["failed"], db["recovery_s"], db["rows_lost"]) == (2, 4.0, 1)
    assert db["most_rounds_running"] == 2
    checks = goals(rows, total=len(answers))
    assert not checks["0 rows lost, no duplicate round (except SIGKILL)"]
    assert not checks["failed requests <= 0.5%"]  # 3 of 60
    assert checks["service back within 30 s of each fault"]


def test_a_clean_run_passes_and_renders() -> None:
    answers = [Answer(t / 2, True, t % 4 == 0, f"s{t}") for t in range(60)]
    stored = {a.sha for a in answers}
    rows = analyse(answers, _faults(), stored, [(1.0, 1)], end=30.0)
    checks = goals(rows, total=len(answers))
    assert all(checks.values()), checks
    data = {
        "setup": {"minutes": 0.5, "rate": 2, "spacing_s": 10, "threshold": 5},
        "requests": 60, "failed": 0, "windows": rows, "faults": _faults(), "checks": checks,
        "rounds": [{"round": 0, "status": "succeeded", "error": ""}],
    }  # fmt: skip
    text = render(data)
    assert "| database stopped | 20 | 0 |" in text and "0 succeeded" in text
