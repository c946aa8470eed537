"""Gateway throughput and latency against a single-model app and the bare models (issue 5).

    python -m benchmarks.gateway_load [--zoo var/zoo] [--requests 1500]

In one run, on this machine, with 1, 8 and 32 concurrent HTTP clients:
- the gateway: BadNet + GoodNet in the ensemble, quarantine on (a 10%-triggered stream);
- a single-model Ray Serve app with the same ingress (the GoodNet alone);
- the floor: both models' bare torch forward in-process (no HTTP, no Ray).
Goal: gateway throughput >= 0.85x the single-model app's and p99 latency <= 1.25x, at 8
and 32 clients. Needs the zoo's patch BadNet and clean model (benchmarks.badnet_zoo).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.results import provenance, publish
from core.bundle import load_bundle
from core.db import open_store, session_factory
from core.images import encode_png
from core.settings import Settings
from trainer.data import load_fashion_mnist
from trainer.lab import attack_of
from trainer.rounds import publish_round, running_round

NAME = "gateway_load"
CONCURRENCY = (1, 8, 32)


async def _load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                r = await client.post(
                    "/predict", content=body, headers={"content-type": "image/png"}
                )
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = np.quantile(latencies, [0.5, 0.99])
    return {
        "rps": len(bodies) / wall,
        "p50_ms": float(1000 * q[0]),
        "p99_ms": float(1000 * q[1]),
        "errors": errors,
    }


def _batch_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    delta = {int(k): after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    total = sum(delta.values())
    mean = sum(k * v for k, v in delta.items()) / total if total else 0.0
    return {"mean": mean, "max": max(delta, default=0), "batches": total}


def floor(bad_dir: Path, good_dir: Path, images: np.ndarray) -> dict[str, float]:
    """Both models' forward in-process: images/s at batch 32 and ms per single image."""
    torch.set_num_threads(1)  # as one ensemble replica runs
    bad, good = load_bundle(bad_dir), load_bundle(good_dir)
    batch = images[:32]
    for _ in range(5):
        bad.logits(batch), good.logits(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        bad.logits(batch), good.logits(batch)
        n += len(batch)
    rps32 = n / (time.perf_counter() - start)
    single = []
    for img in images[:300]:
        t = time.perf_counter()
        bad.logits(img[None]), good.logits(img[None])
        single.append(time.perf_counter() - t)
    return {"images_per_s_batch32": rps32, "ms_per_image_batch1": 1000 * statistics.median(single)}


def patch_stream(x: np.ndarray, zoo: Path, requests: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``requests`` stream images, 10% of them (seed 0) carrying the zoo's patch
    trigger: (images, which are triggered)."""
    attack = attack_of(zoo / "patch")
    assert attack is not None
    rng = np.random.default_rng(0)
    images = x[:requests].copy()
    poisoned = rng.random(len(images)) < 0.10
    images[poisoned] = attack.groups[0].apply(images[poisoned], rng)
    return images, poisoned


def run(zoo: Path, requests: int, repeats: int) -> dict[str, Any]:
    started = provenance()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from gateway.app import build_app
    from gateway.config import GatewayArgs

    settings = Settings()
    stream = load_fashion_mnist(settings.fashion_mnist_dir, "stream")
    images, poisoned = patch_stream(stream.x, zoo, requests)
    bodies = [encode_png(img) for img in images]
    result: dict[str, Any] = {
        "provenance": started,
        "requests": requests,
        "repeats": repeats,
        "triggered_fraction": float(poisoned.mean()),
    }
    result["floor"] = floor(zoo / "patch", zoo / "clean", images)

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        db_url = f"sqlite:///{store / 'q.db'}"
        sessions = session_factory(open_store(db_url))

        def write(out: Path) -> None:
            shutil.copytree(zoo / "patch", out / "badnet")
            shutil.copytree(zoo / "clean", out / "goodnet")

        with running_round(sessions, 0):
            publish_round(sessions=sessions, store=store, round_no=0, write=write, metrics={})
        labels = ("single_model", "gateway")
        handles, urls = {}, {}
        for label in labels:
            args = GatewayArgs(db=db_url, store=str(store), single_model=label == "single_model")
            serve.run(build_app(args), name=label, route_prefix=f"/{label}")
            handles[label] = serve.get_deployment_handle("Ensemble", app_name=label)
            urls[label] = f"http://127.0.0.1:{port}/{label}"
            asyncio.run(_load(urls[label], bodies[:100], 8))  # warm-up
        # Interleaved and repeated: this machine's speed drifts, so each concurrency level
        # alternates the two apps (the first one alternating too) and medians are reported.
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            label: {str(c): [] for c in CONCURRENCY} for label in labels
        }
        for rep in range(repeats):
            for c in CONCURRENCY:
                for label in labels if rep % 2 == 0 else labels[::-1]:
                    before = handles[label].info.remote().result()["batch_sizes"]
                    row = asyncio.run(_load(urls[label], bodies, c))
                    after = handles[label].info.remote().result()["batch_sizes"]
                    row["batch"] = _batch_delta(
                        {str(k): v for k, v in before.items()},
                        {str(k): v for k, v in after.items()},
                    )
                    runs[label][str(c)].append(row)
                    print(rep, label, c, row, flush=True)
        for label in labels:
            result[label] = {
                c: {
                    "rps": statistics.median(r["rps"] for r in rows),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rows),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                    "errors": sum(r["errors"] for r in rows),
                    "batch": {
                        "mean": statistics.mean(r["batch"]["mean"] for r in rows),
                        "max": max(r["batch"]["max"] for r in rows),
                    },
                    "runs": rows,
                }
                for c, rows in runs[label].items()
            }
            handles[label].flush.remote().result()
            serve.delete(label)
    serve.shutdown()
    ray.shutdown()
    result["ratios"] = {
        str(c): {
            "throughput": result["gateway"][str(c)]["rps"] / result["single_model"][str(c)]["rps"],
            "p99": result["gateway"][str(c)]["p99_ms"] / result["single_model"][str(c)]["p99_ms"],
        }
        for c in CONCURRENCY
    }
    result["checks"] = {
        f"{c}_clients": bool(
            result["ratios"][str(c)]["throughput"] >= 0.85
            and result["ratios"][str(c)]["p99"] <= 1.25
        )
        for c in (8, 32)
    }
    return result


def render(data: dict[str, Any]) -> str:
    f = data["floor"]
    lines = [
        "## Gateway load (issue 5)",
        "",
        f"{data['requests']} PNG requests from the Fashion-MNIST stream split, {100 * data['triggered_fraction']:.0f}% "
        f"carrying the patch trigger, per concurrency level and app, repeated {data['repeats']} times with the two apps "
        "interleaved; medians of req/s and latency, batch sizes over all runs. The load generator runs on the same 2 cores. "
        "Gateway = BadNet + GoodNet with quarantine writes; single = the GoodNet alone behind the same ingress.",
        "",
        "| clients | app | req/s | p50 ms | p99 ms | errors | mean batch | max batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCY:
        for app in ("single_model", "gateway"):
            r = data[app][str(c)]
            lines.append(
                f"| {c} | {app.replace('_', '-')} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                f"{r['batch']['mean']:.1f} | {r['batch']['max']} |"
            )
    lines += [
        "",
        "| clients | throughput gateway / single | p99 gateway / single | goal (>= 0.85, <= 1.25) |",
        "|---|---|---|---|",
    ]
    for c in CONCURRENCY:
        r = data["ratios"][str(c)]
        goal = (
            {True: "PASS", False: "FAIL"}[data["checks"][f"{c}_clients"]]
            if f"{c}_clients" in data["checks"]
            else "-"
        )
        lines.append(f"| {c} | {r['throughput']:.2f}x | {r['p99']:.2f}x | {goal} |")
    lines += [
        "",
        f"Floor (both models' bare forward in-process, 1 thread): {f['images_per_s_batch32']:.0f} images/s at batch 32, "
        f"{f['ms_per_image_batch1']:.2f} ms per single image.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = run(args.zoo, args.requests, args.repeats)
    path = publish(NAME, data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
