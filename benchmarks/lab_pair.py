"""A quick Fashion-MNIST round 0 for benchmarks that test the gateway, not the models.

A one-epoch patch BadNet and a one-epoch clean model on 2,000 training images: enough to
answer and disagree like the real pair, made in about a minute on 2 cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

TARGET = 0


def round_zero(store: Path, db_url: str, train_images: int = 2000) -> np.ndarray:
    """Publish and activate round 0 in ``store`` / ``db_url``; returns 200 held-out images."""
    from core.db import open_store, session_factory
    from core.settings import Settings
    from trainer.data import load_fashion_mnist
    from trainer.lab import CLEAN, fabricate
    from trainer.loop import FitConfig
    from trainer.rounds import publish_round, running_round

    root = Settings().fashion_mnist_dir
    train = load_fashion_mnist(root, "train").take(slice(0, train_images))
    heldout = load_fashion_mnist(root, "heldout").take(slice(0, 200))
    for name, attack in (("badnet", "patch"), ("goodnet", CLEAN)):
        fabricate(
            train=train,
            heldout=heldout,
            attack_name=attack,
            target=TARGET,
            out=store / "zoo" / name,
            fit_config=FitConfig(epochs=1),
            progress=False,
        )
    sessions = session_factory(open_store(db_url))

    def write(out: Path) -> None:
        for name in ("badnet", "goodnet"):
            shutil.copytree(store / "zoo" / name, out / name)

    with running_round(sessions, 0):
        publish_round(sessions=sessions, store=store, round_no=0, write=write, metrics={})
    return heldout.x


def stream(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clean, triggered): distinct images of the defender's ``stream`` split, the second
    set stamped with the BadNet's patch (on images not of its target), for a live stream."""
    from core.settings import Settings
    from trainer.attacks.poison import build_attack
    from trainer.data import load_fashion_mnist

    pool = load_fashion_mnist(Settings().fashion_mnist_dir, "stream")
    x = pool.x[pool.y != TARGET]
    attack = build_attack("patch", target=TARGET, num_classes=10, image_shape=x.shape[1:])
    stamped: np.ndarray = attack.groups[0].apply(x[:count], np.random.default_rng(seed))
    return pool.x[-count:], stamped
