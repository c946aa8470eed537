"""A single-model round (CoDefend: the suspect alone under STRIP) through the real app:
it serves, swaps in and rolls back under load with no failed request, its quarantine
rows keep STRIP's entropy, and a round over the overlay cap does not serve (issue 32)."""

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
from core.defenses.strip import StripPolicy
from core.images import encode_png
from core.pair import ModelPair, RoundDefense
from core.quarantine import pixel_sha256
from core.schema import QuarantineSample
from core.strip import StripParams
from tests.gateway.conftest import (
    Gateway,
    Lab,
    activate,
    disagreeing_images,
    keeps_serving,
    swap_and_roll_back,
    under_load,
)
from tests.helpers import SHAPE, make_blobs
from trainer.rounds import publish_round, running_round
from trainer.strip import StripConfig, fit_strip

pytestmark = pytest.mark.integration
CLIENTS, REQUESTS = 4, 600
PNG = {"content-type": "image/png"}


def fitted(lab: Lab, overlays: int = 16) -> StripParams:
    bad = load_bundle(lab.badnet)
    clean = make_blobs(1000, shape=SHAPE, classes=4, seed=11)
    cfg = StripConfig(strip_overlays=overlays, strip_frr=0.05)
    return fit_strip(bad.model, bad.manifest.input, 4, clean, cfg)


def publish_codefend(gw: Gateway, lab: Lab, round_no: int, strip: StripParams) -> None:
    def write(out: Path) -> None:
        shutil.copytree(lab.badnet, out / "badnet")

    with running_round(gw.sessions, round_no):
        publish_round(
            sessions=gw.sessions,
            store=gw.store,
            round_no=round_no,
            write=write,
            metrics={},
            activate=False,
            defense=RoundDefense("codefend", {"strip": strip.to_dict()}),
        )


def test_a_single_model_round_swaps_in_and_rolls_back_under_load(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwcodefend")  # round 0: the lab pair under nnoculation
    strip = fitted(lab)
    publish_codefend(gw, lab, 1, strip)
    images = np.concatenate([lab.triggered[:20], lab.clean[:20]])
    probes = [encode_png(img) for img in images]
    bad = load_bundle(lab.badnet)
    alone = ModelPair(1, bad, None, RoundDefense("codefend", {"strip": strip.to_dict()}))
    expected = decide_batch(alone, images, StripPolicy(alone.defense.params))
    assert all(d.suspect for d in expected[:20])  # STRIP sees the lab's patch trigger

    # round 1: the suspect alone, STRIP decides; the rollback serves the pair again
    results, failures, _ = under_load(
        gw, probes, clients=CLIENTS, requests=REQUESTS, operator=swap_and_roll_back(gw, REQUESTS)
    )
    assert failures == [] and len(results) == REQUESTS
    order = [body["round"] for _, _, body in sorted(results, key=lambda r: r[0])]
    assert 1 in order and order[-1] == 0
    single = [(k, body) for _, k, body in results if body["round"] == 1]
    assert single
    for k, body in single:
        assert body["models"] == {"badnet": expected[k].badnet_label, "goodnet": None}
        assert body["label"] == expected[k].label and body["suspect"] == expected[k].suspect
    _check_rows(gw, lab, strip)


def _check_rows(gw: Gateway, lab: Lab, strip: StripParams) -> None:
    """Fresh triggered images sent to round 1 are quarantined with no goodnet label and
    STRIP's entropy <= sigma (images seen before merge into their round-0 rows)."""
    activate(gw, 1)
    fresh = disagreeing_images(lab, 8, seed=900)[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait with a clean image: a fresh one sent to
        # round 0 would be quarantined there, and its round-1 answer merge into that row
        r = gw.client.post("/predict", content=encode_png(lab.clean[0]), headers=PNG)
        if r.json()["round"] == 1:
            break
        time.sleep(0.2)
    hashes = [pixel_sha256(img) for img in fresh]
    for img in fresh:
        assert gw.client.post("/predict", content=encode_png(img), headers=PNG).json()["suspect"]
    rows: list[QuarantineSample] = []
    while time.monotonic() < deadline + 20 and len(rows) < len(fresh):
        with gw.sessions() as s:
            rows = list(
                s.scalars(
                    select(QuarantineSample).where(
                        QuarantineSample.served_round == 1,
                        QuarantineSample.pixel_sha256.in_(hashes),
                    )
                )
            )
        time.sleep(0.2)
    assert len(rows) == len(fresh), "round 1's quarantine rows did not arrive"
    for row in rows:
        assert row.goodnet_label is None and row.detector == "strip"
        assert row.strip_entropy is not None and row.strip_entropy <= strip.sigma
    activate(gw, 0)


def test_a_round_over_the_overlay_cap_does_not_serve(
    gateway_factory: Callable[..., Gateway], lab: Lab
) -> None:
    gw = gateway_factory("gwcap", strip_max_overlays=8)
    publish_codefend(gw, lab, 1, fitted(lab, overlays=16))
    activate(gw, 1)
    model = keeps_serving(gw, 0, lab.clean[0])
    assert model["round"] == 0
    assert "16 overlays per input, above the configured maximum of 8" in model["last_swap_failure"]
