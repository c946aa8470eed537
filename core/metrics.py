"""The metric names (DESIGN.md, "Metrics"), shared by the gateway, the watcher and the dashboard.

Replicas export through ``ray.serve.metrics`` on Ray's metrics port; Ray prefixes each
name with ``ray_`` and counters get ``_total``. :data:`EXPORTED` lists the names as
Prometheus sees them; the Grafana dashboard may name only those.
"""

from __future__ import annotations

PREDICTIONS = "bqg_predictions"  # counter, by round
QUARANTINED = "bqg_quarantined"  # counter, by round
LATENCY = "bqg_request_latency_seconds"  # histogram, by route
ACTIVE_ROUND = "bqg_active_round"  # gauge
PENDING = "bqg_pending_samples"  # gauge
SPOOL_DEPTH = "bqg_spool_depth"  # gauge
SWAP_FAILURES = "bqg_swap_failures"  # counter
LOOP_ERRORS = "bqg_loop_errors"  # counter, by loop (writer, follower): caught and retried
DROPPED = "bqg_quarantine_dropped"  # counter: samples neither stored nor spooled
SPOOL_BYTES = "bqg_spool_bytes"  # gauge
SPOOL_CAP = "bqg_spool_cap_bytes"  # gauge: the configured cap (BQG_MAX_SPOOL_BYTES)
REPAIR_ROUNDS = "bqg_repair_rounds"  # counter, by outcome (the repair watcher's)

REPAIR_SECONDS = "bqg_repair_round_seconds"  # histogram (the repair watcher's)

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

EXPORTED = {
    PREDICTIONS: "ray_bqg_predictions_total",
    QUARANTINED: "ray_bqg_quarantined_total",
    LATENCY: "ray_bqg_request_latency_seconds",
    ACTIVE_ROUND: "ray_bqg_active_round",
    PENDING: "ray_bqg_pending_samples",
    SPOOL_DEPTH: "ray_bqg_spool_depth",
    SWAP_FAILURES: "ray_bqg_swap_failures_total",
    LOOP_ERRORS: "ray_bqg_loop_errors_total",
    DROPPED: "ray_bqg_quarantine_dropped_total",
    SPOOL_BYTES: "ray_bqg_spool_bytes",
    SPOOL_CAP: "ray_bqg_spool_cap_bytes",
}


# The repair watcher exports with prometheus-client on its own port, without Ray's prefix.
WATCHER_EXPORTED = {
    PENDING: "bqg_pending_samples",
    REPAIR_ROUNDS: "bqg_repair_rounds_total",
    REPAIR_SECONDS: "bqg_repair_round_seconds",
}
