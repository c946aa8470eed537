"""Hostile HTTP against a live gateway (issue 31): generated attacks, with an honest client
beside them.

    python -m benchmarks.hostile_http [--requests 5000]

A real Ray Serve app serves a small Fashion-MNIST pair (fabricated here, one epoch each: the
input handling is under test, not the models). Hypothesis generates the requests: random
bytes and JSON, nesting to 5,000 deep, integers to 10,000 digits, PNG headers up to
65535x65535, 64-instance bombs of such headers, 30 MB admin bodies, pixels as strings and
booleans. Beside them, an ordinary client posts a valid image every 50 ms.
Goals: no answer >= 500; every hostile request answered in under 1 s; the ordinary
client's slowest answer under 1 s; the Serve replicas' resident memory grows < 200 MB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.lab_pair import round_zero
from benchmarks.results import checks_line, provenance, publish

NAME = "hostile_http"
ADMIN_BODY = b'{"round": 0, "pad": "' + b"a" * (30 * 1024 * 1024) + b'"}'
PATHS = ["/predict", "/v1/models/gateway:predict", "/v1/models/other:predict", "/admin/activate"]
Request = tuple[str, dict[str, str], bytes]


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` grey pixels, with one row of data: tiny on
    the wire, huge if a server decodes it before checking its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (min(width, 65535) + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JSON = {"content-type": "application/json"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(
        st.sampled_from(["image", "pixels", "b64", "instances", "round", "x"]), children, max_size=3
    ),
    max_leaves=30,
)
sides = st.integers(0, 65535)
headers_png = st.builds(png_header, sides, sides)
pixel_oddities = st.sampled_from(['"255"', "true", "null", "1e400", "-0", "{}", "[]"])


def _odd_pixels(odd: str) -> bytes:
    """A 28x28 pixels body whose first value is the JSON text ``odd``."""
    rows = [",".join(["0"] * 28) for _ in range(28)]
    rows[0] = odd + rows[0][1:]
    return ('{"pixels": [' + ",".join(f"[{row}]" for row in rows) + "]}").encode()


def _wrap(route: str, json_body: bytes) -> Request:
    return route, JSON, json_body


hostile_requests: st.SearchStrategy[Request] = st.one_of(
    st.tuples(st.sampled_from(PATHS), st.just({"content-type": "image/png"}), headers_png),
    st.builds(  # nesting to 5,000 deep
        lambda route, d: _wrap(route, b'{"pixels": ' + b"[" * d + b"]" * d + b"}"),
        st.sampled_from(PATHS),
        st.integers(1, 5000),
    ),
    st.builds(  # integers to 10,000 digits, as a pixel and as a round
        lambda route, n, key: _wrap(route, b'{"' + key + b'": [[' + b"9" * n + b"]]}"),
        st.sampled_from(PATHS),
        st.integers(1, 10_000),
        st.sampled_from([b"pixels", b"round"]),
    ),
    st.builds(lambda odd: _wrap("/predict", _odd_pixels(odd)), pixel_oddities),
    st.builds(  # 64-instance bombs of huge declared PNGs
        lambda n, side: _wrap(
            "/v1/models/gateway:predict",
            json.dumps({"instances": [{"b64": _b64(png_header(side, side))}] * n}).encode(),
        ),
        st.integers(1, 65),
        st.sampled_from([28, 4096, 65535]),
    ),
    st.builds(lambda v: _wrap("/predict", json.dumps(v).encode()), json_values),
    st.tuples(st.sampled_from(PATHS), st.just(JSON), st.binary(max_size=3000)),
    st.builds(  # 30 MB admin bodies, with and without a (wrong) token
        lambda auth: ("/admin/activate", {**JSON, **auth}, ADMIN_BODY),
        st.sampled_from([{}, {"authorization": "Bearer nope"}]),
    ),
)


class OrdinaryClient(threading.Thread):
    """Posts one valid image every 50 ms until stopped; keeps each answer's latency."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set():
                start = time.perf_counter()
                try:
                    r = client.post(
                        "/predict", content=self.body, headers={"content-type": "image/png"}
                    )
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - start)
                self.stopping.wait(0.05)


