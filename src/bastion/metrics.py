"""Prometheus metrics, served on their own listener (``metrics.listen``), never the public one.

Uses ``prometheus_client`` (the reference Python client). Names follow Prometheus
conventions (``_seconds``, ``_total``). Each worker process serves its own metrics;
with ``--workers N`` worker *i* listens on ``metrics.listen.port + i``.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("bastion_http_requests_total", "HTTP requests handled", ["method", "endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "bastion_http_request_seconds", "Time to handle a request (long-polls included)", ["method", "endpoint"],
    buckets=_LATENCY,
)
PERSIST_SECONDS = Histogram("bastion_event_persist_seconds", "Time to commit a batch of events", buckets=_LATENCY)
PERSIST_EVENTS = Counter("bastion_events_persisted_total", "Events committed by this worker")
SYNC_WAKE_SECONDS = Histogram(
    "bastion_sync_wakeup_seconds",
    "From an event's commit (on any worker) to the /sync long-polls it concerns being woken on this worker",
    buckets=_LATENCY,
)
SYNC_PACED = Counter(
    "bastion_sync_paced_total",
    "Long-poll /sync requests held back (at most limits.sync_pacing_ms) to batch events while the worker was busy",
)
LOOP_LAG_SECONDS = Gauge(
    "bastion_event_loop_lag_seconds", "How late the event loop ran a 20 ms timer, mean over the last 100 ms"
)
SYNC_WAITING = Gauge("bastion_sync_waiting", "Long-polling /sync requests held open")
DB_POOL_IN_USE = Gauge("bastion_db_pool_in_use", "Database connections in use")
DB_POOL_SIZE = Gauge("bastion_db_pool_size", "Database connections open")
BUS_LAG_SECONDS = Histogram(
    "bastion_bus_lag_seconds", "From a stream update published by another worker to its arrival here", buckets=_LATENCY
)
BUS_CONNECTED = Gauge("bastion_bus_connected", "1 while the Redis bus is connected")
CATCHUP_SECONDS = Histogram(
    "bastion_stream_catchup_seconds", "Time to load and apply other workers' stream updates", buckets=_LATENCY
)


def serve(host: str, port: int) -> Any:
    """Start the metrics HTTP listener in a background thread."""
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
