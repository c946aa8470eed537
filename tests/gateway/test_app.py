"""The gateway app over real HTTP: the contract, both policies, the quarantine rows, bad input."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from benchmarks.hostile_http import goals, hammer
from core.images import encode_png
from core.quarantine import pending_count
from core.schema import QuarantineSample
from tests.gateway.conftest import Gateway, Lab
from tests.helpers import ADMIN

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory("gw", client_header="X-Client-Id")


@pytest.fixture(scope="module")
def gw_reject(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory("gwreject", defense="nnoculation-reject")


def _png(img: np.ndarray) -> bytes:
    return encode_png(img)


def _post_png(gw: Gateway, img: np.ndarray, **headers: str) -> dict:
    r = gw.client.post(
        "/predict", content=_png(img), headers={"content-type": "image/png", **headers}
    )
    assert r.status_code == 200, r.text
    return r.json()


def _rows(gw: Gateway) -> list[QuarantineSample]:
    with gw.sessions() as s:
        return list(s.scalars(select(QuarantineSample).order_by(QuarantineSample.id)))


def _flush(gw: Gateway) -> None:
    from ray import serve

    assert serve.get_app_handle(gw.name)  # the app exists
    handle = serve.get_deployment_handle("Ensemble", app_name=gw.name)
    assert handle.flush.remote().result(timeout_s=30)


def test_goodnet_policy_answers_and_quarantines_only_disagreements(gw: Gateway, lab: Lab) -> None:
    for img, label in zip(lab.clean[:20], lab.clean_labels[:20], strict=True):
        body = _post_png(gw, img, **ADMIN)
        assert body == {
            "label": int(label),
            "class_name": str(label),
            "suspect": False,
            "round": 0,
            "models": {"badnet": int(label), "goodnet": int(label)},
        }
    _flush(gw)
    assert _rows(gw) == []  # agreement writes no row
    seen: list[str] = []
    for img, bad, good in zip(
        lab.triggered[:15], lab.bad_labels[:15], lab.good_labels[:15], strict=True
    ):
        who = {"x-client-id": "alice"} if len(seen) < 10 else {}  # the proxy names alice
        seen.append(who.get("x-client-id", "127.0.0.1"))  # else: the peer address
        body = _post_png(gw, img, **ADMIN, **who)
        assert body["suspect"] is True and body["label"] == int(good) and body["round"] == 0
        assert body["models"] == {"badnet": int(bad), "goodnet": int(good)}
    _flush(gw)
    rows = _rows(gw)
    assert len(rows) == 15  # one row per disagreement
    for row, bad, good in zip(rows, lab.bad_labels[:15], lab.good_labels[:15], strict=True):
        assert (
            row.badnet_label,
            row.goodnet_label,
            row.served_round,
            row.detector,
            row.hit_count,
        ) == (int(bad), int(good), 0, "goodnet", 1)
        assert 0 < row.badnet_score <= 1 and row.consumed_by_round is None
    assert [row.client for row in rows] == seen
    # an ordinary client learns the answer, not which member said what
    assert _post_png(gw, lab.clean[0])["models"] is None


def test_reject_policy_withholds_the_label_of_suspects(gw_reject: Gateway, lab: Lab) -> None:
    body = _post_png(gw_reject, lab.triggered[0])
    assert body["label"] is None and body["class_name"] is None and body["suspect"] is True
    clean = _post_png(gw_reject, lab.clean[0])
    assert clean["label"] == int(lab.clean_labels[0]) and clean["suspect"] is False
    _flush(gw_reject)
    rows = _rows(gw_reject)
    assert len(rows) == 1 and rows[0].detector == "reject"


def test_every_input_form_gives_the_same_answer(gw: Gateway, lab: Lab) -> None:
    img = lab.clean[1]
    expected = _post_png(gw, img)
    as_b64 = gw.client.post("/predict", json={"image": base64.b64encode(_png(img)).decode()})
    as_pixels = gw.client.post("/predict", json={"pixels": img[:, :, 0].tolist()})
    kserve = gw.client.post(
        "/v1/models/gateway:predict",
        json={"instances": [{"b64": base64.b64encode(_png(img)).decode()}, img.tolist()]},
    )
    assert as_b64.json() == expected and as_pixels.json() == expected
    assert kserve.status_code == 200 and kserve.json() == {"predictions": [expected, expected]}
    jpeg = io.BytesIO()
    Image.fromarray(img[:, :, 0]).save(jpeg, format="JPEG", quality=95)
    r = gw.client.post("/predict", content=jpeg.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["round"] == 0


def test_health_models_and_openapi(gw: Gateway, lab: Lab) -> None:
    health = gw.client.get("/healthz").json()
    assert health["status"] == "ok" and health["round"] == 0
    (model,) = gw.client.get("/v1/models").json()["models"]
    from core.bundle import read_manifest

    assert model["name"] == "gateway" and model["policy"] == "goodnet" and model["round"] == 0
    assert model["defense"] == "nnoculation"
    assert model["hashes"]["badnet"] == read_manifest(lab.badnet).weights_sha256
    assert model["input"] == {"height": 28, "width": 28, "channels": 1}
    spec = gw.client.get("/openapi.json").json()
    assert {
        "/predict",
        "/v1/models/{name}:predict",
        "/healthz",
        "/v1/models",
        "/admin/activate",
    } <= set(spec["paths"])
    assert gw.client.get("/docs").status_code == 200


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buf, format="GIF")
    return buf.getvalue()


JSON = {"content-type": "application/json"}
PNG = {"content-type": "image/png"}


def _pixels(odd: object) -> list[list[object]]:
    """28x28 pixels of 0 whose first value is ``odd``."""
    rows: list[list[object]] = [[0] * 28 for _ in range(28)]
    rows[0][0] = odd
    return rows


NAMED_CASES = {
    "truncated png": (
        dict(
            content=encode_png(np.full((28, 28, 1), 9, np.uint8))[:40],
            headers={"content-type": "image/png"},
        ),
        400,
        "truncated or corrupt",
    ),
    "empty body": (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
    "20 MB body": (
        dict(
            content=b"\x89PNG\r\n\x1a\n" + b"\x00" * (20 * 1024 * 1024),
            headers={"content-type": "image/png"},
        ),
        413,
        "limit",
    ),
    "wrong dimensions": (
        dict(
            content=encode_png(np.zeros((32, 32, 1), np.uint8)),
            headers={"content-type": "image/png"},
        ),
        400,
        "expects 28x28x1",
    ),
    "3 channels to a 1-channel model": (
        dict(
            content=encode_png(np.zeros((28, 28, 3), np.uint8)),
            headers={"content-type": "image/png"},
        ),
        400,
        "convert it to grey",
    ),
    "gif": (dict(content=_gif(), headers={"content-type": "image/gif"}), 415, "image/gif"),
    "gif sent as png": (dict(content=_gif(), headers={"content-type": "image/png"}), 415, "GIF"),
    "bad base64": (dict(json={"image": "not base64!!"}), 400, "not valid base64"),
    "nan pixels": (
        dict(
            content=json.dumps({"pixels": _pixels(float("nan"))}).encode(),
            headers={"content-type": "application/json"},
        ),
        400,
        "NaN",
    ),
    "out-of-range pixels": (dict(json={"pixels": _pixels(300)}), 400, "0..255"),
    "pixels as strings": (dict(json={"pixels": _pixels("255")}), 400, "not str"),
    "pixels as booleans": (dict(json={"pixels": _pixels(True)}), 400, "not bool"),
    "a 401-digit pixel": (
        dict(content=b'{"pixels": [[1' + b"0" * 400 + b"]]}", headers=JSON),
        400,
        "too large",
    ),
    "a 10,000-digit integer": (
        dict(content=b'{"pixels": [[' + b"9" * 10_000 + b"]]}", headers=JSON),
        400,
        "not valid JSON",
    ),
    "JSON nested 5,000 deep": (
        dict(content=b'{"pixels": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=JSON),
        400,
        "nested too deeply",
    ),
    "a 4096x4096 PNG": (
        dict(content=encode_png(np.zeros((4096, 4096, 1), np.uint8)), headers=PNG),
        400,
        "4096x4096x1 (HxWxC) but the model expects 28x28x1",
    ),
    "broken json": (
        dict(content=b'{"pixels": [[', headers={"content-type": "application/json"}),
        400,
        "not valid JSON",
    ),
    "no content type": (dict(content=b"abc"), 415, "Content-Type"),
}


@pytest.mark.parametrize("case", list(NAMED_CASES))
def test_named_bad_inputs_get_a_clear_4xx(gw: Gateway, case: str) -> None:
    kwargs, status, fragment = NAMED_CASES[case]
    r = gw.client.post("/predict", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_kserve_and_admin_errors(gw: Gateway) -> None:
    r = gw.client.post("/v1/models/resnet:predict", json={"instances": [[[0]]]})
    assert r.status_code == 404 and "unknown model 'resnet'" in r.json()["error"]
    r = gw.client.post("/v1/models/gateway:predict", json={"instances": []})
    assert r.status_code == 400 and "instances" in r.json()["error"]
    r = gw.client.post(
        "/v1/models/gateway:predict",
        json={"instances": [{"pixels": [[1] * 28] * 28}, {"image": 5}]},
    )
    assert r.status_code == 400 and "instances[1]" in r.json()["error"]
    r = gw.client.post("/v1/models/gateway:predict", json={"instances": [{"pixels": [[1]]}]})
    assert r.status_code == 400 and "instances[0]: the image is 1x1x1" in r.json()["error"]
    assert gw.client.post("/admin/activate", json={"round": 0}).status_code == 401
    r = gw.client.post(
        "/admin/activate", json={"round": 0}, headers={"authorization": "Bearer nope"}
    )
    assert r.status_code == 403
    r = gw.client.post("/admin/activate", json={"round": 7}, headers=ADMIN)
    assert r.status_code == 409 and "round 7 does not exist" in r.json()["error"]
    r = gw.client.post("/admin/activate", json={"round": -1}, headers=ADMIN)
    assert r.status_code == 400
    huge = b'{"round": 0, "x": "' + b"a" * (30 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    r = gw.client.post("/admin/activate", content=huge)  # no token: refused unread
    assert r.status_code == 401
    r = gw.client.post("/admin/activate", content=huge, headers=ADMIN)
    assert r.status_code == 413 and "1024" in r.json()["error"]
    assert time.monotonic() - started < 2
    r = gw.client.post(
        "/admin/activate", content=b'{"round": 1' + b"0" * 5000 + b"}", headers=ADMIN
    )
    assert r.status_code == 413
    r = gw.client.post("/admin/activate", content=b'{"round": 99999999999}', headers=ADMIN)
    assert r.status_code == 400 and "round" in r.json()["error"]
    assert gw.client.get("/nowhere").status_code == 404


# ---------------------------------------------------------------- generated requests
def test_hostile_requests_get_a_quick_4xx_and_never_stall_an_honest_client(
    gw: Gateway, lab: Lab
) -> None:
    """Over 1,100 generated hostile requests (benchmarks/hostile_http.py: nesting to 5,000,
    10,000-digit integers, PNG headers to 65535x65535, 64-instance bombs, 30 MB admin
    bodies, random bytes and JSON): no answer >= 500, each in under 1 s, and a client
    posting a valid image beside them always answered within 1 s. Self-contained: the
    counts are checked here, so the test stands alone in any order."""
    result = hammer(gw.url, 1100, _png(lab.clean[0]))
    assert result["requests"] >= 1000
    assert result["server_error_count"] == 0, result["server_errors"]
    assert goals(result) == dict.fromkeys(goals(result), True), result
    assert sum(v for k, v in result["statuses"].items() if k.startswith("4")) > 900


def test_pending_count_after_the_module(gw: Gateway) -> None:
    _flush(gw)
    with gw.sessions() as s:
        assert pending_count(session=s) >= 15
