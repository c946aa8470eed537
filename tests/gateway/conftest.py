"""A real Ray Serve gateway over real HTTP, on a real SQLite store, with lab-made models.

The pair is small but real: a patch BadNet and a clean model trained on 28x28 synthetic
blobs. Clean probes get the same label from both (no quarantine); triggered probes get
the attacker's target from the BadNet and the true label from the GoodNet.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import load_bundle
from core.db import open_store, session_factory
from tests.conftest import make_blobs
from trainer.attacks.poison import build_attack
from trainer.lab import CLEAN, fabricate
from trainer.loop import FitConfig
from trainer.rounds import publish_round, running_round

SHAPE = (28, 28, 1)
TARGET = 1


@dataclass
class Lab:
    badnet: Path
    goodnet: Path
    clean: np.ndarray  # probes both models label alike
    clean_labels: np.ndarray
    triggered: np.ndarray  # probes the models disagree on
    bad_labels: np.ndarray
    good_labels: np.ndarray


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("lab")
    train = make_blobs(800, shape=SHAPE, classes=4, seed=0)
    held = make_blobs(200, shape=SHAPE, classes=4, seed=1)
    cfg = FitConfig(epochs=4, batch_size=32)
    fabricate(
        train=train,
        heldout=held,
        attack_name="patch",
        target=TARGET,
        out=root / "badnet",
        fit_config=cfg,
        progress=False,
    )
    fabricate(
        train=train,
        heldout=held,
        attack_name=CLEAN,
        target=0,
        out=root / "goodnet",
        fit_config=cfg,
        progress=False,
    )
    bad, good = load_bundle(root / "badnet"), load_bundle(root / "goodnet")
    probes = make_blobs(300, shape=SHAPE, classes=4, seed=2)
    agree = (bad.predict(probes.x) == good.predict(probes.x)) & (good.predict(probes.x) == probes.y)
    attack = build_attack("patch", target=TARGET, num_classes=4, image_shape=SHAPE)
    trig = attack.groups[0].apply(probes.x, np.random.default_rng(0))
    bl, gl = bad.predict(trig), good.predict(trig)
    disagree = bl != gl
    assert (
        agree.sum() >= 50 and disagree.sum() >= 50
    ), "the lab pair should agree on clean and split on triggered"
    # distinct images only: the quarantine deduplicates repeats by design
    _, first = np.unique(trig[disagree].reshape(int(disagree.sum()), -1), axis=0, return_index=True)
    return Lab(
        badnet=root / "badnet",
        goodnet=root / "goodnet",
        clean=probes.x[agree],
        clean_labels=probes.y[agree],
        triggered=trig[disagree][np.sort(first)],
        bad_labels=bl[disagree][np.sort(first)],
        good_labels=gl[disagree][np.sort(first)],
    )


def publish_pair(
    sessions: sessionmaker[Session],
    store: Path,
    round_no: int,
    badnet: Path,
    goodnet: Path,
    *,
    activate: bool,
) -> Path:
    """Register a round whose badnet/goodnet are copies of the given bundles."""

    def write(out: Path) -> None:
        shutil.copytree(badnet, out / "badnet")
        shutil.copytree(goodnet, out / "goodnet")

    with running_round(sessions, round_no):
        return publish_round(
            sessions=sessions,
            store=store,
            round_no=round_no,
            write=write,
            metrics={},
            activate=activate,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_http(ray_session: Any) -> Iterator[str]:
    """Serve's HTTP proxy on a free port, once per test session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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
    """Deploy gateway apps (round 0 = the lab pair) under their own route prefixes."""
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    names: list[str] = []
    clients: list[httpx.Client] = []

    def deploy(name: str, **args: Any) -> Gateway:
        store = tmp_path_factory.mktemp(name)
        db_url = args.pop("db", None) or f"sqlite:///{store / 'quarantine.db'}"
        sessions = session_factory(open_store(db_url))
        publish_pair(sessions, store, 0, lab.badnet, lab.goodnet, activate=True)
        app_args = GatewayArgs(
            db=db_url, store=str(store), poll_seconds=0.2, admin_token="s3cret-token", **args
        )
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
