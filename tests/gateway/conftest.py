"""A real Ray Serve gateway over real HTTP, on a real SQLite store, with lab-made models.

The pair is small but real: a patch BadNet and a clean model trained on 28x28 synthetic
blobs. Clean probes get the same label from both (no quarantine); triggered probes get
the attacker's target from the BadNet and the true label from the GoodNet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import load_bundle
from core.db import open_store, session_factory, transaction
from core.quarantine import activate_round
from tests.helpers import (
    ADMIN,
    SHAPE,
    TARGET,
    Lab,
    make_blobs,
    publish_pair,
)
from trainer.attacks.poison import build_attack


@dataclass
class Gateway:
    url: str
    store: Path
    db_url: str
    sessions: sessionmaker[Session]
    client: httpx.Client
    name: str


@pytest.fixture(scope="module")
def gateway_factory(
    serve_http: str, tmp_path_factory: pytest.TempPathFactory, lab: Lab
) -> Iterator[Callable[..., Gateway]]:
    """Deploy gateway apps (round 0 = the lab pair, as a round of ``defense``) under their own
    route prefixes."""
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    names: list[str] = []
    clients: list[httpx.Client] = []

    def deploy(name: str, defense: str = "nnoculation", **args: Any) -> Gateway:
        store = tmp_path_factory.mktemp(name)
        db_url = args.pop("db", None) or f"sqlite:///{store / 'quarantine.db'}"
        sessions = session_factory(open_store(db_url))
        publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True, defense=defense)
        public_url = make_url(db_url)._replace(password=None).render_as_string(hide_password=False)
        app_args = GatewayArgs(db=public_url, store=str(store), poll_seconds=0.2, **args)
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
        names.append(name)
        client = httpx.Client(base_url=f"{serve_http}/{name}", timeout=30)
        clients.append(client)
        return Gateway(f"{serve_http}/{name}", store, db_url, sessions, client, name)

    yield deploy
    for client in clients:
        client.close()
    for name in names:
        serve.delete(name)


def disagreeing_images(
    lab: Lab, n: int, *, seed: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` distinct triggered images on which the lab's BadNet and GoodNet disagree."""
    bad, good = load_bundle(lab.badnet), load_bundle(lab.goodnet)
    attack = build_attack("patch", target=TARGET, num_classes=4, image_shape=SHAPE)
    found: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(found) < n:
        probes = make_blobs(500, shape=SHAPE, classes=4, seed=seed)
        seed += 1
        trig = attack.groups[0].apply(probes.x, np.random.default_rng(seed))
        for img in trig[bad.predict(trig) != good.predict(trig)]:
            if img.tobytes() not in seen:
                seen.add(img.tobytes())
                found.append(img)
    x = np.stack(found[:n])
    return x, bad.predict(x), good.predict(x)


def keeps_serving(gw: Gateway, round_no: int, image: np.ndarray, seconds: float = 3.0) -> Any:
    """Every answer for ``seconds`` comes from ``round_no`` (a refused swap changes nothing
    that serves); then the replica's /v1/models entry."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = gw.client.post("/predict", json={"pixels": image[:, :, 0].tolist()})
        assert r.status_code == 200 and r.json()["round"] == round_no
        time.sleep(0.1)
    return gw.client.get("/v1/models").json()["models"][0]


Answer = tuple[float, int, dict[str, Any]]  # (monotonic time, probe index, response body)


def under_load(
    gw: Gateway,
    probes: list[bytes],
    *,
    clients: int,
    requests: int,
    operator: Callable[[list[Answer]], Any],
) -> tuple[list[Answer], list[str], Any]:
    """``clients`` threads post PNG ``probes`` in turn, ``requests`` in all, while
    ``operator(answers so far)`` runs beside them: (answers, failures, operator's result).
    Any status but 200, and any exception, is a failure."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    answers: list[Answer] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            for i in range(worker, requests, clients):
                k = i % len(probes)
                try:
                    r = http.post(
                        "/predict",
                        content=probes[k],
                        headers={"content-type": "image/png", **ADMIN},
                    )
                    assert r.status_code == 200, r.text
                    with lock:
                        answers.append((time.monotonic(), k, r.json()))
                except Exception as exc:  # every failure counts, whatever it is
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.002)

    with ThreadPoolExecutor(clients + 1) as pool:
        op = pool.submit(operator, answers)
        for f in [pool.submit(client, w) for w in range(clients)]:
            f.result()
        return answers, failures, op.result()


def activate(gw: Gateway, round_no: int) -> None:
    with transaction(gw.sessions) as s:
        activate_round(session=s, round_no=round_no, activated_by="test")


def wait_for(results: list[Any], n: int, timeout: float = 120.0) -> None:
    """Until ``n`` answers are in; a timeout lets the failures speak instead of a hang."""
    import time

    deadline = time.monotonic() + timeout
    while len(results) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def swap_and_roll_back(gw: Gateway, requests: int, new: int = 1, old: int = 0) -> Any:
    """An ``under_load`` operator: activate round ``new`` after a third of ``requests``
    answers, and roll back to ``old`` after two thirds."""

    def operator(results: list[Answer]) -> None:
        wait_for(results, requests // 3)
        activate(gw, new)
        wait_for(results, 2 * requests // 3)
        activate(gw, old)

    return operator
