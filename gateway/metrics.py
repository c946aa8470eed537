"""The gateway's Ray Serve metric objects, named in :mod:`core.metrics`."""

from __future__ import annotations

from typing import Any

from core.metrics import (
    ACTIVE_ROUND,
    DROPPED,
    LATENCY,
    LATENCY_BUCKETS,
    LOOP_ERRORS,
    PENDING,
    PREDICTIONS,
    QUARANTINED,
    SPOOL_BYTES,
    SPOOL_CAP,
    SPOOL_DEPTH,
    SWAP_FAILURES,
)


class EnsembleMetrics:
    """The ensemble replica's metrics (created inside the replica, where Ray runs)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.predictions: Any = metrics.Counter(
            PREDICTIONS, "Predictions answered.", tag_keys=("round",)
        )
        self.quarantined: Any = metrics.Counter(
            QUARANTINED, "Inputs quarantined as suspect.", tag_keys=("round",)
        )
        self.active_round: Any = metrics.Gauge(ACTIVE_ROUND, "The round this replica serves.")
        self.spool_depth: Any = metrics.Gauge(
            SPOOL_DEPTH, "Quarantine samples spooled on local disk."
        )
        self.swap_failures: Any = metrics.Counter(SWAP_FAILURES, "Rounds that failed to load.")
        self.pending: Any = metrics.Gauge(
            PENDING, "Distinct quarantined images waiting for a repair round."
        )
        self.loop_errors: Any = metrics.Counter(
            LOOP_ERRORS, "Errors a background loop caught and retried.", tag_keys=("loop",)
        )
        self.dropped: Any = metrics.Counter(
            DROPPED, "Suspect samples dropped: the writer's queue or memory was full."
        )
        self.spool_bytes: Any = metrics.Gauge(SPOOL_BYTES, "Bytes of the on-disk spool.")
        self.spool_cap: Any = metrics.Gauge(SPOOL_CAP, "The spool's configured size cap.")


class IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.latency: Any = metrics.Histogram(
            LATENCY,
            "Request latency at the ingress.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("route",),
        )