def replica_rss(app: str) -> int:
    """Resident bytes of this app's Serve replica processes (their titles name the app)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if f"ServeReplica:{app}:".encode() not in title:
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
        total += int(kb) * 1024
    return total


def hammer(url: str, count: int, ordinary_body: bytes) -> dict[str, Any]:
    """``count`` generated hostile requests against ``url``, an ordinary client beside them:
    statuses, the slowest hostile answers, and the ordinary client's latencies."""
    statuses: dict[str, int] = {}
    slowest: list[tuple[float, str]] = []
    server_errors: list[str] = []
    ordinary = OrdinaryClient(url, ordinary_body)
    ordinary.start()

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=hostile_requests)
    def one(request: Request) -> None:
        route, headers, body = request
        start = time.perf_counter()
        try:
            r = client.post(route, content=body, headers=headers)
            status = str(r.status_code)
            if r.status_code >= 500:
                server_errors.append(f"{route} {body[:60]!r}: {r.text[:200]}")
        except httpx.HTTPError as exc:
            status = type(exc).__name__
            server_errors.append(f"{route} {body[:60]!r}: {exc!r}")
        seconds = time.perf_counter() - start
        statuses[status] = statuses.get(status, 0) + 1
        slowest.append((seconds, f"{route} {len(body)} bytes {body[:40]!r}"))
        slowest.sort(reverse=True)
        del slowest[5:]

    with httpx.Client(base_url=url, timeout=30) as client:
        one()
    ordinary.stopping.set()
    ordinary.join(timeout=30)
    lat = np.asarray(ordinary.latencies)
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": server_errors[:20],
        "server_error_count": len(server_errors),
        "slowest": [{"seconds": s, "request": what} for s, what in slowest],
        "ordinary": {
            "requests": len(lat),
            "failures": ordinary.failures[:20],
            "p50_ms": float(1000 * np.median(lat)) if len(lat) else None,
            "max_ms": float(1000 * lat.max()) if len(lat) else None,
        },
    }


def run(count: int) -> dict[str, Any]:
    started = provenance()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from core.images import encode_png
    from gateway.app import build_app
    from gateway.config import GatewayArgs

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        db_url = f"sqlite:///{store / 'q.db'}"
        image = round_zero(store, db_url)[0]
        os.environ["BQG_ADMIN_TOKEN"] = "hostile-bench-token"  # the replicas inherit it
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        port = 8766
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = GatewayArgs(db=db_url, store=str(store))
        serve.run(build_app(args), name=NAME, route_prefix=f"/{NAME}")
        url = f"http://127.0.0.1:{port}/{NAME}"
        body = encode_png(image)
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(50):  # warm-up, so that memory is measured from a serving state
                client.post("/predict", content=body, headers={"content-type": "image/png"})
        rss_before = replica_rss(NAME)
        result = hammer(url, count, body)
        rss_after = replica_rss(NAME)
        serve.shutdown()
        ray.shutdown()
    result["rss_mb"] = {"before": rss_before / 2**20, "after": rss_after / 2**20}
    result["checks"] = goals(result)
    return {"provenance": started, **result}


def goals(result: dict[str, Any]) -> dict[str, bool]:
    rss = result.get("rss_mb")
    checks = {
        "no answer >= 500": result["server_error_count"] == 0,
        "every hostile answer < 1 s": all(s["seconds"] < 1.0 for s in result["slowest"]),
        "ordinary client's slowest < 1 s": (result["ordinary"]["max_ms"] or 0) < 1000
        and not result["ordinary"]["failures"],
    }
    if rss is not None:
        checks["replica memory grows < 200 MB"] = rss["after"] - rss["before"] < 200
    return checks


def render(data: dict[str, Any]) -> str:
    o, rss = data["ordinary"], data["rss_mb"]
    statuses = ", ".join(f"{k}: {v}" for k, v in data["statuses"].items())
    worst = data["slowest"][0]
    return (
        "## Hostile HTTP (issue 31)\n\n"
        f"{data['requests']} generated hostile requests against the live gateway. "
        f"Answers by status: {statuses}. Answers >= 500: {data['server_error_count']}.\n\n"
        f"Slowest hostile answer: {1000 * worst['seconds']:.0f} ms ({worst['request'][:60]}).\n"
        f"The ordinary client beside them ({o['requests']} requests): median "
        f"{o['p50_ms']:.1f} ms, slowest {o['max_ms']:.0f} ms, {len(o['failures'])} failures.\n"
        f"Serve replicas' resident memory: {rss['before']:.0f} MB before, "
        f"{rss['after']:.0f} MB after.\n\n"
        f"Goals: {checks_line(data['checks'])}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="hostile requests (5000)")
    args = parser.parse_args()
    data = run(args.requests)
    path = publish(NAME, data, render)
    print(render(data))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
