"""BBD, Fine-Pruning and Neural Cleanse on the eight-attack zoo, through the live gateway.

    python -m benchmarks.bbd_table [--zoo var/zoo] [--attacks patch ...]

Per attack, one store and one Serve app (members exposed) hold three rounds:
- round 0, ``bbd-targeted`` as ``trainer prepare`` makes it: Neural Cleanse's targets and
  R Fine-Pruned to the 1% false-rejection budget;
- round 1, ``bbd-untargeted``: R Fine-Pruned by Liu et al.'s 4-point rule. Its R runs on
  every input, so its label is Fine-Pruning alone;
- round 2, when Neural Cleanse flagged a class: the suspect after unlearning the flagged
  triggers, served as a pair's second opinion (``nnoculation``'s policy answers it).
Each round is measured on the held-out split only: FRR and accuracy on clean images, FAR
(answered with the attacker's label) and rejections on triggered ones, the share of
requests that ran R. Throughput: ``bbd-targeted`` against the ``nnoculation`` ensemble on
the same two members, clean held-out stream, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bbd_report import checks, render
from benchmarks.gateway_load import _load
from benchmarks.nnoculation_table import ATTACKS
from benchmarks.results import defender_data, provenance, publish
from core.bundle import load_bundle, save_bundle
from core.db import open_store, session_factory
from core.errors import UserError
from core.images import encode_png
from core.pair import RoundDefense
from trainer.attacks.poison import triggered
from trainer.bbd import prepare_bbd_round
from trainer.cleanse import BBDConfig, load_triggers, unlearn
from trainer.fineprune import Budget, fine_prune
from trainer.lab import attack_of
from trainer.rounds import publish_round, running_round
from trainer.splits import gate_split

NAME = "bbd_table"
PORT, MODEL, BATCH = 8767, "gateway", 64


def answers(url: str, x: np.ndarray) -> list[dict[str, Any]]:
    """The gateway's whole answer for each image, ``BATCH`` per KServe request."""

    def post(chunk: np.ndarray) -> list[dict[str, Any]]:
        body = {"instances": [{"b64": base64.b64encode(encode_png(i)).decode()} for i in chunk]}
        r = httpx.post(f"{url}/v1/models/{MODEL}:predict", json=body, timeout=120)
        r.raise_for_status()
        return list(r.json()["predictions"])

    chunks = [x[i : i + BATCH] for i in range(0, len(x), BATCH)]
    with ThreadPoolExecutor(4) as pool:
        return [a for part in pool.map(post, chunks) for a in part]


def rates(
    clean: list[dict[str, Any]], y: np.ndarray, trig: list[dict[str, Any]], t: np.ndarray
) -> dict[str, Any]:
    """FRR, accuracy on answered clean inputs, FAR, rejections of triggered ones; R's and
    the suspect's own CA/ASR; the share of requests that ran R."""
    label = np.array([-1 if a["label"] is None else a["label"] for a in clean])
    tl = np.array([-1 if a["label"] is None else a["label"] for a in trig])
    r_c = np.array(
        [-1 if a["models"]["goodnet"] is None else a["models"]["goodnet"] for a in clean]
    )
    r_t = np.array([-1 if a["models"]["goodnet"] is None else a["models"]["goodnet"] for a in trig])
    b_c = np.array([a["models"]["badnet"] for a in clean])
    b_t = np.array([a["models"]["badnet"] for a in trig])
    answered = label >= 0
    return {
        "b_ca": float(np.mean(b_c == y)),
        "b_asr": float(np.mean(b_t == t)),
        "frr": float(np.mean(~answered)),
        "accuracy_answered": float(np.mean(label[answered] == y[answered])),
        "accuracy_served": float(np.mean(label == y)),
        "far": float(np.mean(tl == t)),
        "rejected_triggered": float(np.mean(tl < 0)),
        "r_share_clean": float(np.mean(r_c >= 0)),
        "r_share_triggered": float(np.mean(r_t >= 0)),
        "r_ca": float(np.mean(r_c == y)),
        "r_asr": float(np.mean(r_t == t)),
        "rounds": sorted({a["round"] for a in clean + trig}),
    }


