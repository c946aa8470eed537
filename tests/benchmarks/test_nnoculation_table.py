"""The NNoculation table's checks: a swapped-in round is not yet a repair."""

from __future__ import annotations

from typing import Any

from benchmarks.nnoculation_table import ATTACKS, checks


def _row(label: str, asr: list[float], ca: list[float], errors: int = 0) -> dict[str, Any]:
    names = ["BadNet alone", "round 0", "round 1"][: len(asr)]
    return {
        "label": label,
        "stages": [{"stage": n, "asr": a, "ca": c} for n, a, c in zip(names, asr, ca, strict=True)],
        "rounds": [{"errors": errors}] if len(asr) > 2 else [{"status": "rejected"}],
    }


def test_a_round_that_raises_asr_is_swapped_but_not_repaired() -> None:
    good = [_row(a, [1.0, 0.30, 0.015], [0.91, 0.89, 0.895]) for a in ATTACKS]
    assert checks(good) == {
        "all_attacks_swapped": True,
        "all_attacks_repaired": True,
        "final_asr_at_most_2": True,
        "ca_drop_at_most_2": True,  # 91.0 -> 89.5
        "no_request_failed": True,
    }
    worse = [*good[:-1], _row(ATTACKS[-1], [1.0, 0.23, 0.29], [0.91, 0.89, 0.89])]
    result = checks(worse)
    assert result["all_attacks_swapped"] and not result["all_attacks_repaired"]
    assert not result["final_asr_at_most_2"]
    unswapped = [*good[:-1], _row(ATTACKS[-1], [1.0, 0.23], [0.91, 0.89])]
    result = checks(unswapped)
    assert not result["all_attacks_swapped"] and not result["all_attacks_repaired"]
    assert result["no_request_failed"]  # a round never swapped in has no swap to fail
    assert not checks([*good[:-1], _row(ATTACKS[-1], [1.0, 0.3, 0.01], [0.91, 0.9, 0.9], 1)])[
        "no_request_failed"
    ]
