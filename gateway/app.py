"""The Ray Serve app: ``build_app`` (the ``import_path`` in deploy/serve.yaml) and the ensemble.

    client --HTTP--> Ingress (FastAPI: decode, validate, route)
                       --handle--> Ensemble (both models, @serve.batch; quarantine writer;
                                             follows the store's active round)

The active round's manifest names its defense, whose policy decides each answer
(``core.defenses``), so a swap may change the defense. One ensemble deployment holds both
models: a batch runs the BadNet and the GoodNet back to back in one process, with no second
hop (benchmarks/gateway_load.py measures it against a single-model app with the same
ingress).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve import Application

from core.db import make_engine, session_factory
from core.defenses import decide_batch, load_defense_modules
from core.errors import ImageError
from core.images import check_shape
from core.pair import ModelPair
from core.quarantine import NewSample
from gateway.config import GatewayArgs
from gateway.follower import RoundFollower
from gateway.ingress import Ingress
from gateway.metrics import EnsembleMetrics
from gateway.payloads import Query
from gateway.writer import QuarantineWriter

log = logging.getLogger(__name__)
MAX_SPOOL_SLOTS = 256


def claim_spool_slot(base: Path) -> tuple[Path, int]:
    """An exclusive spool directory for this replica: the lowest slot whose lock is free.

    A replica that restarts finds its old slot's lock released by the OS, so it takes the
    slot back with the segments it left. Returns the directory and the open lock's fd.
    Known gap: after a scale-down, slots above the replica count keep their segments
    until a replica claims them again; nothing replays them meanwhile.
    """
    base.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SPOOL_SLOTS):
        fd = os.open(base / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return base / f"slot-{slot}", fd
    raise RuntimeError(f"all {MAX_SPOOL_SLOTS} spool slots under {base} are taken")


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=30)
class Ensemble:
    """Holds the active round's members, answers batches under its policy, quarantines the
    inputs the policy flags."""

    def __init__(self, args: GatewayArgs) -> None:
        settings = args.settings()
        torch.set_num_threads(args.threads_per_replica)
        self.single_model = args.single_model
        load_defense_modules(settings.defense_modules)
        self.metrics = EnsembleMetrics()
        self.batch_sizes: Counter[int] = Counter()
        engine_url = settings.db_url

        def sessions() -> Any:
            return session_factory(make_engine(engine_url))

        spool, self._spool_lock = claim_spool_slot(settings.spool_dir)
        self.metrics.spool_cap.set(settings.max_spool_bytes)
        self.writer = QuarantineWriter(
            sessions=sessions,
            spool_dir=spool,
            max_spool_bytes=settings.max_spool_bytes,
            on_spool=self._on_spool,
            on_drop=self.metrics.dropped.inc,
            on_error=lambda: self.metrics.loop_errors.inc(tags={"loop": "writer"}),
        ).start()
        self.follower = RoundFollower(
            sessions=sessions,
            poll_seconds=settings.poll_seconds,
            trusted_modules=settings.trusted_arch_modules,
            max_overlays=settings.strip_max_overlays,
            on_swap=lambda pair: self.metrics.active_round.set(pair.round),
            on_failure=lambda round_no, error: self.metrics.swap_failures.inc(),
            on_pending=self.metrics.pending.set,
            on_loop_error=lambda: self.metrics.loop_errors.inc(tags={"loop": "follower"}),
        ).start()
        self.infer.set_max_batch_size(args.max_batch_size)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(args.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def _on_spool(self, samples: int, nbytes: int) -> None:
        self.metrics.spool_depth.set(samples)
        self.metrics.spool_bytes.set(nbytes)

    def check_health(self) -> None:
        """Serve's health check: a replica whose writer or follower thread died is
        restarted, rather than left to drop suspects or serve an old round forever."""
        dead = [
            name
            for name, loop in (
                ("quarantine writer", self.writer),
                ("round follower", self.follower),
            )
            if not loop.alive
        ]
        if dead:
            raise RuntimeError(f"the {' and '.join(dead)} thread died; restart this replica")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def infer(self, queries: list[Query]) -> list[dict[str, Any]]:
        pair = self.follower.pair  # read once: the whole batch is answered by one pair
        if pair is None:
            error = {
                "error": "no model round is active yet; run 'trainer prepare' first",
                "status": 503,
            }
            return [error for _ in queries]
        self.batch_sizes[len(queries)] += 1
        return await asyncio.to_thread(self._answer, pair, queries)

    def _answer(self, pair: ModelPair, queries: list[Query]) -> list[dict[str, Any]]:
        images = [q.image for q in queries]
        out: list[dict[str, Any]] = []
        good: list[int] = []
        for i, image in enumerate(images):
            try:
                check_shape(image, pair.shape)
            except ImageError as exc:
                out.append({"error": str(exc), "status": exc.status})
                continue
            out.append({})
            good.append(i)
        if not good:
            return out
        batch = np.stack([images[i] for i in good])
        names = pair.class_names
        if self.single_model:
            labels = pair.member(pair.roles[-1]).predict(batch)
            for i, label in zip(good, labels, strict=True):
                out[i] = {
                    "label": int(label),
                    "class_name": names[label],
                    "suspect": False,
                    "round": pair.round,
                }
        else:
            assert pair.policy is not None  # the follower resolves it before the swap
            decisions = decide_batch(pair, batch, pair.policy)
            for i, d in zip(good, decisions, strict=True):
                out[i] = {
                    "label": d.label,
                    "class_name": None if d.label is None else names[d.label],
                    "suspect": d.suspect,
                    "round": d.round,
                    "models": {"badnet": d.badnet_label, "goodnet": d.goodnet_label},
                }
                if d.suspect:
                    self.writer.submit(
                        NewSample.from_image(
                            images[i],
                            badnet_label=d.badnet_label,
                            goodnet_label=d.goodnet_label,
                            badnet_score=d.badnet_score,
                            goodnet_score=d.goodnet_score,
                            strip_entropy=d.entropy,
                            served_round=d.round,
                            detector=pair.policy.name,
                            client=queries[i].client,
                        )
                    )
            suspects = sum(d.suspect for d in decisions)
            if suspects:
                self.metrics.quarantined.inc(suspects, tags={"round": str(pair.round)})
        self.metrics.predictions.inc(len(good), tags={"round": str(pair.round)})
        return out

    def info(self) -> dict[str, Any]:
        pair = self.follower.pair
        base: dict[str, Any] = {
            "database_up": self.writer.database_up,
            "spool_depth": self.writer.spool.depth(),
            "quarantine_dropped": self.writer.dropped,
            "loop_errors": {"writer": self.writer.errors, "follower": self.follower.loop_errors},
            "fallback": self.follower.fallback,
            "batch_sizes": dict(self.batch_sizes),
            "swap_failures": self.follower.failures,
            "last_swap_failure": self.follower.last_failure,
        }
        if pair is None:
            return {**base, "round": None, "policy": None, "defense": None}
        spec = pair.badnet.manifest.input
        policy = pair.policy.name if pair.policy is not None else None
        return {
            **base,
            "round": pair.round,
            "defense": pair.defense.name,
            "policy": "single-model" if self.single_model else policy,
            # why the policy serves otherwise than its name says (bbd-targeted, no targets)
            "policy_note": (getattr(pair.policy, "note", "") or None) if policy else None,
            "hashes": pair.hashes(),
            "input": {"height": spec.height, "width": spec.width, "channels": spec.channels},
            "class_names": pair.class_names,
        }

    def flush(self) -> bool:
        """Wait until every quarantined sample so far is in the database or the spool."""
        return self.writer.flush()

    def __del__(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close(timeout=20)
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()


def build_app(args: GatewayArgs) -> Application:
    """The typed app builder: ``import_path: gateway.app:build_app`` in deploy/serve.yaml."""
    ensemble = Ensemble.options(  # type: ignore[attr-defined]
        num_replicas=args.ensemble_replicas,
        ray_actor_options={"num_cpus": 0},
    ).bind(args)
    app: Application = Ingress.options(  # type: ignore[attr-defined]
        num_replicas=args.ingress_replicas, ray_actor_options={"num_cpus": 0}
    ).bind(ensemble, args)
    return app
