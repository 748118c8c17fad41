"""The worker's two jobs: infer slices while a series arrives, and classify a complete series.

Both take a Series Instance UID, not objects, and are idempotent.

- :func:`infer_slices` (run while the series is still arriving) predicts the stored slices
  that have no prediction yet and stores them per slice (``slice_prediction``).
- :func:`classify_series` claims a complete series (queued -> processing), predicts whatever
  is still missing, aggregates (max over slices, key slice, flag) and stores the result
  (processing -> done). Run twice, the second run finds nothing queued and does nothing;
  interrupted, the series stays ``processing`` and a redelivered task claims it again.

A slice's prediction is reused only under the same model and the same input: the digest of
its 2.5D neighbours (which slices, in the final order, at which field of view) is part of
the key. A slice that arrives late between two others changes its neighbours' inputs, so
exactly those are predicted again; normally only the last slices of a series are left for
the end.

Slices are read from the spool (same host or a shared volume: :class:`~triage_node.spool.Spool`)
or fetched from the SCP host (:class:`~triage_node.spoolhttp.RemoteSpool`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.domain import (
    LABELS,
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceState,
    SeriesResult,
    utcnow,
)
from triage_node.errors import InvalidDatasetError
from triage_node.keyimage import store_key_images
from triage_node.pipeline import Predictor
from triage_node.preprocess import context_indices, series_fov, slice_position
from triage_node.series import SliceOrder, order_slices
from triage_node.spool import Spool
from triage_node.spoolhttp import RemoteSpool

log = logging.getLogger(__name__)

SliceStore = Spool | RemoteSpool

#: Who the audit trail names for what a worker did.
WORKER_ACTOR = f"worker@{socket.gethostname()}"


def slice_file(source: SliceStore, record: InstanceRecord) -> Path:
    """The local file of a stored instance (fetched first from a remote spool)."""
    if isinstance(source, RemoteSpool):
        return source.path(record.file_path, record.file_size)
    return source.path(record.file_path)


def read_header(source: SliceStore, record: InstanceRecord) -> Dataset:
    """The header (no pixel data) of a stored instance."""
    return _read(source, record, header_only=True)


def _read(source: SliceStore, record: InstanceRecord, *, header_only: bool) -> Dataset:
    path = slice_file(source, record)
    try:
        return dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:
        raise InvalidDatasetError(f"cannot read {record.sop_instance_uid}: {exc}") from exc


@dataclass
class _Plan:
    """The current order of a series and which slices still need a prediction."""

    ordered: list[InstanceRecord]
    info: SliceOrder
    headers: list[Dataset]
    fov: float
    digests: list[str]
    cached: dict[tuple[str, str], tuple[float, ...]]

    def missing(self) -> list[int]:
        return [i for i, (r, d) in enumerate(zip(self.ordered, self.digests, strict=True))
                if (r.sop_instance_uid, d) not in self.cached]


def _plan(factory: sessionmaker[Session], source: SliceStore, predictor: Predictor,
          series_instance_uid: str) -> _Plan | None:
    stored = [r for r in store.series_instances(factory, series_instance_uid)
              if r.state is InstanceState.STORED]
    if not stored:
        return None
    ordered, info = order_slices(stored)
    headers = [_read(source, r, header_only=True) for r in ordered]
    fov = series_fov(headers)
    n, k = len(ordered), predictor.spec.context
    digests = []
    for i in range(n):
        neighbours = "\n".join(ordered[j].sop_instance_uid for j in context_indices(n, i, k))
        digests.append(hashlib.sha256(f"{fov:.3f}\n{neighbours}".encode()).hexdigest())
    cached = store.slice_predictions(factory, series_instance_uid,
                                     predictor.model.meta.weights_sha256)
    return _Plan(ordered, info, headers, fov, digests, cached)


def _predict(factory: sessionmaker[Session], source: SliceStore, predictor: Predictor,
             plan: _Plan, targets: list[int]) -> None:
    """Predict ``targets`` (indices into the plan's order) and store them."""
    if not targets:
        return
    probs = predictor.predict_slices(
        lambda i: _read(source, plan.ordered[i], header_only=False), len(plan.ordered),
        targets, plan.fov)
    rows = [(plan.ordered[i].sop_instance_uid, plan.digests[i], tuple(map(float, p)))
            for i, p in zip(targets, probs, strict=True)]
    store.save_slice_predictions(factory, predictor.model.meta.weights_sha256, rows)
    plan.cached.update({(uid, d): p for uid, d, p in rows})


def infer_slices(factory: sessionmaker[Session], source: SliceStore, predictor: Predictor,
                 series_instance_uid: str) -> int:
    """Predict the slices of a still-arriving series that have no prediction yet.

    The last ``context`` slices in the current order are left for later: the next slices
    to arrive are most likely their neighbours. Returns how many slices were predicted.
    """
    plan = _plan(factory, source, predictor, series_instance_uid)
    if plan is None:
        return 0
    keep_back = predictor.spec.context
    targets = [i for i in plan.missing() if i < len(plan.ordered) - keep_back]
    t = time.perf_counter()
    _predict(factory, source, predictor, plan, targets)
    if targets:
        log.info("series %s: %d slices predicted ahead (%d stored so far, %.2f s)",
                 series_instance_uid, len(targets), len(plan.ordered), time.perf_counter() - t)
    return len(targets)


def classify_series(factory: sessionmaker[Session], source: SliceStore, predictor: Predictor,
                    series_instance_uid: str) -> SeriesResult | None:
    """Classify a queued series and store its result; None when it was not queued.

    Raises
    ------
    InvalidDatasetError
        If a slice cannot be read or decoded (the series stays ``processing``).
    SpoolError
        If a slice cannot be read from the spool or fetched from the spool server.
    DatabaseError
        If the database fails.
    """
    if not store.claim_series(factory, series_instance_uid):
        log.info("series %s is not queued: nothing to do", series_instance_uid)
        return None
    started = utcnow()
    t0 = time.perf_counter()
    plan = _plan(factory, source, predictor, series_instance_uid)
    if plan is None:
        raise InvalidDatasetError(f"series {series_instance_uid} has no stored slices")
    missing = plan.missing()
    _predict(factory, source, predictor, plan, missing)
    probs = np.array([plan.cached[(r.sop_instance_uid, d)]
                      for r, d in zip(plan.ordered, plan.digests, strict=True)], np.float32)
    prediction = predictor.summarise(
        [r.sop_instance_uid for r in plan.ordered],
        [slice_position(h) for h in plan.headers], probs)
    result = SeriesResult(
        series_instance_uid=series_instance_uid,
        probabilities=prediction.probabilities,
        slices=tuple((s.sop_instance_uid, s.position,
                      tuple(s.probabilities[lab] for lab in LABELS))
                     for s in prediction.slices),
        key_sop_instance_uid=prediction.key_sop_instance_uid,
        flagged=prediction.flagged,
        threshold=prediction.threshold,
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        model_sha256=prediction.model_sha256,
        inference_started_at=started,
        inference_done_at=utcnow(),
    )
    state = store.store_result(factory, result)
    store.record_events(factory, [EventRecord(
        EventKind.RESULT_STORED, utcnow(), actor=WORKER_ACTOR,
        outcome="flagged" if result.flagged else "negative",
        detail=(f"any={result.probabilities['any']:.3f} threshold={result.threshold:.3f} "
                f"model={result.model_name} {result.model_version} "
                f"sha256={result.model_sha256[:12]}"),
        series_instance_uid=series_instance_uid)])
    if isinstance(source, RemoteSpool):
        source.discard([r.file_path for r in plan.ordered])
    log.info("series %s classified: any=%.3f%s (%d slices, %d predicted now, %d ahead; "
             "%d duplicate positions dropped, %d gaps, %.2f s); series now %s",
             series_instance_uid, result.probabilities["any"],
             " FLAGGED" if result.flagged else "", len(result.slices), len(missing),
             len(result.slices) - len(missing), plan.info.duplicates, plan.info.gaps,
             time.perf_counter() - t0, state.value)
    return result


def render_key_images(factory: sessionmaker[Session], source: SliceStore, predictor: Predictor,
                      series_instance_uid: str) -> bool:
    """Render and store the key images (plain and heatmap) of a classified series.

    Run after the result (and its SR) went out: the images only illustrate the result in
    the worklist, so a failure is logged and False returned.
    """
    result = store.get_result(factory, series_instance_uid)
    plan = _plan(factory, source, predictor, series_instance_uid) if result else None
    if result is None or plan is None:
        return False
    try:
        return store_key_images(
            factory, predictor, result, plan.headers,
            load=lambda i: _read(source, plan.ordered[i], header_only=False))
    finally:
        if isinstance(source, RemoteSpool):
            source.discard([r.file_path for r in plan.ordered])