def _publish(
    sessions: Any, store: Path, k: int, bad: Path, good: Any, defense: RoundDefense
) -> None:
    """Round ``k``: the suspect beside ``good`` (a model), not activated."""
    m = load_bundle(bad).manifest

    def write(out: Path) -> None:
        shutil.copytree(bad, out / "badnet")
        save_bundle(good, out / "goodnet", arch=m.arch, arch_kwargs=m.arch_kwargs,
                    class_names=m.class_names, input_spec=m.input, meta={"role": "goodnet"})  # fmt: skip

    with running_round(sessions, k):
        publish_round(sessions=sessions, store=store, round_no=k, write=write, metrics={},
                      activate=False, defense=defense)  # fmt: skip


def build_rounds(name: str, zoo: Path, valid: Any, store: Path, cfg: BBDConfig) -> dict[str, Any]:
    """Rounds 0-2 of one attack (module doc); what prepare found and how long each took."""
    sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
    suspect = load_bundle(zoo / name)
    spec = suspect.manifest.input
    start = time.perf_counter()
    report, path = prepare_bbd_round(
        defense="bbd-targeted", suspect_dir=zoo / name, suspect=suspect, valid=valid, bbd=cfg,
        sessions=sessions, store=store, targeted=True, parallel=True, progress=print,
    )  # fmt: skip
    prepared = time.perf_counter() - start
    rest, _ = gate_split(valid)
    fp = fine_prune(suspect.model, spec, rest, layer=None, budget=Budget(cfg.prune_drop),
                    fit_cfg=cfg.prune_fit())  # fmt: skip
    _publish(
        sessions,
        store,
        1,
        zoo / name,
        fp.model,
        RoundDefense("bbd-untargeted", {"bbd": cfg.to_dict()}),
    )
    flagged = report["targets"]
    if flagged:
        sha = read_sha(path)
        unlearned = unlearn(suspect.model, spec, rest, load_triggers(path, sha, flagged), cfg)
        _publish(sessions, store, 2, zoo / name, unlearned, RoundDefense("nnoculation"))
    return {
        "prepare_seconds": prepared,
        "targets": flagged,
        "neural_cleanse": report["neural_cleanse"],
        "fine_pruning_budget": report["fine_pruning"],
        "fine_pruning_4pt": {k: v for k, v in fp.record.items() if k not in ("curve", "finetune")},
        "db": f"sqlite:///{store / 'q.db'}",
    }


def read_sha(path: Path) -> str:
    from core.pair import read_round_manifest

    return str(read_round_manifest(path).params["triggers_sha256"])


def activate(db: str, k: int, url: str, probe: np.ndarray) -> None:
    """Activate round ``k`` and wait until the gateway answers from it."""
    from core.db import transaction
    from core.quarantine import activate_round

    with transaction(session_factory(open_store(db))) as s:
        activate_round(session=s, round_no=k, activated_by="bbd_table")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if answers(url, probe[:1])[0]["round"] == k:
                return
        except httpx.HTTPStatusError:  # 503 until a first round is active
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not swap to round {k}")


def measure_attack(
    name: str, zoo: Path, data: dict[str, Any], work: Path, cfg: BBDConfig
) -> dict[str, Any]:
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    attack = attack_of(zoo / name)
    if attack is None:
        raise UserError(f"{zoo / name} is not a BadNet; run 'python -m benchmarks.badnet_zoo'")
    store = work / name
    store.mkdir(parents=True)
    row = {"attack": name, **build_rounds(name, zoo, data["valid"], store, cfg)}
    held = data["heldout"]
    trig = [
        triggered(held, g, num_classes=attack.num_classes, seed=attack.seed) for g in attack.firing
    ]
    tx, tt = np.concatenate([x for x, _ in trig]), np.concatenate([t for _, t in trig])
    serve.run(build_app(GatewayArgs(db=row["db"], store=str(store), poll_seconds=0.2, expose_members=True)),
              name=name, route_prefix=f"/{name}")  # fmt: skip
    url = f"http://127.0.0.1:{PORT}/{name}"
    row["true_target"] = sorted({int(t) for t in tt})
    for k, label in ((0, "bbd_targeted"), (1, "bbd_untargeted"), (2, "unlearned")):
        if k == 2 and not row["targets"]:
            continue
        if k:
            activate(row["db"], k, url, held.x)
        row[label] = rates(answers(url, held.x), held.y, answers(url, tx), tt)
        print(name, label, row[label], flush=True)
    serve.delete(name)
    return row


