"""The faults that benchmarks/chaos.py injects, each for real: Ray kills, a stopped
PostgreSQL, a full filesystem under the spool, a killed watcher, a corrupt bundle.

Each fault is an ``inject`` and a ``heal`` (None when the system must heal itself); both
take the run's :class:`Env`. Root is needed (pg_ctlcluster, mount).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

PG_CLUSTER = ("15", "main")


@dataclass
class Env:
    """What the faults act on."""

    app: str
    store: Path
    sessions: sessionmaker[Session]
    start_watcher: Callable[[], Any]
    watcher: Any = None
    notes: dict[str, Any] = field(default_factory=dict)  # what a fault saw, for the report


@dataclass
class Fault:
    name: str
    inject: Callable[[Env], None]
    heal: Callable[[Env], None] | None = None
    hold: float = 0.0  # seconds between inject and heal
    sigkill: bool = False  # the writer's queue dies with the process: loss is expected


def _replicas(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def kill_replica(deployment: str) -> Callable[[Env], None]:
    """SIGKILL one replica of ``deployment`` (ray.kill, no restart: Serve replaces it)."""

    def inject(env: Env) -> None:
        import ray

        names = _replicas(env.app, deployment)
        if not names:
            raise RuntimeError(f"no {deployment} replica of {env.app} to kill")
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        env.notes[f"killed {deployment}"] = names[0]

    return inject


def pg(action: str) -> Callable[[Env], None]:
    def run(env: Env) -> None:
        extra = ["-m", "fast"] if action == "stop" else []
        subprocess.run(["pg_ctlcluster", *PG_CLUSTER, action, *extra], check=True)

    return run


def fill_spool_disk(env: Env) -> None:
    """Fill the tmpfs under the spool, then stop PostgreSQL: the writer can neither write
    nor spool, and must hold its samples in memory until the database is back."""
    filler = env.store / "spool" / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    pg("stop")(env)


def free_spool_disk(env: Env) -> None:
    pg("start")(env)
    (env.store / "spool" / "filler").unlink(missing_ok=True)


def kill_watcher_mid_round(env: Env) -> None:
    """Wait (up to 5 minutes) for a round to run, then SIGKILL the watcher actor; its round's
    Ray task dies with it (fate-sharing), and the round is left running without a beat."""
    import ray

    from core.leases import running_rounds

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with env.sessions() as s:
            running = [r.round for r in running_rounds(session=s)]
        if running:
            ray.kill(env.watcher, no_restart=True)
            env.notes["watcher killed in round"] = running[0]
            return
        time.sleep(0.5)
    raise RuntimeError("no round started within 5 minutes; the watcher fault needs one")


def restart_watcher(env: Env) -> None:
    env.watcher = env.start_watcher()


def register_corrupt_round(env: Env) -> None:
    """Claim the next round, publish a copy of the serving pair whose goodnet weights are
    cut short (its manifest's digest no longer matches), and activate it."""
    from datetime import timedelta

    from core.leases import try_claim_round
    from core.quarantine import active_round
    from trainer.rounds import publish_round

    with env.sessions() as s:
        serving = active_round(session=s)
    assert serving is not None
    round_no = None
    deadline = time.monotonic() + 300
    while round_no is None and time.monotonic() < deadline:  # not while a repair runs
        round_no = try_claim_round(env.sessions, owner="chaos", lease=timedelta(seconds=60))
        time.sleep(0.5)
    if round_no is None:
        raise RuntimeError("could not claim a round for the corrupt bundle in 5 minutes")

    def write(out: Path) -> None:
        for role, model in serving.models.items():
            shutil.copytree(model.bundle_path, out / role)
        weights = next((out / "goodnet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    publish_round(
        sessions=env.sessions, store=env.store, round_no=round_no, write=write, metrics={}
    )
    env.notes["corrupt round"] = round_no
    env.notes["rolled back to"] = serving.round


def roll_back(env: Env) -> None:
    from core.db import transaction
    from core.quarantine import activate_round

    with transaction(env.sessions) as s:
        activate_round(session=s, round_no=env.notes["rolled back to"], activated_by="chaos")


def schedule(spacing: float = 80.0) -> list[tuple[float, Fault]]:
    """(seconds into the run, fault): one every ``spacing`` seconds, from 40 s in."""
    faults = [
        Fault("ensemble replica SIGKILL", kill_replica("Ensemble"), sigkill=True),
        Fault("ingress replica SIGKILL", kill_replica("Ingress"), sigkill=True),
        Fault("PostgreSQL stopped 20 s", pg("stop"), pg("start"), hold=20.0),
        Fault("spool disk full, database down 20 s", fill_spool_disk, free_spool_disk, 20.0),
        Fault("watcher SIGKILL mid-round", kill_watcher_mid_round, restart_watcher, 5.0),
        Fault("corrupt bundle activated", register_corrupt_round, roll_back, 20.0),
    ]
    return [(40.0 + spacing * i, fault) for i, fault in enumerate(faults)]
