"""The repair watcher: when N quarantined samples are pending, run a repair round as a Ray task.

``gateway serve`` starts it as a Ray actor beside the app; ``trainer watch`` runs the same
loop in the foreground. Each poll reads the pending count. At N or more (settings,
default 200) it claims the next round in the database (the lease: a running round with a
fresh heartbeat blocks every other claimer, and two claimers of one number collide on the
round's primary key) and runs :func:`trainer.repair.runner.run_repair_round` as a Ray task
(``max_calls=1``, CPUs from settings, a GPU when the cluster has one). While the task
runs the watcher refreshes the lease; if the task dies (killed, out of memory), the
watcher marks the round failed, and the active round keeps serving. After a rejected or
failed round it waits ``repair_retry_seconds``, doubled for each such round in a row
(``core.leases.retry_at``), before trying again.

Metrics (prometheus-client, on ``watcher_metrics_port``): pending samples, round duration
and rounds by outcome; names in :data:`core.metrics.WATCHER_EXPORTED`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from core.db import db_now, make_engine, session_factory
from core.leases import retry_at, try_claim_round
from core.metrics import PENDING, REPAIR_ROUNDS, REPAIR_SECONDS, WATCHER_EXPORTED
from core.quarantine import awaiting_rounds, eligible_count, pending_by_client
from core.settings import Settings, public_settings, settings_from_public
from trainer.lease import LeaseKeeper
from trainer.repair import RepairConfig, load_repair_config
from trainer.rounds import mark_failed

log = logging.getLogger("bqg.watcher")
ROUND_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


def repair_task(
    settings: dict[str, Any], round_no: int, owner: str, cfg: RepairConfig
) -> dict[str, Any]:
    """One claimed round as a Ray task: ``settings`` from :func:`public_settings`, with the
    secrets read from the worker's own environment."""
    return run_round(settings_from_public(settings), round_no, owner, cfg)


