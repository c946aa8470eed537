"""The sequential attacker's table: each ASR beside its floor, and where a residual lies."""

from __future__ import annotations

from benchmarks.sequential_attacker import render


def test_the_table_gives_each_asr_its_clean_floor_and_the_classes_that_carry_a_residual() -> None:
    stage = lambda name, t3: {  # noqa: E731
        "stage": name,
        "ca": 0.89,
        "asr": {"t1": 0.01, "t2": 0.0, "t3": t3},
        "clean_target": {"t1": 0.005, "t2": 0.0, "t3": 0.024},
    }
    data = {
        "attack": "multi-target",
        "triggers": ["t1", "t2", "t3"],
        "class_names": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt"],
        "stages": [stage("BadNet", 1.0), stage("round 2 GoodNet", 0.04)],
        "rounds": [],
        # as JSON gives it back: class keys are strings, tuples are lists
        "residual": {
            "stage": "round 2 GoodNet",
            "t3": {"1": [492, 0.002, 0.004], "4": [492, 0.089, 0.134], "6": [486, 0.091, 0.142]},
        },
        "checks": {"round2_removes_all_three": False},
    }
    text = render(data)
    assert "| round 2 GoodNet | 89.00 | 1.00 (0.50) | 0.00 (0.00) | 4.00 (2.40) |" in text
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| 6 Shirt") or line.startswith("| 4 Coat")
    ]
    # sorted by the images the trigger moves: shirt 25, coat 22
    assert rows == ["| 6 Shirt | 486 | 9.1 | 14.2 | 25 |", "| 4 Coat | 492 | 8.9 | 13.4 | 22 |"]
    assert "Where t3 still works on the round 2 GoodNet" in text
    assert "round2_removes_all_three: FAIL" in text

    data["residual"] = {}  # every trigger at or under the goal: no residual table
    assert "still works" not in render(data)
