"""Hot swap under load: 8 concurrent clients, rounds activated through the store and through
/admin/activate, a corrupt bundle refused; no request fails and no response mixes rounds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.bundle import WEIGHTS_NAME
from core.db import transaction
from core.images import encode_png
from core.quarantine import activate_round
from tests.gateway.conftest import Gateway, Lab, keeps_serving, publish_pair, under_load
from tests.helpers import ADMIN

pytestmark = pytest.mark.integration
CLIENTS, REQUESTS = 8, 1200


def test_swaps_under_load_drop_nothing_and_never_mix(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwswap")
    # Round 1 swaps the roles, so a mixed pair would show on the triggered probes.
    publish_pair(gw.sessions, gw.store, 1, lab.goodnet, lab.badnet, activate=False)
    probes = [encode_png(img) for img in lab.triggered[:40]]
    expected = {
        0: [
            (int(b), int(g)) for b, g in zip(lab.bad_labels[:40], lab.good_labels[:40], strict=True)
        ],
        1: [
            (int(g), int(b)) for b, g in zip(lab.bad_labels[:40], lab.good_labels[:40], strict=True)
        ],
    }

    def operator(answers: list[Any]) -> list[tuple[int, float]]:
        switches = []
        while len(answers) < REQUESTS // 3:
            time.sleep(0.01)
        with transaction(gw.sessions) as s:
            activate_round(session=s, round_no=1, activated_by="test")
        switches.append((1, time.monotonic()))
        while len(answers) < 2 * REQUESTS // 3:
            time.sleep(0.01)
        r = httpx.post(
            f"{gw.url}/admin/activate",
            json={"round": 0},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        switches.append((0, time.monotonic()))
        return switches

    answers, failures, switches = under_load(
        gw, probes, clients=CLIENTS, requests=REQUESTS, operator=operator
    )
    results = [
        (t, k, body["round"], (body["models"]["badnet"], body["models"]["goodnet"]))
        for t, k, body in answers
    ]
    assert failures == []
    assert len(results) == REQUESTS
    for _, k, round_no, models in results:  # every answer is one round's pair, whole
        assert models == expected[round_no][k], (round_no, k, models)
    for new_round, at in switches:
        answered = sorted(t for t, _, r, _ in results if r == new_round and t >= at)
        assert (
            answered and answered[0] - at <= 5.0
        ), f"round {new_round} took {answered[0] - at if answered else None}s"
        after = [
            r for t, _, r, _ in results if at + 5.0 <= t and (new_round == 0 or t < switches[1][1])
        ]
        assert all(r == new_round for r in after)
    assert {r for _, _, r, _ in results} == {0, 1}


def test_a_corrupt_bundle_is_refused_and_the_old_round_keeps_serving(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwcorrupt")
    path = publish_pair(gw.sessions, gw.store, 1, lab.badnet, lab.goodnet, activate=False)
    weights = Path(path) / "goodnet" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))  # the file no longer matches its registered sha256
    with transaction(gw.sessions) as s:
        activate_round(session=s, round_no=1, activated_by="test")
    model = keeps_serving(gw, 0, lab.clean[0])
    assert model["round"] == 0
    assert model["swap_failures"] == 1  # counted once, then retried only after a back-off
    assert "round 1" in model["last_swap_failure"] and "sha256" in model["last_swap_failure"]