def run_round(
    s: Settings,
    round_no: int,
    owner: str,
    cfg: RepairConfig,
    check: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """One claimed round, run to its end, in this process; ``check`` runs at each progress
    step and may raise to stop the work (a lost lease)."""
    from trainer.data import load_data
    from trainer.loop import set_threads
    from trainer.repair import run_claimed_round

    set_threads(s.threads)
    sessions = session_factory(make_engine(s.db_url))
    # a failure anywhere here fails the round in Watcher.poll_once, which claimed it
    valid = load_data(s.valid, fashion_mnist_dir=s.fashion_mnist_dir, default_split="valid")
    outcome = run_claimed_round(
        s,
        sessions,
        round_no=round_no,
        owner=owner,
        cfg=cfg,
        valid=valid,
        progress=lambda message: _checked(check, message),
    )
    return {"round": outcome.round, "status": outcome.status, "metrics": outcome.metrics}


def _checked(check: Callable[[], None], message: str) -> None:
    check()
    log.warning("%s", message)


class RoundStopped(RuntimeError):
    """The watcher stopped (Ctrl-C, shutdown) while its round trained: the round fails."""


class WatcherMetrics:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.pending = Gauge(
            WATCHER_EXPORTED[PENDING], "Quarantined samples not yet used.", registry=self.registry
        )
        self.rounds = Counter(
            WATCHER_EXPORTED[REPAIR_ROUNDS].removesuffix("_total"),
            "Repair rounds by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            WATCHER_EXPORTED[REPAIR_SECONDS],
            "Repair round wall time.",
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        for outcome in ("succeeded", "rejected", "failed"):
            self.rounds.labels(outcome=outcome)  # export zeros from the start
        self.server: Any = None
        if port:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@dataclass
class PollResult:
    pending: int
    round: int | None = None
    status: str | None = None  # succeeded, rejected, failed; None when no round ran


class Watcher:
    """The polling loop; Ray-aware only where it launches the round's task."""

    def __init__(
        self,
        settings: Settings,
        cfg: RepairConfig | None = None,
        *,
        owner: str | None = None,
        use_ray: bool = True,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = cfg or load_repair_config(settings.repair_config)
        self.owner = owner or f"watcher@{socket.gethostname()}:{os.getpid()}"
        self.use_ray = use_ray
        self.sessions = session_factory(make_engine(settings.db_url))
        port = settings.watcher_metrics_port if metrics_port is None else metrics_port
        self.metrics = WatcherMetrics(port, settings.metrics_host)
        self._stop = threading.Event()
        self.last: PollResult | None = None
        self.current_ref: Any = None  # the running round's Ray task, if any

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> PollResult:
        """Start a round when enough samples are usable (under the per-client share cap)
        and the back-off after rejected or failed rounds has passed."""
        with self.sessions() as session:
            counts = pending_by_client(session=session)
            not_before = retry_at(session=session, base_seconds=self.settings.repair_retry_seconds)
            waiting = not_before is not None and db_now(session) < not_before
            waiting = waiting or bool(awaiting_rounds(session=session))  # an operator decides
        pending = sum(counts.values())
        self.metrics.pending.set(pending)
        result = PollResult(pending)
        usable = eligible_count(counts, self.cfg.max_client_share)
        if usable < self.settings.quarantine_threshold or waiting:
            return result
        lease = timedelta(seconds=self.settings.repair_lease_seconds)
        round_no = try_claim_round(self.sessions, owner=self.owner, lease=lease)
        if round_no is None:
            return result  # another watcher (or an operator) is running a round
        log.warning("%d samples pending: starting repair round %d", pending, round_no)
        start = time.perf_counter()
        try:
            status = self._run(round_no)
        except Exception as exc:
            log.error("repair round %d failed: %s", round_no, exc)
            mark_failed(self.sessions, round_no, f"{type(exc).__name__}: {exc}")
            status = "failed"
        self.metrics.rounds.labels(outcome=status).inc()
        self.metrics.seconds.observe(time.perf_counter() - start)
        result.round, result.status = round_no, status
        return result

    def _lease(self, round_no: int, on_lost: Callable[[], None] = lambda: None) -> LeaseKeeper:
        return LeaseKeeper(
            self.sessions,
            round_no=round_no,
            owner=self.owner,
            lease_seconds=self.settings.repair_lease_seconds,
            on_lost=on_lost,
        )

    def _run(self, round_no: int) -> str:
        if not self.use_ray:
            with self._lease(round_no) as lease:
                outcome = run_round(self.settings, round_no, self.owner, self.cfg, lease.check)
            return str(outcome["status"])
        import ray

        gpus = self.settings.repair_gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        task = ray.remote(max_calls=1)(repair_task).options(
            num_cpus=self.settings.repair_cpus, num_gpus=gpus, max_retries=0
        )
        ref = task.remote(public_settings(self.settings), round_no, self.owner, self.cfg)
        self.current_ref = ref
        try:
            with self._lease(round_no, on_lost=lambda: ray.cancel(ref, force=True)) as lease:
                while True:
                    ready, _ = ray.wait([ref], timeout=1.0)
                    lease.check()  # a lost lease: the task is cancelled, the round not ours
                    if ready:
                        return str(ray.get(ref)["status"])  # a dead task raises here
                    if self._stop.is_set():  # the gateway is shutting down: end it now
                        ray.cancel(ref, force=True)
                        raise RoundStopped("the watcher was stopped while the round trained")
        finally:
            self.current_ref = None

    def run(self) -> None:
        """Poll until :meth:`stop`; a database hiccup is logged and retried."""
        log.warning(
            "repair watcher %s: a round starts at %d pending samples",
            self.owner,
            self.settings.quarantine_threshold,
        )
        while not self._stop.is_set():
            try:
                self.last = self.poll_once()
            except Exception as exc:  # the store is down, say; keep watching
                log.error("watcher poll failed: %s", exc)
            self._stop.wait(self.settings.watcher_poll_seconds)
        self.metrics.close()


class WatcherActor:
    """The Ray actor ``gateway serve`` starts: runs :class:`Watcher` in a thread."""

    def __init__(self, settings: dict[str, Any], cfg: RepairConfig | None = None) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.watcher = Watcher(settings_from_public(settings), cfg)
        self.thread = threading.Thread(target=self.watcher.run, name="watcher", daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        last = self.watcher.last
        return {
            "owner": self.watcher.owner,
            "alive": self.thread.is_alive(),
            "last": None if last is None else last.__dict__,
        }

    def stop(self) -> None:
        self.watcher.stop()
        self.thread.join(timeout=30)


def start_watcher_actor(settings: Settings, cfg: RepairConfig | None = None) -> Any:
    """Start the watcher as a detached-from-requests Ray actor (0 CPUs: it only polls)."""
    import ray

    actor_cls: Any = ray.remote(WatcherActor)
    return actor_cls.options(num_cpus=0, max_concurrency=4, name="bqg-repair-watcher").remote(
        public_settings(settings), cfg
    )
