"""The rule that picks the smallest CycleGAN that still repairs."""

from __future__ import annotations

from typing import Any

from benchmarks.cyclegan_size import choose


def _result(asr: float, ca: float, seconds: float, ok: bool = True) -> dict[str, Any]:
    return {
        "summary": {
            "succeeded": 2 if ok else 1,
            "runs": 2,
            "asr": asr,
            "ca": ca,
            "cyclegan_seconds": seconds,
            "round_seconds": seconds + 10,
        }
    }


def test_the_smallest_configuration_within_a_point_of_the_best_is_chosen() -> None:
    """Smallest: fewest generator parameters, then fewest epochs; among those that repair."""
    data = {
        "attacks": [{"attack": "patch", "badnet_ca": 0.92}, {"attack": "blend", "badnet_ca": 0.91}],
        "results": {
            "tiny": {"patch": _result(0.30, 0.89, 10), "blend": _result(0.04, 0.89, 10)},
            "mid": {"patch": _result(0.055, 0.89, 40), "blend": _result(0.045, 0.89, 40)},
            "big": {"patch": _result(0.05, 0.89, 80), "blend": _result(0.04, 0.89, 80)},
            "cheap but costly in CA": {
                "patch": _result(0.05, 0.85, 20),
                "blend": _result(0.04, 0.89, 20),
            },
            "a seed failed": {
                "patch": _result(0.05, 0.89, 30, ok=False),
                "blend": _result(0.04, 0.89, 30),
            },
        },
    }
    data["configs"] = {
        "tiny": {"generator_params": 10, "epochs": 5},
        "mid": {"generator_params": 200, "epochs": 5},
        "big": {"generator_params": 200, "epochs": 10},
        "cheap but costly in CA": {"generator_params": 10, "epochs": 10},
        "a seed failed": {"generator_params": 50, "epochs": 10},
    }
    choice = choose(data)
    assert choice["repairs"] == {
        "tiny": False,  # 25 points above the best on patch
        "mid": True,
        "big": True,
        "cheap but costly in CA": False,  # 7 points below the BadNet
        "a seed failed": False,
    }
    assert choice["smallest"] == "mid"  # fewer parameters than big's, or as many and fewer epochs
    assert choice["cyclegan_seconds"]["big"] == 80


def test_a_configuration_is_named_by_the_preset_it_equals() -> None:
    """The table and the default check name a row by the preset it equals, seed aside."""
    from dataclasses import replace

    from benchmarks.cyclegan_size import CONFIGS, KEYS, preset_of

    assert preset_of(CONFIGS[KEYS["16x2x10"]].to_dict()) == "small"
    assert preset_of(replace(CONFIGS[KEYS["16x2x10"]], seed=3).to_dict()) == "small"
    assert preset_of(CONFIGS[KEYS["8x1x2"]].to_dict()) is None  # 'tiny' has batch size 16
    assert preset_of(CONFIGS[KEYS["32x3x10"]].to_dict()) is None
