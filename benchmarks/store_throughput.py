"""Quarantine-store write throughput on SQLite and PostgreSQL.

    python -m benchmarks.store_throughput [--samples 20000] [--batch 500]

Goal (issue 3): batched inserts of 28x28 PNG samples reach >= 5,000 samples/s on both
databases. The baseline, measured in the same run, is one sample per transaction (what a
writer without batching would do). PNG encoding is timed separately: the gateway's writer
encodes before it inserts.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from sqlalchemy import text

from benchmarks.results import provenance, publish
from core.db import (
    StoreError,
    alembic_config,
    make_engine,
    open_store,
    session_factory,
    transaction,
)
from core.quarantine import NewSample, add_samples, pending_count

NAME = "store_throughput"
GOAL = 5000.0
POSTGRES_URL = os.environ.get(
    "BQG_TEST_POSTGRES_URL", "postgresql+psycopg://bqg:bqg@127.0.0.1:5432/bqg_test"
)


def _samples(n: int, offset: int) -> tuple[list[NewSample], float]:
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    start = time.perf_counter()
    samples = [
        NewSample.from_image(
            img, badnet_label=0, goodnet_label=1, served_round=0, detector="goodnet"
        )
        for img in images
    ]
    return samples, n / (time.perf_counter() - start)


def measure(url: str, n: int, batch: int, single: int) -> dict[str, Any]:
    if url.startswith("postgresql"):
        from alembic import command

        command.downgrade(alembic_config(url), "base")  # start from empty tables
    engine = open_store(url, apply_migrations=True)
    sessions = session_factory(engine)
    batched, encode_rate = _samples(n, 0)
    start = time.perf_counter()
    for i in range(0, n, batch):
        with transaction(sessions) as s:
            add_samples(session=s, samples=batched[i : i + batch])
    batched_rate = n / (time.perf_counter() - start)
    singles, _ = _samples(single, 1)
    start = time.perf_counter()
    for sample in singles:
        with transaction(sessions) as s:
            add_samples(session=s, samples=[sample])
    single_rate = single / (time.perf_counter() - start)
    with sessions() as s:
        rows = pending_count(session=s)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM quarantine_sample"))
    engine.dispose()
    return {
        "backend": make_engine(url).dialect.name,
        "batched_samples_per_s": batched_rate,
        "single_row_samples_per_s": single_rate,
        "speedup": batched_rate / single_rate,
        "png_encode_per_s": encode_rate,
        "rows_written": rows,
        "rows_expected": n + single,
        "meets_goal": batched_rate >= GOAL,
    }


def run(n: int, batch: int, single: int) -> dict[str, Any]:
    rows = []
    started = provenance()  # the commit and time the run began with
    with TemporaryDirectory() as tmp:
        rows.append(measure(f"sqlite:///{Path(tmp) / 'bench.db'}", n, batch, single))
    try:
        rows.append(measure(POSTGRES_URL, n, batch, single))
    except StoreError as exc:
        rows.append({"backend": "postgresql", "skipped": str(exc)})
    for row in rows:
        print(row, flush=True)
    return {
        "provenance": started,
        "samples": n,
        "batch": batch,
        "single_rows": single,
        "goal": GOAL,
        "rows": rows,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        "## Quarantine store throughput (issue 3)",
        "",
        f"{data['samples']} distinct 28x28 grey PNG samples inserted in transactions of {data['batch']}, "
        f"against {data['single_rows']} inserted one per transaction (the baseline, same run). "
        f"Goal: >= {data['goal']:.0f} samples/s batched.",
        "",
        "| database | batched samples/s | single-row samples/s | batched / single | PNG encodes/s | rows written | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['backend']} | {r['batched_samples_per_s']:.0f} | {r['single_row_samples_per_s']:.0f} | "
            f"{r['speedup']:.1f}x | {r['png_encode_per_s']:.0f} | {r['rows_written']} of {r['rows_expected']} | "
            f"{'PASS' if r['meets_goal'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--single", type=int, default=1000)
    args = parser.parse_args()
    path = publish(NAME, run(args.samples, args.batch, args.single), render)
    print(f"wrote {path} and docs/RESULTS.md")


if __name__ == "__main__":
    main()
