"""Per-slice predictions computed while a series arrives (see :mod:`triage_node.classify`).

A prediction is keyed by the slice, the model (weights SHA-256) and its ``neighbours`` digest
(which slices, at which field of view, went into the 2.5D input): a cached prediction is
used only when all three still match, so a late slice or a new model never reuses a stale
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from triage_node.domain import LABELS, InstanceState, SeriesState, utcnow
from triage_node.store.models import Instance, Series, SlicePrediction
from triage_node.store.repository import _check_uid, _insert_factory, _transaction

__all__ = ["receiving_series_counts", "save_slice_predictions", "slice_predictions"]

_SERIES = cast(sa.Table, Series.__table__)
_INSTANCE = cast(sa.Table, Instance.__table__)
_PREDICTION = cast(sa.Table, SlicePrediction.__table__)

#: (SOP Instance UID, neighbours digest, probabilities in LABELS order)
PredictionRow = tuple[str, str, Sequence[float]]


def save_slice_predictions(session_factory: sessionmaker[Session], model_sha256: str,
                           rows: Sequence[PredictionRow]) -> None:
    """Store slice predictions; one already stored (same slice, model, neighbours) is kept.

    Raises
    ------
    ValueError
        If a row does not carry one probability per label, or names an unknown instance.
    """
    if not rows:
        return
    for uid, digest, probs in rows:
        _check_uid(uid, "sop_instance_uid")
        if len(probs) != len(LABELS):
            raise ValueError(f"{uid}: {len(probs)} probabilities, expected {len(LABELS)}")
        if not digest or len(digest) > 64:
            raise ValueError(f"{uid}: neighbours digest {digest!r} must be 1-64 characters")
    now = utcnow()
    i = _INSTANCE.c
    with _transaction(session_factory, "store slice predictions") as session:
        uids = sorted({uid for uid, _, _ in rows})
        ids: dict[str, int] = {
            uid: pk for uid, pk in session.execute(
                sa.select(i.sop_instance_uid, i.id).where(i.sop_instance_uid.in_(uids)))
        }
        missing = sorted(set(uids) - ids.keys())
        if missing:
            raise ValueError(f"unknown instances {missing[:3]}")
        insert = _insert_factory(session)
        stmt = insert(_PREDICTION).on_conflict_do_nothing(
            index_elements=["instance_fk", "model_sha256", "neighbours"])
        session.execute(stmt, [
            {"instance_fk": ids[uid], "model_sha256": model_sha256, "neighbours": digest,
             "probabilities": [float(p) for p in probs], "created_at": now}
            for uid, digest, probs in rows
        ])


def slice_predictions(session_factory: sessionmaker[Session], series_instance_uid: str,
                      model_sha256: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """Stored predictions of one series under one model: ``(sop uid, neighbours) -> probs``."""
    _check_uid(series_instance_uid, "series_instance_uid")
    s, i, p = _SERIES.c, _INSTANCE.c, _PREDICTION.c
    stmt = (
        sa.select(i.sop_instance_uid, p.neighbours, p.probabilities)
        .select_from(_PREDICTION.join(_INSTANCE, i.id == p.instance_fk)
                     .join(_SERIES, s.id == i.series_fk))
        .where(s.series_instance_uid == series_instance_uid, p.model_sha256 == model_sha256)
    )
    with _transaction(session_factory, "read slice predictions", read_only=True) as session:
        return {(uid, digest): tuple(float(x) for x in probs)
                for uid, digest, probs in session.execute(stmt)}


def receiving_series_counts(session_factory: sessionmaker[Session]) -> dict[str, int]:
    """Series still receiving, with how many triageable (stored) slices each has so far."""
    s, i = _SERIES.c, _INSTANCE.c
    stmt = (
        sa.select(s.series_instance_uid, sa.func.count(i.id))
        .select_from(_SERIES.join(_INSTANCE, i.series_fk == s.id))
        .where(s.state == SeriesState.RECEIVING.value, i.state == InstanceState.STORED.value)
        .group_by(s.series_instance_uid)
    )
    with _transaction(session_factory, "count receiving series", read_only=True) as session:
        return {uid: int(n) for uid, n in session.execute(stmt)}
