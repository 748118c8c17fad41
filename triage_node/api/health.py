"""``/healthz`` checks and ``/metrics`` (Prometheus text), read from the database and broker.

Health, each check with a short timeout:

* **database**: ``SELECT 1``;
* **broker**: Redis ``PING`` for ``redis://`` brokers; for the embedded transport, that its
  SQLite file (``<data_dir>/queue.db``) exists and opens; other brokers are not checked;
* **worker**: the ``worker_heartbeat`` table - each classification worker writes its row
  every :data:`~triage_node.store.worklist.HEARTBEAT_SECONDS` seconds; the check passes when
  one beat within :data:`WORKER_STALE_SECONDS`.

Metrics are computed at scrape time from the database (so every API process reports the
same numbers, and nothing is lost at a restart): cumulative counts are exposed as counters,
stored-result timings as histograms over all stored results.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.config import Config
from triage_node.domain import DeliveryState, utcnow
from triage_node.errors import DatabaseError
from triage_node.logs import redact_url

__all__ = [
    "WORKER_STALE_SECONDS",
    "NodeCollector",
    "broker_check",
    "health",
    "queue_depth",
]

#: A worker whose last heartbeat is older than this is considered gone.
WORKER_STALE_SECONDS = 60.0

#: Seconds a health probe may wait for the broker.
_PROBE_TIMEOUT = 2.0

#: Celery's default queue (the tasks are sent there).
_QUEUE = "celery"

INFERENCE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TIME_TO_RESULT_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _embedded_queue_file(config: Config) -> Path:
    """The embedded transport's SQLite file (as :func:`triage_node.tasks.broker_url`)."""
    return config.data_dir / "queue.db"


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=_PROBE_TIMEOUT,
                                socket_connect_timeout=_PROBE_TIMEOUT)


def broker_check(config: Config) -> dict[str, Any]:
    """Whether the broker answers: ``{"ok": bool, "kind": ..., "detail": ...}``."""
    url = config.queue.broker_url
    if url.startswith(("redis://", "rediss://")):
        try:
            client = _redis(url)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # redis raises many kinds; all mean "not reachable"
            return {"ok": False, "kind": "redis",
                    "detail": f"{redact_url(url)}: {type(exc).__name__}: {exc}"}
        return {"ok": True, "kind": "redis", "detail": f"{redact_url(url)} answers PING"}
    if url:
        return {"ok": True, "kind": "other", "detail": f"{redact_url(url)} (not checked)"}
    path = _embedded_queue_file(config)
    if not path.is_file():
        return {"ok": False, "kind": "embedded",
                "detail": f"{path} does not exist (no SCP or worker has started)"}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_PROBE_TIMEOUT)
        try:
            conn.execute("SELECT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return {"ok": False, "kind": "embedded", "detail": f"{path}: {exc}"}
    return {"ok": True, "kind": "embedded", "detail": str(path)}


def queue_depth(config: Config) -> int | None:
    """Tasks waiting in the broker, or None where it cannot be measured."""
    url = config.queue.broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            client = _redis(url)
            try:
                return int(client.llen(_QUEUE))
            finally:
                client.close()
        if url:
            return None
        path = _embedded_queue_file(config)
        if not path.is_file():
            return None
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_PROBE_TIMEOUT)
        try:
            row = conn.execute(
                "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
                " WHERE m.visible = 1 AND q.name = ?", (_QUEUE,)).fetchone()
        finally:
            conn.close()
        return int(row[0])
    except Exception:  # no table yet, broker gone: not measurable now
        return None


def health(config: Config, factory: sessionmaker[Session]) -> dict[str, Any]:
    """Run every check; ``{"ok": bool, "checks": {...}}``."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        store.ping(factory)
        checks["database"] = {"ok": True, "detail": redact_url(config.database.url)}
    except DatabaseError as exc:
        checks["database"] = {"ok": False, "detail": str(exc)}
    checks["broker"] = broker_check(config)
    if checks["database"]["ok"]:
        try:
            beats = store.heartbeats(factory)
        except DatabaseError as exc:
            checks["worker"] = {"ok": False, "detail": str(exc)}
        else:
            now = utcnow()
            alive = [b for b in beats
                     if (now - b.beat_at).total_seconds() <= WORKER_STALE_SECONDS]
            newest = beats[0].beat_at if beats else None
            checks["worker"] = {
                "ok": bool(alive),
                "alive": [b.name for b in alive],
                "last_beat_at": newest.isoformat() if newest else None,
                "detail": (f"{len(alive)} worker(s) alive" if alive else
                           "no worker heartbeat within "
                           f"{WORKER_STALE_SECONDS:.0f} s" + ("" if beats else " (none ever)")),
            }
    else:
        checks["worker"] = {"ok": False, "detail": "unknown: the database is unreachable"}
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks,
            "at": utcnow().isoformat()}


def _histogram(name: str, doc: str, values: tuple[float, ...],
               buckets: tuple[float, ...]) -> HistogramMetricFamily:
    counts = [(repr(b), float(sum(1 for v in values if v <= b))) for b in buckets]
    counts.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(sum(values)))


class NodeCollector(Collector):
    """Prometheus collector reading the node's state at every scrape."""

    def __init__(self, config: Config, factory: sessionmaker[Session]) -> None:
        self.config = config
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        """Yield the node's metrics (``triage_node_up`` 0 when the database is down)."""
        up = GaugeMetricFamily("triage_node_database_up",
                               "1 if the database answered this scrape")
        try:
            m = store.node_metrics(self.factory)
            beats = store.heartbeats(self.factory)
        except DatabaseError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield CounterMetricFamily("triage_node_instances_received",
                                  "DICOM instances received and recorded", value=m.instances)
        series = GaugeMetricFamily("triage_node_series", "Series by triage state",
                                   labels=["state"])
        for state, n in m.series_by_state.items():
            series.add_metric([state], float(n))
        yield series
        yield GaugeMetricFamily("triage_node_series_flagged",
                                "Series whose stored result is flagged (suspected ICH)",
                                value=float(m.flagged))
        depth = queue_depth(self.config)
        if depth is not None:
            yield GaugeMetricFamily("triage_node_queue_depth",
                                    "Tasks waiting in the broker's queue", value=float(depth))
        yield _histogram("triage_node_inference_seconds",
                         "Classification time of a series (start to end of inference)",
                         m.inference_seconds, INFERENCE_BUCKETS)
        yield _histogram("triage_node_time_to_result_seconds",
                         "Last slice received to result stored, per series",
                         m.time_to_result_seconds, TIME_TO_RESULT_BUCKETS)
        deliveries = GaugeMetricFamily("triage_node_sr_deliveries",
                                       "SR deliveries (outbox rows) by state", labels=["state"])
        for state, n in m.deliveries_by_state.items():
            deliveries.add_metric([state], float(n))
        yield deliveries
        yield CounterMetricFamily(
            "triage_node_sr_delivery_failures",
            "SR deliveries given up (failed permanently or out of attempts)",
            value=float(m.deliveries_by_state.get(DeliveryState.FAILED.value, 0)))
        yield CounterMetricFamily("triage_node_feedback",
                                  "Radiologist verdicts recorded", value=float(m.feedback))
        now = utcnow()
        alive = sum(1 for b in beats
                    if (now - b.beat_at) <= dt.timedelta(seconds=WORKER_STALE_SECONDS))
        yield GaugeMetricFamily("triage_node_workers_alive",
                                "Workers with a recent heartbeat", value=float(alive))
