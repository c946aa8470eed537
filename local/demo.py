"""``gateway demo``: the whole NNoculation loop on one machine, as ``make demo`` runs it.

After ``trainer prepare`` has made round 0 in a store, this:
1. starts a local Ray with the gateway and the repair watcher (as ``gateway serve`` does);
2. plays the attacker: streams the Fashion-MNIST ``stream`` split over HTTP, a fraction of
   it stamped with the BadNet's own triggers, with a live status line (requests, suspect
   answers, pending samples, round);
3. waits until the watcher has run round 1 and the replicas answer from it;
4. prints CA and ASR on the held-out split: the BadNet alone, the gateway at round 0 and
   the gateway at round 1. The gateway's answers are computed with its own ensemble code
   (``decide_batch``, the policy the replicas run) on the round's registered pair, so the
   measurement does not feed the quarantine with held-out images;
5. leaves the gateway serving, with its URLs and the commands to try, until Ctrl-C
   (``--no-wait`` exits after the table, for scripts).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session, sessionmaker

from core.defenses import decide_batch
from core.defenses.nnoculation import GoodNetPolicy
from core.errors import UserError
from core.images import encode_png
from core.pair import load_round_pair
from core.quarantine import list_rounds, pending_count

STATUS_EVERY = 0.5


@dataclass
class Traffic:
    """What the attacker's clients saw."""

    sent: int = 0
    triggered: int = 0
    suspect: int = 0
    suspect_triggered: int = 0
    errors: int = 0
    round_seen: int = 0
    swapped_after: int | None = None  # requests sent when a newer round first answered
    log: list[tuple[bool, bool, int]] = field(default_factory=list)  # (triggered, suspect, round)
    lock: threading.Lock = field(default_factory=threading.Lock)


def attacker_stream(
    stream: Any, badnet_dir: Path, poison: float, seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The stream split with ``poison`` of it stamped with the BadNet's firing triggers."""
    from trainer.attacks.poison import attacker_stream as stamp
    from trainer.lab import attack_of

    attack = attack_of(badnet_dir)
    if attack is None or not attack.firing:
        raise UserError(
            f"{badnet_dir} records no attack; the demo needs a BadNet from 'trainer fabricate'"
        )
    return stamp(stream.x, attack.firing, poison, seed)


def stream_until_swap(
    url: str,
    images: NDArray[Any],
    poisoned: NDArray[Any],
    sessions: sessionmaker[Session],
    *,
    threshold: int,
    clients: int,
    rate: float,
    timeout: float,
    serving_round: int = 0,
    after: int = 0,
    repair_rate: float | None = None,
    out: Any = sys.stderr,
) -> Traffic:
    """Send the stream over HTTP (looping) until the gateway answers from a round newer than
    ``serving_round``, and then ``after`` requests more. ``Traffic.log`` keeps every answer.

    ``rate`` is requests/s over all clients; while a round trains it is ``repair_rate``
    (default a quarter of ``rate``): the round and the gateway share the CPUs."""
    slow = rate / 4 if repair_rate is None else repair_rate
    bodies = [encode_png(img) for img in images]
    traffic = Traffic(round_seen=serving_round)
    done = threading.Event()
    repairing = threading.Event()  # slow down while a round trains: it shares the CPUs

    def client(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, timeout=60) as c:
            while not done.is_set():
                started = time.monotonic()
                j = i % len(bodies)
                i += clients
                try:
                    r = c.post("/predict", content=bodies[j], headers={"content-type": "image/png"})
                    answer = r.json() if r.status_code == 200 else None
                except httpx.HTTPError:
                    answer = None
                with traffic.lock:
                    traffic.sent += 1
                    traffic.triggered += bool(poisoned[j])
                    if answer is None:
                        traffic.errors += 1
                    else:
                        traffic.log.append((bool(poisoned[j]), answer["suspect"], answer["round"]))
                        traffic.suspect += bool(answer["suspect"])
                        traffic.suspect_triggered += bool(answer["suspect"] and poisoned[j])
                        if answer["round"] > traffic.round_seen:
                            traffic.round_seen = answer["round"]
                            if traffic.swapped_after is None:
                                traffic.swapped_after = traffic.sent
                    if traffic.swapped_after is not None and (
                        traffic.sent >= traffic.swapped_after + after
                    ):
                        done.set()
                pace = (slow if repairing.is_set() else rate) / clients
                time.sleep(max(0.0, 1 / pace - (time.monotonic() - started)))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start = time.monotonic()
    try:
        while not done.wait(STATUS_EVERY):
            with sessions() as s:
                pending = pending_count(session=s)
                rounds = [r for r in list_rounds(session=s) if r.round > serving_round]
            running = [r for r in rounds if r.status == "running"]
            ended = [r for r in rounds if r.status in ("rejected", "failed")]
            if running and traffic.swapped_after is None:
                repairing.set()
            else:  # once swapped, the ``after`` requests go at full rate
                repairing.clear()
            for r in ended if traffic.swapped_after is None else []:
                raise UserError(
                    f"repair round {r.round} was {r.status} ({_why(r)}); the active round keeps "
                    "serving and the watcher tries again later; see 'trainer status'"
                )
            elapsed = time.monotonic() - start
            state = (
                f"repair round {running[0].round} training"
                if running
                else f"pending {pending}/{threshold}"
            )
            with traffic.lock:
                share = traffic.suspect / max(traffic.sent, 1)
                line = (
                    f"\r{elapsed:5.0f}s  requests {traffic.sent:6d}  suspect {traffic.suspect:5d} "
                    f"({100 * share:4.1f}%)  {state}  serving round {traffic.round_seen}   "
                )
            out.write(line)
            out.flush()
            if elapsed > timeout:
                raise UserError(
                    f"no round was activated within {timeout:.0f} s; see 'trainer status' for why"
                )
    finally:
        done.set()
        for t in threads:
            t.join(timeout=70)
        out.write("\n")
    return traffic


def _why(r: Any) -> str:
    from trainer.repair import describe_gate

    gate = (r.metrics or {}).get("gate")
    if r.status == "rejected" and gate:
        failed = "; ".join(gate.get("failures", []))
        return f"on the gate split: {describe_gate(gate)}" + (f"; {failed}" if failed else "")
    return str(r.error or "no reason recorded")[:300]


def rates_by_stage(
    sessions: sessionmaker[Session],
    badnet_dir: Path,
    heldout: Any,
    trusted_modules: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """CA and ASR: the BadNet alone, then the gateway's answers at each succeeded round."""
    from trainer.lab import attack_of

    attack = attack_of(badnet_dir)
    assert attack is not None
    with sessions() as s:
        rounds = [r.round for r in list_rounds(session=s) if r.status == "succeeded"]
        pairs = [load_round_pair(s, r, trusted_modules=trusted_modules) for r in rounds]
    rows = [_row("BadNet alone", pairs[0].badnet.predict, heldout, attack)]
    for pair in pairs:

        def answers(x: NDArray[Any], pair: Any = pair) -> NDArray[Any]:
            return np.array([d.label for d in decide_batch(pair, x, GoodNetPolicy())])

        rows.append(_row(f"gateway, round {pair.round}", answers, heldout, attack))
    return rows


def _row(stage: str, predict: Any, heldout: Any, attack: Any) -> dict[str, Any]:
    from trainer.attacks.poison import firing_success_rate

    ca = float((predict(heldout.x) == heldout.y).mean())
    return {"stage": stage, "ca": ca, "asr": firing_success_rate(predict, heldout, attack)}
