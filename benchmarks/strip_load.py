"""The live-gateway half of ``benchmarks.strip_detection``: the ``nnoculation`` ensemble and
one ``codefend`` app per N on one local Ray Serve, loaded in turn with the same stream."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.gateway_load import _batch_delta, _load, patch_stream
from core.db import open_store, session_factory
from core.images import encode_png
from core.pair import RoundDefense
from core.strip import StripParams
from trainer.data import Dataset
from trainer.rounds import publish_round, running_round

CONCURRENCY = (8, 32)


def _publish(store: Path, zoo: Path, defense: RoundDefense) -> str:
    """A store whose round 0 is the zoo's patch BadNet, beside the clean model for the
    ensemble, alone for codefend."""
    db_url = f"sqlite:///{store / 'q.db'}"
    sessions = session_factory(open_store(db_url))

    def write(out: Path) -> None:
        shutil.copytree(zoo / "patch", out / "badnet")
        if defense.name == "nnoculation":
            shutil.copytree(zoo / "clean", out / "goodnet")

    with running_round(sessions, 0):
        publish_round(
            sessions=sessions, store=store, round_no=0, write=write, metrics={}, defense=defense
        )
    return db_url


def load_runs(
    zoo: Path, stream: Dataset, params: dict[int, StripParams], requests: int, repeats: int
) -> dict[str, Any]:
    """req/s and latency per app and concurrency (medians over ``repeats``), and ratios
    to the ensemble."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    bodies = [encode_png(img) for img in patch_stream(stream.x, zoo, requests)[0]]
    defenses = {"ensemble": RoundDefense("nnoculation")} | {
        f"strip{n}": RoundDefense("codefend", {"strip": p.to_dict()}) for n, p in params.items()
    }
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False)  # fmt: skip
    port = 8766
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        a: {str(c): [] for c in CONCURRENCY} for a in defenses
    }
    with tempfile.TemporaryDirectory() as tmp:
        handles = {}
        for app, defense in defenses.items():
            store = Path(tmp) / app
            store.mkdir()
            args = GatewayArgs(db=_publish(store, zoo, defense), store=str(store))
            serve.run(build_app(args), name=app, route_prefix=f"/{app}")
            handles[app] = serve.get_deployment_handle("Ensemble", app_name=app)
            asyncio.run(_load(f"http://127.0.0.1:{port}/{app}", bodies[:50], 8))  # warm-up
        apps = list(defenses)
        for rep in range(repeats):
            for c in CONCURRENCY:
                for app in apps if rep % 2 == 0 else apps[::-1]:
                    before = handles[app].info.remote().result()["batch_sizes"]
                    row = asyncio.run(_load(f"http://127.0.0.1:{port}/{app}", bodies, c))
                    after = handles[app].info.remote().result()["batch_sizes"]
                    row["batch"] = _batch_delta(
                        {str(k): v for k, v in before.items()},
                        {str(k): v for k, v in after.items()},
                    )
                    runs[app][str(c)].append(row)
                    print(rep, app, c, {k: v for k, v in row.items() if k != "batch"}, flush=True)
        for app in apps:
            handles[app].flush.remote().result()
            serve.delete(app)
    serve.shutdown()
    ray.shutdown()
    return _summary(runs, requests, repeats)


def _summary(runs: dict[str, Any], requests: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": requests, "repeats": repeats, "apps": {}, "ratios": {}}
    for app, by_c in runs.items():
        out["apps"][app] = {
            c: {
                "rps": statistics.median(r["rps"] for r in rows),
                "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                "errors": sum(r["errors"] for r in rows),
                "mean_batch": statistics.mean(r["batch"]["mean"] for r in rows),
                "runs": rows,
            }
            for c, rows in by_c.items()
        }
    base = out["apps"]["ensemble"]
    for app, by_c in out["apps"].items():
        out["ratios"][app] = {
            c: {
                "throughput": row["rps"] / base[c]["rps"],
                "p99": row["p99_ms"] / base[c]["p99_ms"],
            }
            for c, row in by_c.items()
        }
    return out