def throughput(
    zoo: Path, data: dict[str, Any], work: Path, cfg: BBDConfig, repeats: int
) -> dict[str, Any]:
    """req/s of bbd-targeted against the nnoculation ensemble on the same members (the
    patch BadNet and its budget twin), concurrency 8, alternating, medians."""
    from ray import serve

    from core.pair import read_round_manifest
    from gateway.app import build_app
    from gateway.config import GatewayArgs

    src = work / "patch" / "rounds" / "0"
    params = read_round_manifest(src).params
    store = work / "load"
    store.mkdir()
    sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
    twin = load_bundle(src / "goodnet").model
    for k, defense in enumerate(
        (RoundDefense("bbd-targeted", params), RoundDefense("nnoculation"))
    ):
        _publish(sessions, store, k, zoo / "patch", twin, defense)
    db = f"sqlite:///{store / 'q.db'}"
    serve.run(
        build_app(GatewayArgs(db=db, store=str(store), poll_seconds=0.2)),
        name="load",
        route_prefix="/load",
    )
    url = f"http://127.0.0.1:{PORT}/load"
    bodies = [encode_png(i) for i in data["heldout"].x[:1000]]
    runs: dict[str, list[float]] = {"bbd-targeted": [], "nnoculation": []}
    for rep in range(repeats):
        for k, app in enumerate(runs) if rep % 2 == 0 else list(enumerate(runs))[::-1]:
            activate(db, k, url, data["heldout"].x)
            runs[app].append(asyncio.run(_load(url, bodies, 8))["rps"])
            print(rep, app, runs[app][-1], flush=True)
    serve.delete("load")
    ratio = [a / b for a, b in zip(runs["bbd-targeted"], runs["nnoculation"], strict=True)]
    return {
        "rps": runs,
        "ratio_median": float(np.median(ratio)),
        "ratios": ratio,
        "requests": len(bodies),
        "in_process": in_process(store, data["heldout"].x[:2000], repeats),
    }


def in_process(store: Path, x: np.ndarray, repeats: int) -> dict[str, Any]:
    """The policies alone on batches of 32 (no HTTP, no decoding): images/s of each stack
    on the same pair, medians over ``repeats``, and their ratio."""
    from core.defenses import decide_batch, with_policy
    from core.pair import load_round_pair

    sessions = session_factory(open_store(f"sqlite:///{store / 'q.db'}"))
    with sessions() as s:
        pairs = [with_policy(load_round_pair(s, k)) for k in (0, 1)]
    speed: dict[str, list[float]] = {p.defense.name: [] for p in pairs}
    for _ in range(repeats):
        for pair in pairs:
            start = time.perf_counter()
            for i in range(0, len(x), 32):
                decide_batch(pair, x[i : i + 32], pair.policy)  # type: ignore[arg-type]
            speed[pair.defense.name].append(len(x) / (time.perf_counter() - start))
    med = {k: float(np.median(v)) for k, v in speed.items()}
    return {"images_per_s": med, "ratio": med["bbd-targeted"] / med["nnoculation"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = provenance()
    _, data, threads = defender_data("valid", "heldout")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    cfg = BBDConfig()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [measure_attack(name, args.zoo, data, work, cfg) for name in args.attacks]
        load = (
            throughput(args.zoo, data, work, cfg, args.repeats) if "patch" in args.attacks else None
        )
    serve.shutdown()
    ray.shutdown()
    out = {
        "provenance": started,
        "threads": threads,
        "config": cfg.to_dict(),
        "rows": rows,
        "throughput": load,
    }
    out["checks"] = checks(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="*", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--repeats", type=int, default=3, help="Throughput runs per stack.")
    args = parser.parse_args()
    publish(NAME, run(args), render)


if __name__ == "__main__":
    main()
