"""benchmarks.refactor_check calls a refactor behaviour-preserving only on identical rounds."""

from __future__ import annotations

import copy
from typing import Any

from benchmarks.refactor_check import compare, render

RUN: dict[str, Any] = {
    "provenance": {"command": "python -m benchmarks.repair_round", "commit": "a", "date": "d"},
    "repair": {"epochs": 20},
    "cyclegan": {"ngf": 4},
    "rows": [
        {
            "attack": "patch",
            "status": "succeeded",
            "kept": 120,
            "round1_goodnet_ca": 0.8934,
            "round1_goodnet_asr": 0.0211,
            "round1_badnet_ca": 0.8812,
            "round1_badnet_asr": 0.0301,
            "round_seconds": 80.0,
        }
    ],
}


def test_identical_rounds_pass_and_one_changed_digit_fails() -> None:
    after = copy.deepcopy(RUN)
    after["provenance"]["commit"] = "b"
    after["rows"][0]["round_seconds"] = 95.0  # time may move
    data = compare(RUN, after)
    assert data["checks"] == {"same_config": True, "round1_identical": True}
    assert "| patch | 120 / 120 | 89.34 / 89.34 |" in render(data)
    after["rows"][0]["round1_goodnet_asr"] = 0.0212
    assert not compare(RUN, after)["checks"]["round1_identical"]
    after["repair"] = {"epochs": 20, "policy": "goodnet"}  # a field only one run has
    assert compare(RUN, after)["checks"]["same_config"]
    assert "only after: {'policy': 'goodnet'}" in render(compare(RUN, after))
    after["repair"] = {"epochs": 10}
    assert not compare(RUN, after)["checks"]["same_config"]
    assert not compare(RUN, {**after, "rows": []})["checks"]["round1_identical"]
