"""Shared fixtures: tiny synthetic data for fast tests, the real Fashion-MNIST for the rest.

The helpers they use, and that tests import, live in tests/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from core.bundle import load_bundle
from core.settings import Settings
from tests.helpers import (
    ADMIN_TOKEN,
    RAY_METRICS,
    SHAPE,
    TARGET,
    Lab,
    free_port,
    make_blobs,
)
from tests.store_helpers import POSTGRES_URL
from trainer.attacks.poison import build_attack
from trainer.data import Dataset
from trainer.lab import CLEAN, fabricate
from trainer.loop import FitConfig


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    root = Settings().fashion_mnist_dir
    if (
        not (root / "t10k-images-idx3-ubyte.gz").exists()
        and not (root / "t10k-images-idx3-ubyte").exists()
    ):
        pytest.fail(
            f"Fashion-MNIST is missing from {root}: run 'make dataset' (apt-get install dataset-fashion-mnist)"
        )
    return root


@pytest.fixture
def blobs() -> Dataset:
    return make_blobs()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole test session (a start costs about 10 s)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    RAY_METRICS["port"] = free_port()
    # The replicas read the admin token from their environment, which Ray's processes
    # inherit from this one at start; the tests' own environment stays without it.
    saved = dict(os.environ)
    os.environ["BQG_ADMIN_TOKEN"] = ADMIN_TOKEN
    # libpq's own variable: app arguments name the PostgreSQL URL without its password
    os.environ["PGPASSWORD"] = make_url(POSTGRES_URL).password or ""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=RAY_METRICS["port"],
        _system_config={"metrics_report_interval_ms": 1000},  # Prometheus tests wait less
    )
    os.environ.clear()
    os.environ.update(saved)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_port(ray_session: Any) -> int:
    """Ray's metrics export port of the shared session (what Prometheus scrapes)."""
    return RAY_METRICS["port"]


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


@pytest.fixture(scope="session")
def serve_http(ray_session: Any) -> Iterator[str]:
    """Serve's HTTP proxy on a free port, once per test session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
