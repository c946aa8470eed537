"""Shared fixtures: tiny synthetic data for fast tests, the real Fashion-MNIST for the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.bundle import InputSpec
from core.settings import Settings
from trainer.data import Dataset

BIN = Path(sys.executable).parent


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


def make_blobs(
    n: int = 200, *, shape: tuple[int, int, int] = (12, 12, 1), classes: int = 3, seed: int = 0
) -> Dataset:
    """A tiny learnable dataset: class k is a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    x = rng.integers(0, 40, size=(n, h, w, c), dtype=np.uint8)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    for i, label in enumerate(y):
        r = 1 + (label * 3) % (h - 4)
        x[i, r : r + 3, 2:8, :] = 220
    return Dataset(x, y, tuple(str(k) for k in range(classes)), "blobs")


@pytest.fixture
def blobs() -> Dataset:
    return make_blobs()


def spec_for(shape: tuple[int, int, int]) -> InputSpec:
    h, w, c = shape
    return InputSpec(channels=c, height=h, width=w, mean=[0.5] * c, std=[0.25] * c)  # type: ignore[arg-type]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script of this project as a user would."""
    full_env = {**os.environ, "BQG_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole test session (a start costs about 10 s)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
