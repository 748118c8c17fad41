"""Classify one complete series: the body of the worker's task.

Takes a Series Instance UID, not objects, and is idempotent: it claims the series (queued ->
processing), classifies its stored slices from the spool, and stores the result (processing
-> done). Run twice, the second run finds nothing queued and does nothing; interrupted, the
series stays ``processing`` and a redelivered task claims it again.

Assumes the worker sees the spool at ``[storage] path`` (same host, or a shared volume).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.domain import LABELS, InstanceState, SeriesResult, utcnow
from triage_node.pipeline import Predictor
from triage_node.series import order_slices
from triage_node.spool import Spool

log = logging.getLogger(__name__)


def classify_series(session_factory: sessionmaker[Session], spool: Spool, predictor: Predictor,
                    series_instance_uid: str) -> SeriesResult | None:
    """Classify a queued series and store its result; None when it was not queued.

    Raises
    ------
    InvalidDatasetError
        If a slice cannot be read or decoded (the series stays ``processing``).
    DatabaseError
        If the database fails.
    """
    if not store.claim_series(session_factory, series_instance_uid):
        log.info("series %s is not queued: nothing to do", series_instance_uid)
        return None
    stored = [r for r in store.series_instances(session_factory, series_instance_uid)
              if r.state is InstanceState.STORED]
    ordered, info = order_slices(stored)
    started = utcnow()
    prediction = predictor.predict_series([spool.path(r.file_path) for r in ordered])
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
    state = store.store_result(session_factory, result)
    log.info("series %s classified: any=%.3f%s (%d slices, %d duplicate positions dropped, "
             "%d gaps, %.2f s); series now %s", series_instance_uid,
             result.probabilities["any"], " FLAGGED" if result.flagged else "",
             len(result.slices), info.duplicates, info.gaps,
             prediction.timings.get("total", 0.0), state.value)
    return result
