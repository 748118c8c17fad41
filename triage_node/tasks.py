"""The queue: Celery tasks, the producer side, and the series assembler loop.

Broker: ``[queue] broker_url`` (Redis in production). Empty means the embedded durable
transport: kombu's SQLAlchemy transport on ``<data_dir>/queue.db``, so queued work survives a
restart without a Redis server.

Two tasks, both taking a Series Instance UID and both idempotent, which is what makes
``acks_late`` with ``reject_on_worker_lost`` safe (a task redelivered after its worker died
runs again and replaces, never doubles, what it stores):

- ``infer_slices``: queued by the assembler every ``[queue] eager_batch`` new slices while a
  series arrives (and when it pauses), so most inference is done when the series completes;
- ``classify_series``: queued when assembly decides a series is complete and selected; it
  predicts what is left, aggregates and stores the series result.

Workers read slices from the spool, or fetch them from the SCP host's spool server when
``[queue] spool_url`` is set (:mod:`triage_node.spoolhttp`); messages carry only UIDs.

Importing this module does not import torch: the worker loads the model on its first task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import logging
import threading
import time
from dataclasses import replace
from functools import cache, partial
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.config import Config, TriageConfig
from triage_node.domain import SeriesState, utcnow
from triage_node.series import assemble_due, not_selected_reason
from triage_node.spool import Spool

log = logging.getLogger(__name__)

CLASSIFY_TASK = "triage_node.classify_series"
INFER_TASK = "triage_node.infer_slices"

#: A series decided this recently is not re-queued by a starting worker (see run_assembler).
SWEEP_GRACE_SECONDS = 30.0

#: How often a worker on the embedded transport looks for tasks (an indexed SQLite query).
EMBEDDED_POLL_SECONDS = 0.1


def broker_url(config: Config) -> str:
    """The effective broker URL (the embedded SQLite transport when none is configured)."""
    return config.queue.broker_url or f"sqla+sqlite:///{config.data_dir / 'queue.db'}"


def make_celery(config: Config) -> Celery:
    """A Celery app for ``config``, with the classify task registered."""
    url = broker_url(config)
    if not config.queue.broker_url:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("triage_node", broker=url, set_as_current=False)
    if url.startswith(("redis://", "rediss://")):
        # A task not acknowledged within this long (worker gone) is delivered again.
        app.conf.broker_transport_options = {
            "visibility_timeout": config.queue.visibility_timeout}
    else:  # the embedded SQLite transport polls, by default every second: every task
        # (several per series) would wait up to that long. Its transport options go to
        # create_engine(), so the interval is set on the transport class.
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = EMBEDDED_POLL_SECONDS
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=CLASSIFY_TASK, bind=True, max_retries=None, acks_late=True,
              reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def classify(self: Any, series_instance_uid: str) -> bool:
        from triage_node.classify import classify_series, render_key_images
        from triage_node.errors import InvalidDatasetError, StoreError

        ctx = _worker_context(config)
        try:
            classified = classify_series(ctx.factory, ctx.source, ctx.predictor,
                                         series_instance_uid) is not None
            # Also when this is a redelivery of a task that classified but did not queue
            # the SR: queuing is idempotent, and it does nothing without a result.
            _queue_sr(config, ctx, series_instance_uid)
            # The worklist's key images (and the SC made of them), once the SR is on its way.
            if classified and render_key_images(ctx.factory, ctx.source, ctx.predictor,
                                                series_instance_uid):
                _queue_key_image(config, ctx, series_instance_uid)
            return classified
        except StoreError as exc:  # database or spool server will be back: back off, keep on
            raise self.retry(exc=exc, countdown=min(60, 2 ** min(self.request.retries, 6))
                             ) from exc
        except InvalidDatasetError as exc:  # retrying will not decode it: say so and move on
            from triage_node.classify import WORKER_ACTOR
            from triage_node.domain import EventKind, EventRecord, utcnow

            log.error("series %s failed: %s", series_instance_uid, exc)
            if store.fail_series(ctx.factory, series_instance_uid, f"cannot classify: {exc}"):
                store.record_events(ctx.factory, [EventRecord(
                    EventKind.SERIES_FAILED, utcnow(), actor=WORKER_ACTOR, outcome="failed",
                    detail=str(exc), series_instance_uid=series_instance_uid)])
            return False

    @app.task(name=INFER_TASK, acks_late=True,
              reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def infer(series_instance_uid: str) -> int:
        from triage_node.classify import infer_slices
        from triage_node.errors import TriageNodeError

        ctx = _worker_context(config)
        try:
            return infer_slices(ctx.factory, ctx.source, ctx.predictor, series_instance_uid)
        except TriageNodeError as exc:  # only a head start: the series task does it all
            log.warning("series %s: inference ahead of completion failed: %s",
                        series_instance_uid, exc)
            return 0

    return app


class _WorkerContext:
    """What one worker process builds once: engine, spool, and the loaded model."""

    def __init__(self, config: Config) -> None:
        from triage_node.model import DEFAULT_ARCHITECTURE
        from triage_node.pipeline import Predictor
        from triage_node.spoolhttp import RemoteSpool

        self.factory = store.make_session_factory(store.make_engine(config.database.url))
        self.source: Spool | RemoteSpool
        if config.queue.spool_url:
            self.source = RemoteSpool(config.queue.spool_url, config.data_dir / "fetched",
                                      token=config.storage.http_token)
        else:
            self.source = Spool(config.storage.path)
        if not config.model.path:
            raise RuntimeError(
                "no model: set [model] path (training lands with `triage-node train`; "
                f"architecture default {DEFAULT_ARCHITECTURE})"
            )
        self.predictor = Predictor.from_path(config.model.path, device=config.model.device)
        log.info("worker loaded model %s (%s)", config.model.path,
                 self.predictor.model.meta.version)


#: Wakes the delivery loop of this process when the worker has just queued an SR.
_DELIVERY_WAKE = threading.Event()


def _queue_sr(config: Config, ctx: _WorkerContext, series_instance_uid: str) -> None:
    """Queue the SR of a stored result for ``[[destinations]]`` (see :mod:`sender`)."""
    from triage_node.classify import read_header
    from triage_node.errors import InvalidDatasetError, NodeStateError
    from triage_node.sender import queue_results_for_delivery

    if not config.destinations:
        return
    try:
        if queue_results_for_delivery(ctx.factory, config, series_instance_uid,
                                      read_header=partial(read_header, ctx.source)):
            _DELIVERY_WAKE.set()  # a delivery loop in this process sends it now
    except (InvalidDatasetError, NodeStateError) as exc:  # the result stays; say why no SR
        log.error("series %s: no SR queued: %s", series_instance_uid, exc)


def _queue_key_image(config: Config, ctx: _WorkerContext, series_instance_uid: str) -> None:
    """Queue the key-image SC next to the SR (``[results] key_image``)."""
    from triage_node.classify import read_header
    from triage_node.errors import InvalidDatasetError, NodeStateError
    from triage_node.sender import queue_key_image_for_delivery

    try:
        if queue_key_image_for_delivery(ctx.factory, config, series_instance_uid,
                                        read_header=partial(read_header, ctx.source)):
            _DELIVERY_WAKE.set()
    except (InvalidDatasetError, NodeStateError, ValueError) as exc:  # the SR is what counts
        log.error("series %s: no key image sent: %s", series_instance_uid, exc)


@cache
def _worker_context(config: Config) -> _WorkerContext:
    return _WorkerContext(config)


def warm_up(config: Config) -> None:
    """Load the model now (at worker start), not on the first series."""
    _worker_context(config)


def enqueue(app: Celery, series_instance_uid: str) -> None:
    """Queue a series for classification (durably, in the broker)."""
    app.send_task(CLASSIFY_TASK, args=[series_instance_uid])


class EagerBatches:
    """Decides when a still-arriving series gets an ``infer_slices`` task.

    Every ``batch`` new stored slices, and when arrivals pause (no new slice since the last
    look) with slices not yet handed out. Series whose known slices already rule them out
    (not axial, not a head) get none. Memory only: after a restart the series task simply
    has more left to do.
    """

    def __init__(self, rules: TriageConfig, batch: int) -> None:
        self.rules = replace(rules, min_slices=1)  # the count is judged at completion
        self.batch = batch
        self._sent: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._skip: set[str] = set()

    def due(self, factory: sessionmaker[Session]) -> list[str]:
        """Series to queue an ``infer_slices`` task for now."""
        if self.batch <= 0:
            return []
        counts = store.receiving_series_counts(factory)
        for gone in set(self._sent) - counts.keys():
            del self._sent[gone]
        for gone in set(self._seen) - counts.keys():
            del self._seen[gone]
        self._skip &= counts.keys()
        out = []
        for uid, n in counts.items():
            sent, seen = self._sent.get(uid, 0), self._seen.get(uid, 0)
            self._seen[uid] = n
            if uid in self._skip or n <= sent:
                continue
            if n - sent >= self.batch or n == seen:
                if not_selected_reason(store.series_instances(factory, uid), self.rules):
                    self._skip.add(uid)
                    continue
                self._sent[uid] = n
                out.append(uid)
        return out


def run_assembler(config: Config, app: Celery, stop: threading.Event,
                  interval: float = 0.2) -> None:
    """Decide complete series every ``interval`` s and queue the selected ones, until ``stop``.

    At start it re-queues series left ``queued`` or ``processing`` (a crash between deciding
    and queuing, or a lost task) and, with ``[[destinations]]``, series whose last result
    (of the past day) has no SR yet (a worker that died between storing the result and
    queuing the SR): tasks are idempotent, so a duplicate costs only time. A series decided
    while the broker is unreachable stays in memory and is queued as soon as it is back;
    failures back off (up to 10 s) instead of flooding the log.
    """
    from triage_node.sender import SR_SOP_CLASS_UID

    factory = store.make_session_factory(store.make_engine(config.database.url))
    eager = EagerBatches(config.triage, config.queue.eager_batch)
    left = (SeriesState.QUEUED.value, SeriesState.PROCESSING.value)
    unsent: set[str] = set()
    # Start-up sweeps, now and once more after the grace: a series decided in the last
    # SWEEP_GRACE_SECONDS may belong to another worker's live assembler (re-queuing it would
    # have two workers classify it at once); one left by a crash is older by the second.
    sweeps = [time.monotonic(), time.monotonic() + SWEEP_GRACE_SECONDS]
    failures = 0
    while not stop.is_set():
        try:
            if sweeps and time.monotonic() >= sweeps[0]:
                found = set(store.series_in_states(
                    factory, left,
                    decided_before=utcnow() - dt.timedelta(seconds=SWEEP_GRACE_SECONDS)))
                if config.destinations:
                    found |= set(store.results_without_document(
                        factory, SR_SOP_CLASS_UID, since=utcnow() - dt.timedelta(days=1)))
                for uid in sorted(found - unsent):
                    log.info("re-queuing series %s left from before", uid)
                unsent |= found
                sweeps.pop(0)
            for uid in eager.due(factory):
                app.send_task(INFER_TASK, args=[uid])
            for decision in assemble_due(factory, config.triage):
                if decision.selected:
                    unsent.add(decision.series_instance_uid)
            while unsent:  # decided (queued in the database): now into the broker
                uid = min(unsent)
                enqueue(app, uid)
                unsent.discard(uid)
            if failures:
                log.info("series assembly works again after %d failed rounds", failures)
            failures = 0
        except Exception as exc:  # a database or broker outage, or one bad series
            failures += 1
            if failures == 1 or failures % 100 == 0:
                log.exception("series assembly failed (%d in a row); retrying", failures)
            else:
                log.warning("series assembly failed (%d in a row): %s", failures, exc)
        stop.wait(interval if not failures else min(10.0, interval * 2 ** min(failures, 5)))


def worker_main(config: Config, *, assembler: bool = True) -> None:
    """Run a worker process until SIGTERM: the series assembler, the SR delivery loop (when
    there are ``[[destinations]]``) and a Celery worker.

    Without ``[model] path`` only the assembler runs: series are decided and queued (in the
    broker, durably) and wait there until a worker with a model consumes them.
    """
    import signal

    from triage_node.logs import setup_logging

    setup_logging(config.logging.level, json_lines=config.logging.json)
    store.upgrade(config.database.url)
    app = make_celery(config)
    stop = threading.Event()
    assembling: threading.Thread | None = None
    if assembler:
        assembling = threading.Thread(target=run_assembler, args=(config, app, stop),
                                      name="assembler", daemon=True)
        assembling.start()
        if config.destinations:
            from triage_node.sender import run_delivery

            factory = store.make_session_factory(store.make_engine(config.database.url))
            threading.Thread(target=run_delivery, args=(config, factory, stop),
                             kwargs={"wake": _DELIVERY_WAKE}, name="delivery",
                             daemon=True).start()
    if config.model.path and importlib.util.find_spec("torch") is None:
        log.error("[model] path is %s but torch is not installed (pip install "
                  "'triage-node[ml]'): series are only assembled and queued",
                  config.model.path)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=""))
    if not config.model.path:
        log.warning("no [model] path: series are assembled and queued, not classified, until "
                    "a worker with a model runs")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        _finish_round(assembling)
        return
    warm_up(config)  # the solo pool runs tasks in this process: load the model once, now
    from triage_node.store.worklist import run_heartbeat  # /healthz: a worker is alive

    threading.Thread(target=run_heartbeat, name="heartbeat", daemon=True, args=(
        store.make_session_factory(store.make_engine(config.database.url)), stop)).start()
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--without-gossip",
                         "--without-mingle", f"--loglevel={config.logging.level}",
                         "-n", "triage@%h"])
    finally:
        stop.set()
        _finish_round(assembling)


def _finish_round(assembling: threading.Thread | None) -> None:
    """On shutdown, let the assembler finish its round: a series it has just decided (queued
    in the database) also gets its task into the broker before the process exits."""
    if assembling is not None:
        assembling.join(timeout=30)
        if assembling.is_alive():
            log.warning("the assembler did not finish its round within 30 s")
