"""Rounds carry their defense: the gateway serves the active round's policy, swaps it under
load without a failed request, and serves a defense registered in test code."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from core.bundle import load_bundle
from core.defenses import decide_batch
from core.images import encode_png
from core.pair import ModelPair, RoundDefense
from tests.gateway.conftest import (
    Gateway,
    Lab,
    activate,
    keeps_serving,
    publish_pair,
    swap_and_roll_back,
    under_load,
)
from tests.plugins.mirror_defense import MirrorCheckPolicy

pytestmark = pytest.mark.integration
CLIENTS, REQUESTS = 4, 600


def test_a_swap_changes_the_defense_under_load_and_a_rollback_restores_it(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwdefense")  # round 0: nnoculation
    publish_pair(
        gw.sessions,
        gw.store,
        1,
        lab.badnet,
        lab.goodnet,
        activate=False,
        defense="nnoculation-reject",
    )
    images = np.concatenate([lab.triggered[:20], lab.clean[:20]])
    probes = [encode_png(img) for img in images]
    good = np.concatenate([lab.good_labels[:20], lab.clean_labels[:20]])
    triggered = np.arange(len(images)) < 20

    # round 1: the reject rule on the same models; the rollback restores the GoodNet policy
    results, failures, _ = under_load(
        gw, probes, clients=CLIENTS, requests=REQUESTS, operator=swap_and_roll_back(gw, REQUESTS)
    )
    assert failures == [] and len(results) == REQUESTS
    order = [body["round"] for _, _, body in sorted(results, key=lambda r: r[0])]
    assert 1 in order and order[-1] == 0  # it served round 1, then round 0 again
    for _, k, body in results:
        assert body["suspect"] == bool(triggered[k])
        if body["round"] == 1 and triggered[k]:
            assert body["label"] is None and body["class_name"] is None  # withheld
        else:
            assert body["label"] == int(good[k])  # the GoodNet's answer


def test_a_defense_from_test_code_serves_through_the_real_app(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    """One module (tests/plugins/mirror_defense.py) and its registry entry: the app imports
    it from BQG_DEFENSE_MODULES and serves it, with no other change."""
    gw = gateway_factory(
        "gwmirror", defense="mirror-check", defense_modules=["tests.plugins.mirror_defense"]
    )
    images = np.concatenate([lab.triggered[:16], lab.clean[:16]])
    bad, good = load_bundle(lab.badnet), load_bundle(lab.goodnet)
    pair = ModelPair(0, bad, good, RoundDefense("mirror-check"))
    expected = decide_batch(pair, images, MirrorCheckPolicy())
    assert any(d.label is None for d in expected) and any(d.label is not None for d in expected)
    served = [
        gw.client.post("/predict", content=encode_png(img), headers={"content-type": "image/png"})
        for img in images
    ]
    assert all(r.status_code == 200 for r in served)
    assert [r.json()["label"] for r in served] == [d.label for d in expected]
    assert [r.json()["suspect"] for r in served] == [d.suspect for d in expected]
    model = gw.client.get("/v1/models").json()["models"][0]
    assert model["defense"] == "mirror-check" and model["policy"] == "mirror-check"


def test_a_round_naming_an_unknown_defense_is_refused_and_the_old_one_serves(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwunknown")
    publish_pair(gw.sessions, gw.store, 1, lab.badnet, lab.goodnet, activate=False, defense="strp")
    activate(gw, 1)
    model = keeps_serving(gw, 0, lab.clean[0])
    assert model["round"] == 0 and model["defense"] == "nnoculation"
    assert "unknown defense 'strp'" in model["last_swap_failure"]
