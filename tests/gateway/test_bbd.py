"""A ``bbd-targeted`` round through the real app (issue 33): it swaps in and rolls back
under load with no failed request, runs R only where the suspect answers a flagged target,
and says so in /v1/models when it has no target and runs untargeted."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from core.bundle import load_bundle
from core.defenses import decide_batch
from core.defenses.bbd import NO_TARGETS, TargetedRejectPolicy
from core.images import encode_png
from core.pair import ModelPair, RoundDefense
from core.quarantine import pixel_sha256
from core.schema import QuarantineSample
from tests.gateway.conftest import (
    Gateway,
    Lab,
    activate,
    disagreeing_images,
    keeps_serving,
    swap_and_roll_back,
    under_load,
)
from tests.helpers import TARGET
from trainer.rounds import publish_round, running_round

pytestmark = pytest.mark.integration
CLIENTS, REQUESTS = 4, 600


def publish_bbd(gw: Gateway, lab: Lab, round_no: int, targets: list[int]) -> RoundDefense:
    """A bbd-targeted round: the lab's BadNet beside its GoodNet as R."""
    defense = RoundDefense("bbd-targeted", {"targets": targets})

    def write(out: Path) -> None:
        shutil.copytree(lab.badnet, out / "badnet")
        shutil.copytree(lab.goodnet, out / "goodnet")

    with running_round(gw.sessions, round_no):
        publish_round(
            sessions=gw.sessions, store=gw.store, round_no=round_no, write=write,
            metrics={}, activate=False, defense=defense,
        )  # fmt: skip
    return defense


def test_a_targeted_round_swaps_in_and_rolls_back_under_load(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwbbd", expose_members=True)  # round 0: the lab pair under nnoculation
    defense = publish_bbd(gw, lab, 1, [TARGET])
    images = np.concatenate([lab.triggered[:20], lab.clean[:20]])
    probes = [encode_png(img) for img in images]
    pair = ModelPair(1, load_bundle(lab.badnet), load_bundle(lab.goodnet), defense)
    expected = decide_batch(pair, images, TargetedRejectPolicy(defense.params))
    assert all(d.label is None for d in expected[:20])  # the trigger is withheld

    results, failures, _ = under_load(
        gw, probes, clients=CLIENTS, requests=REQUESTS, operator=swap_and_roll_back(gw, REQUESTS)
    )
    assert failures == [] and len(results) == REQUESTS
    order = [body["round"] for _, _, body in sorted(results, key=lambda r: r[0])]
    assert 1 in order and order[-1] == 0
    served = [(k, body) for _, k, body in results if body["round"] == 1]
    assert served
    for k, body in served:
        d = expected[k]
        assert body["label"] == d.label and body["suspect"] == d.suspect
        # R ran only where the suspect answered the target
        ran_r = d.badnet_label == TARGET
        assert (body["models"]["goodnet"] is not None) == ran_r
    info = keeps_serving(gw, 0, lab.clean[0], seconds=0.5)
    assert info["policy_note"] is None


def test_a_targeted_round_with_no_target_says_it_runs_untargeted(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwbbdnone", expose_members=True)
    publish_bbd(gw, lab, 1, [])
    activate(gw, 1)
    png = {"content-type": "image/png"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (
            gw.client.post("/predict", content=encode_png(lab.clean[0]), headers=png).json()[
                "round"
            ]
            == 1
        ):
            break
        time.sleep(0.2)
    info = keeps_serving(gw, 1, lab.clean[0], seconds=1.0)
    assert info["policy"] == "bbd-targeted" and info["policy_note"] == NO_TARGETS
    r = gw.client.post("/predict", content=encode_png(lab.clean[1]), headers=png)
    assert r.json()["models"]["goodnet"] is not None  # untargeted: R runs on every input
    fresh, bad, good = disagreeing_images(lab, 8, seed=900)
    for img in fresh:  # rejected, and quarantined like any suspect input
        body = gw.client.post("/predict", content=encode_png(img), headers=png).json()
        assert body["label"] is None and body["suspect"]
    rows: list[QuarantineSample] = []
    while time.monotonic() < deadline + 20 and len(rows) < len(fresh):
        with gw.sessions() as s:
            rows = list(
                s.scalars(
                    select(QuarantineSample).where(
                        QuarantineSample.served_round == 1,
                        QuarantineSample.pixel_sha256.in_([pixel_sha256(i) for i in fresh]),
                    )
                )
            )
        time.sleep(0.2)
    assert len(rows) == len(fresh) and all(r.detector == "bbd-targeted" for r in rows)
    assert sorted(r.badnet_label for r in rows) == sorted(bad.tolist())
    assert sorted(r.goodnet_label for r in rows) == sorted(good.tolist())
