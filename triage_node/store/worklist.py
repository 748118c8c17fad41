"""The radiologist worklist: prioritised series, key images, feedback, worker heartbeats.

Read side of the API (:mod:`triage_node.api`) and the few writes it and the worker need:

    list_worklist       series in priority order: flagged first (highest ``any`` first),
                        then the rest in order of arrival (oldest first)
    series_detail       one series: its row, result, key-image metadata, events, feedback
    record_feedback     a radiologist's verdict (append-only, audited as an event)
    feedback_labels     the latest verdict per series as training labels
    save_key_images     the worker's PNGs of the key slice (plain and heatmap)
    beat / heartbeats   the worker's sign of life (``/healthz``)
    node_metrics        counts and timings for ``/metrics``

The value objects are defined here (they belong to the worklist only); nothing here returns
patient names.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from triage_node.domain import (
    LABELS,
    DeliveryState,
    EventKind,
    EventRecord,
    SeriesState,
    utcnow,
)
from triage_node.store.models import (
    Event,
    Feedback,
    Instance,
    KeyImage,
    OutboxItem,
    Patient,
    ResultDocument,
    Series,
    Study,
    WorkerHeartbeat,
)
from triage_node.store.models import SeriesResult as SeriesResult_
from triage_node.store.repository import (
    _check_aware,
    _check_limit,
    _check_uid,
    _insert_factory,
    _transaction,
    list_events,
)

__all__ = [
    "HEARTBEAT_SECONDS",
    "SUBTYPES",
    "DeliverySummary",
    "FeedbackLabel",
    "FeedbackRecord",
    "Heartbeat",
    "KeyImages",
    "NodeMetrics",
    "WorklistRow",
    "beat",
    "feedback_labels",
    "forget_workers",
    "get_key_images",
    "heartbeats",
    "list_feedback",
    "list_worklist",
    "node_metrics",
    "ping",
    "record_feedback",
    "run_heartbeat",
    "save_key_images",
    "series_events",
    "worklist_row",
]

_log = logging.getLogger(__name__)

#: The subtype labels a radiologist confirms or refutes (``LABELS`` without ``any``).
SUBTYPES: tuple[str, ...] = tuple(label for label in LABELS if label != "any")

#: How often a worker writes its heartbeat row (see :func:`run_heartbeat`), seconds.
HEARTBEAT_SECONDS = 10.0

#: Longest feedback comment and user name kept.
_MAX_COMMENT = 4000
_MAX_USER = 128

_PATIENT = cast(sa.Table, Patient.__table__)
_STUDY = cast(sa.Table, Study.__table__)
_SERIES = cast(sa.Table, Series.__table__)
_INSTANCE = cast(sa.Table, Instance.__table__)
_EVENT = cast(sa.Table, Event.__table__)
_RESULT = cast(sa.Table, SeriesResult_.__table__)
_DOCUMENT = cast(sa.Table, ResultDocument.__table__)
_OUTBOX = cast(sa.Table, OutboxItem.__table__)
_FEEDBACK = cast(sa.Table, Feedback.__table__)
_KEY_IMAGE = cast(sa.Table, KeyImage.__table__)
_HEARTBEAT = cast(sa.Table, WorkerHeartbeat.__table__)


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True, slots=True)
class DeliverySummary:
    """Delivery of the newest result document of a series, over all destinations.

    ``state`` is ``failed`` if any destination failed, else ``pending`` if any is still to
    be sent, else ``sent``; ``counts`` holds the number of destinations per state.
    """

    state: DeliveryState
    counts: dict[str, int]
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One radiologist verdict as stored."""

    series_instance_uid: str
    user: str
    ich: bool
    subtypes: dict[str, bool]
    comment: str
    result_stored_at: dt.datetime | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class WorklistRow:
    """One row of the worklist: a series, its study, its result and what became of it.

    Result fields are ``None`` while the series has no result. ``time_to_result_seconds``
    is from the last received slice to the stored result; ``inference_seconds`` from the
    start to the end of classification.
    """

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    accession_number: str
    study_description: str
    series_description: str
    modality: str
    instance_count: int
    state: SeriesState
    reason: str | None
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None
    probabilities: dict[str, float] | None
    flagged: bool | None
    threshold: float | None
    key_sop_instance_uid: str | None
    model_name: str | None
    model_version: str | None
    result_stored_at: dt.datetime | None
    inference_seconds: float | None
    time_to_result_seconds: float | None
    delivery: DeliverySummary | None
    feedback: FeedbackRecord | None
    has_key_images: bool


@dataclass(frozen=True, slots=True)
class KeyImages:
    """PNGs of a series' key slice: brain window, and with the model's heatmap on top."""

    series_instance_uid: str
    sop_instance_uid: str
    method: str
    model_sha256: str
    plain_png: bytes
    heatmap_png: bytes
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class FeedbackLabel:
    """A series-level training label from the latest radiologist verdict on a series.

    ``labels`` maps every name of :data:`~triage_node.domain.LABELS` to 0 or 1 (``any`` is
    the verdict on ICH, the subtypes are 0 when ICH was refuted). The labels hold for the
    series as a whole: a refuted series makes every slice a negative, a confirmed one says
    only that some slice shows the bleed (a weak, multiple-instance label).

    ``slices`` are ``(SOP Instance UID, file path relative to the spool root)`` of the
    series' stored instances, in anatomical order when the series has a result (else by
    Instance Number).
    """

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    labels: dict[str, int]
    user: str
    at: dt.datetime
    slices: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The last sign of life of one worker."""

    name: str
    hostname: str
    pid: int
    started_at: dt.datetime
    beat_at: dt.datetime


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """What ``/metrics`` reports, read in one transaction.

    ``inference_seconds`` and ``time_to_result_seconds`` hold one value per stored result.
    """

    instances: int
    series_by_state: dict[str, int]
    flagged: int
    inference_seconds: tuple[float, ...]
    time_to_result_seconds: tuple[float, ...]
    deliveries_by_state: dict[str, int]
    feedback: int


# --------------------------------------------------------------------------- helpers


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    """``end - start`` in seconds, or None when either is missing."""
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _feedback_of(uid: str, row: Any) -> FeedbackRecord:
    return FeedbackRecord(
        series_instance_uid=uid,
        user=row.user,
        ich=bool(row.ich),
        subtypes={k: bool(row.subtypes.get(k, False)) for k in SUBTYPES},
        comment=row.comment,
        result_stored_at=row.result_stored_at,
        created_at=row.created_at,
    )


def _deliveries(session: Session, series_ids: Collection[int]) -> dict[int, DeliverySummary]:
    """Delivery summary of the newest document of each series in ``series_ids``."""
    if not series_ids:
        return {}
    o, d = _OUTBOX.c, _DOCUMENT.c
    stmt = (
        sa.select(d.series_fk, d.instance_number, o.state, o.last_error)
        .select_from(_OUTBOX.join(_DOCUMENT, d.id == o.document_fk))
        .where(d.series_fk.in_(sorted(series_ids)))
        .order_by(d.series_fk, d.instance_number.desc(), o.id)
    )
    newest: dict[int, int] = {}
    counts: dict[int, dict[str, int]] = {}
    errors: dict[int, str | None] = {}
    for series_fk, number, state, error in session.execute(stmt):
        if newest.setdefault(series_fk, number) != number:
            continue  # an older document of the series
        per = counts.setdefault(series_fk, {})
        per[state] = per.get(state, 0) + 1
        if state == DeliveryState.FAILED.value and error:
            errors[series_fk] = error
    out = {}
    for series_fk, per in counts.items():
        if per.get(DeliveryState.FAILED.value):
            state = DeliveryState.FAILED
        elif per.get(DeliveryState.PENDING.value):
            state = DeliveryState.PENDING
        elif per.get(DeliveryState.SENT.value):
            state = DeliveryState.SENT
        else:
            state = DeliveryState.SUPERSEDED
        out[series_fk] = DeliverySummary(state, dict(per), errors.get(series_fk))
    return out


def _latest_feedback(session: Session, series_ids: Collection[int]) -> dict[int, Any]:
    """The newest feedback row of each series in ``series_ids``."""
    if not series_ids:
        return {}
    f = _FEEDBACK.c
    stmt = (
        sa.select(_FEEDBACK)
        .where(f.series_fk.in_(sorted(series_ids)))
        .order_by(f.series_fk, f.created_at, f.id)
    )
    return {row.series_fk: row for row in session.execute(stmt)}  # the last one wins


def _row_select() -> sa.Select[Any]:
    """Series joined with study, patient, result and key-image presence."""
    s, st, p, r, i, k = (_SERIES.c, _STUDY.c, _PATIENT.c, _RESULT.c, _INSTANCE.c,
                         _KEY_IMAGE.c)
    instance_count = (
        sa.select(sa.func.count()).where(i.series_fk == s.id).scalar_subquery()
        .label("instance_count")
    )
    has_key = sa.exists(sa.select(k.id).where(k.series_fk == s.id)).label("has_key")
    return sa.select(
        s.id.label("series_id"),
        s.series_instance_uid,
        st.study_instance_uid,
        p.patient_id,
        st.accession_number,
        st.study_description,
        s.series_description,
        s.modality,
        instance_count,
        s.state,
        s.reason,
        s.first_received_at,
        s.last_received_at,
        r.probabilities,
        r.flagged,
        r.threshold,
        r.key_sop_instance_uid,
        r.model_name,
        r.model_version,
        r.inference_started_at,
        r.inference_done_at,
        r.stored_at,
        has_key,
    ).select_from(
        _SERIES.join(_STUDY, st.id == s.study_fk)
        .join(_PATIENT, p.id == st.patient_fk)
        .outerjoin(_RESULT, r.series_fk == s.id)
    )


def _worklist_row(row: Any, delivery: DeliverySummary | None, feedback: Any) -> WorklistRow:
    has_result = row.stored_at is not None
    return WorklistRow(
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        patient_id=row.patient_id,
        accession_number=row.accession_number,
        study_description=row.study_description,
        series_description=row.series_description,
        modality=row.modality,
        instance_count=int(row.instance_count),
        state=SeriesState(row.state),
        reason=row.reason,
        first_received_at=row.first_received_at,
        last_received_at=row.last_received_at,
        probabilities={k: float(v) for k, v in row.probabilities.items()} if has_result else None,
        flagged=bool(row.flagged) if has_result else None,
        threshold=float(row.threshold) if has_result else None,
        key_sop_instance_uid=row.key_sop_instance_uid,
        model_name=row.model_name,
        model_version=row.model_version,
        result_stored_at=row.stored_at,
        inference_seconds=_seconds(row.inference_started_at, row.inference_done_at),
        time_to_result_seconds=_seconds(row.last_received_at, row.stored_at),
        delivery=delivery,
        feedback=None if feedback is None else _feedback_of(row.series_instance_uid, feedback),
        has_key_images=bool(row.has_key),
    )


def _any(row: WorklistRow) -> float:
    return (row.probabilities or {}).get("any", 0.0)


# --------------------------------------------------------------------------- reads


def list_worklist(
    session_factory: sessionmaker[Session],
    *,
    states: Collection[SeriesState] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = 500,
) -> list[WorklistRow]:
    """Series in priority order, as the radiologist should read them.

    Flagged series first, highest ``any`` probability first; then every other series in
    order of arrival (``first_received_at``, oldest first: first come, first read).

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    states : collection of SeriesState, optional
        Only series in these states; all when ``None``.
    since, until : datetime, optional
        Only series whose last slice arrived at or after ``since`` / before ``until``
        (timezone-aware).
    limit : int, optional
        At most this many rows (flagged ones are never cut in favour of others); all when
        ``None``.

    Returns
    -------
    list of WorklistRow

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_limit(limit)
    s, r = _SERIES.c, _RESULT.c
    stmt = _row_select()
    if states is not None:
        if isinstance(states, str):
            raise TypeError("states must be a collection of SeriesState, not a single str")
        stmt = stmt.where(s.state.in_(sorted({SeriesState(x).value for x in states})))
    if since is not None:
        stmt = stmt.where(s.last_received_at >= _check_aware(since, "since"))
    if until is not None:
        stmt = stmt.where(s.last_received_at < _check_aware(until, "until"))
    is_flagged = sa.and_(r.flagged.is_not(None), r.flagged.is_(True))
    flagged_stmt = stmt.where(is_flagged)
    others_stmt = (
        stmt.where(sa.not_(is_flagged))
        .order_by(s.first_received_at.asc().nulls_last(), s.id)
        .limit(limit)
    )
    with _transaction(session_factory, "read the worklist", read_only=True) as session:
        rows = list(session.execute(flagged_stmt)) + list(session.execute(others_stmt))
        ids = [row.series_id for row in rows]
        deliveries = _deliveries(session, ids)
        feedback = _latest_feedback(session, ids)
    items = [_worklist_row(row, deliveries.get(row.series_id), feedback.get(row.series_id))
             for row in rows]
    flagged = sorted((x for x in items if x.flagged), key=lambda x: -_any(x))
    out = flagged + [x for x in items if not x.flagged]
    return out if limit is None else out[:limit]


def worklist_row(
    session_factory: sessionmaker[Session], series_instance_uid: str
) -> WorklistRow | None:
    """The worklist row of one series, or None for an unknown series.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    stmt = _row_select().where(_SERIES.c.series_instance_uid == series_instance_uid)
    with _transaction(session_factory, "read a worklist row", read_only=True) as session:
        row = session.execute(stmt).one_or_none()
        if row is None:
            return None
        delivery = _deliveries(session, [row.series_id]).get(row.series_id)
        feedback = _latest_feedback(session, [row.series_id]).get(row.series_id)
    return _worklist_row(row, delivery, feedback)


def series_events(
    session_factory: sessionmaker[Session], series_instance_uid: str, *, limit: int = 1000
) -> list[EventRecord]:
    """Audit events of one series (instances stored or refused, feedback...), oldest first.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    return list_events(session_factory, series_instance_uid=series_instance_uid, limit=limit)


def list_feedback(
    session_factory: sessionmaker[Session], series_instance_uid: str
) -> list[FeedbackRecord]:
    """Every verdict on one series, oldest first (the last one is the label).

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    f, s = _FEEDBACK.c, _SERIES.c
    stmt = (
        sa.select(_FEEDBACK)
        .select_from(_FEEDBACK.join(_SERIES, s.id == f.series_fk))
        .where(s.series_instance_uid == series_instance_uid)
        .order_by(f.created_at, f.id)
    )
    with _transaction(session_factory, "list feedback", read_only=True) as session:
        return [_feedback_of(series_instance_uid, row) for row in session.execute(stmt)]


def get_key_images(
    session_factory: sessionmaker[Session], series_instance_uid: str
) -> KeyImages | None:
    """The key-slice PNGs of a series, or None when the worker stored none.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    k, s = _KEY_IMAGE.c, _SERIES.c
    stmt = (
        sa.select(_KEY_IMAGE)
        .select_from(_KEY_IMAGE.join(_SERIES, s.id == k.series_fk))
        .where(s.series_instance_uid == series_instance_uid)
    )
    with _transaction(session_factory, "read key images", read_only=True) as session:
        row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    return KeyImages(
        series_instance_uid=series_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        method=row.method,
        model_sha256=row.model_sha256,
        plain_png=bytes(row.plain_png),
        heatmap_png=bytes(row.heatmap_png),
        created_at=row.created_at,
    )


def feedback_labels(
    session_factory: sessionmaker[Session], *, since: dt.datetime | None = None
) -> list[FeedbackLabel]:
    """Series-level training labels from the radiologists' latest verdicts.

    What ``triage-node train --from-store`` consumes: one :class:`FeedbackLabel` per series
    with at least one verdict (the newest verdict wins), oldest verdict first.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    since : datetime, optional
        Only series whose newest verdict was given at or after this time.

    Returns
    -------
    list of FeedbackLabel

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    f, s, st, p, i, r = (_FEEDBACK.c, _SERIES.c, _STUDY.c, _PATIENT.c, _INSTANCE.c,
                         _RESULT.c)
    stmt = (
        sa.select(_FEEDBACK, s.series_instance_uid, st.study_instance_uid, p.patient_id,
                  r.slices)
        .select_from(
            _FEEDBACK.join(_SERIES, s.id == f.series_fk)
            .join(_STUDY, st.id == s.study_fk)
            .join(_PATIENT, p.id == st.patient_fk)
            .outerjoin(_RESULT, r.series_fk == s.id)
        )
        .order_by(f.series_fk, f.created_at, f.id)
    )
    with _transaction(session_factory, "export feedback labels", read_only=True) as session:
        latest = {row.series_fk: row for row in session.execute(stmt)}
        if since is not None:
            since = _check_aware(since, "since")
            latest = {k: v for k, v in latest.items() if v.created_at >= since}
        files: dict[int, list[tuple[str, str, int | None]]] = {}
        if latest:
            inst = sa.select(i.series_fk, i.sop_instance_uid, i.file_path, i.instance_number
                             ).where(i.series_fk.in_(sorted(latest)), i.state == "stored")
            for series_fk, uid, path, number in session.execute(inst):
                files.setdefault(series_fk, []).append((uid, path, number))
    out = []
    for series_fk, row in latest.items():
        stored = files.get(series_fk, [])
        order = {str(sl[0]): n for n, sl in enumerate(row.slices or [])}
        stored.sort(key=lambda x: (order.get(x[0], len(order)),
                                   x[2] if x[2] is not None else 0, x[0]))
        labels = {"any": int(bool(row.ich))}
        labels.update({k: int(bool(row.ich) and bool(row.subtypes.get(k, False)))
                       for k in SUBTYPES})
        out.append(FeedbackLabel(
            series_instance_uid=row.series_instance_uid,
            study_instance_uid=row.study_instance_uid,
            patient_id=row.patient_id,
            labels={k: labels[k] for k in LABELS},
            user=row.user,
            at=row.created_at,
            slices=tuple((uid, path) for uid, path, _ in stored),
        ))
    out.sort(key=lambda x: x.at)
    return out


def heartbeats(session_factory: sessionmaker[Session]) -> list[Heartbeat]:
    """Every worker's last heartbeat, newest first.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    h = _HEARTBEAT.c
    stmt = sa.select(_HEARTBEAT).order_by(h.beat_at.desc(), h.id)
    with _transaction(session_factory, "read worker heartbeats", read_only=True) as session:
        return [Heartbeat(row.name, row.hostname, row.pid, row.started_at, row.beat_at)
                for row in session.execute(stmt)]


def ping(session_factory: sessionmaker[Session]) -> None:
    """Run ``SELECT 1``.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    with _transaction(session_factory, "ping the database", read_only=True) as session:
        session.execute(sa.text("SELECT 1"))


def node_metrics(session_factory: sessionmaker[Session]) -> NodeMetrics:
    """Counts and timings for ``/metrics``, in one read-only transaction.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    s, r, o = _SERIES.c, _RESULT.c, _OUTBOX.c
    with _transaction(session_factory, "read metrics", read_only=True) as session:
        instances = int(session.execute(
            sa.select(sa.func.count()).select_from(_INSTANCE)).scalar_one())
        by_state: dict[str, int] = {
            state: int(n) for state, n in session.execute(
                sa.select(s.state, sa.func.count()).group_by(s.state))}
        timings = session.execute(
            sa.select(r.flagged, r.inference_started_at, r.inference_done_at, r.stored_at,
                      s.last_received_at)
            .select_from(_RESULT.join(_SERIES, s.id == r.series_fk))).all()
        deliveries: dict[str, int] = {
            state: int(n) for state, n in session.execute(
                sa.select(o.state, sa.func.count()).group_by(o.state))}
        feedback = int(session.execute(
            sa.select(sa.func.count()).select_from(_FEEDBACK)).scalar_one())
    inference = tuple(x for t in timings
                      if (x := _seconds(t.inference_started_at, t.inference_done_at)) is not None)
    ttr = tuple(x for t in timings
                if (x := _seconds(t.last_received_at, t.stored_at)) is not None)
    return NodeMetrics(
        instances=instances,
        series_by_state={state.value: by_state.get(state.value, 0) for state in SeriesState},
        flagged=sum(1 for t in timings if t.flagged),
        inference_seconds=inference,
        time_to_result_seconds=ttr,
        deliveries_by_state={state.value: deliveries.get(state.value, 0)
                             for state in DeliveryState},
        feedback=feedback,
    )


# --------------------------------------------------------------------------- writes


def _check_text(value: object, name: str, limit: int, *, empty: bool) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long (at most {limit})")
    return value.strip() if not empty else value


def record_feedback(
    session_factory: sessionmaker[Session],
    series_instance_uid: str,
    *,
    user: str,
    ich: bool,
    subtypes: Mapping[str, bool],
    comment: str = "",
    peer: str = "",
    at: dt.datetime | None = None,
) -> FeedbackRecord:
    """Store a radiologist's verdict on a series, and audit it, in one transaction.

    Verdicts are never overwritten: each one is a new row, the newest one is the label.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    series_instance_uid : str
        The series judged.
    user : str
        Who judged (the authenticated user, or the name given with a shared token).
    ich : bool
        Intracranial hemorrhage present.
    subtypes : mapping of str to bool
        Verdict per subtype (:data:`SUBTYPES`); missing ones are False. Must all be False
        when ``ich`` is False.
    comment : str, optional
        Free text.
    peer : str, optional
        Client address, for the audit event.
    at : datetime, optional
        When; now by default.

    Returns
    -------
    FeedbackRecord

    Raises
    ------
    TypeError, ValueError
        For a bad argument (unknown subtype, subtype without ICH, empty user), before
        anything is written.
    LookupError
        If the series is unknown.
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    user = _check_text(user, "user", _MAX_USER, empty=False)
    comment = _check_text(comment, "comment", _MAX_COMMENT, empty=True)
    if not isinstance(ich, bool):
        raise TypeError(f"ich must be a bool, not {type(ich).__name__}")
    if not isinstance(subtypes, Mapping):
        raise TypeError(f"subtypes must be a mapping, not {type(subtypes).__name__}")
    unknown = sorted(set(subtypes) - set(SUBTYPES))
    if unknown:
        raise ValueError(f"subtypes: unknown label {unknown[0]!r} (known: {', '.join(SUBTYPES)})")
    for key, value in subtypes.items():
        if not isinstance(value, bool):
            raise TypeError(f"subtypes[{key!r}] must be a bool, not {type(value).__name__}")
    flags = {k: bool(subtypes.get(k, False)) for k in SUBTYPES}
    if not ich and any(flags.values()):
        raise ValueError("subtypes cannot be confirmed when ICH is refuted (ich = false)")
    now = _check_aware(at, "at") if at is not None else utcnow()
    s, r = _SERIES.c, _RESULT.c
    with _transaction(session_factory, "record feedback") as session:
        row = session.execute(
            sa.select(s.id, _STUDY.c.study_instance_uid, r.stored_at)
            .select_from(_SERIES.join(_STUDY, _STUDY.c.id == s.study_fk)
                         .outerjoin(_RESULT, r.series_fk == s.id))
            .where(s.series_instance_uid == series_instance_uid)
        ).one_or_none()
        if row is None:
            raise LookupError(f"unknown series {series_instance_uid!r}")
        series_id, study_uid, result_stored_at = row
        session.execute(sa.insert(_FEEDBACK).values(
            series_fk=series_id, user=user, ich=ich, subtypes=flags, comment=comment,
            result_stored_at=result_stored_at, created_at=now))
        confirmed = [k for k, v in flags.items() if v]
        session.execute(sa.insert(_EVENT).values(
            at=now, kind=EventKind.FEEDBACK_RECORDED.value, actor=user, peer=peer,
            outcome="ich" if ich else "no ich",
            detail=("subtypes: " + ", ".join(confirmed)) if confirmed else "",
            study_instance_uid=study_uid, series_instance_uid=series_instance_uid,
            sop_instance_uid=None))
    return FeedbackRecord(series_instance_uid, user, ich, flags, comment, result_stored_at,
                          now.astimezone(dt.UTC))


def save_key_images(
    session_factory: sessionmaker[Session],
    series_instance_uid: str,
    *,
    sop_instance_uid: str,
    plain_png: bytes,
    heatmap_png: bytes,
    method: str,
    model_sha256: str,
) -> None:
    """Store (or replace) the key-slice PNGs of a series; idempotent.

    Raises
    ------
    TypeError, ValueError
        If an image is not PNG bytes or a UID is malformed.
    LookupError
        If the series is unknown.
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    _check_uid(sop_instance_uid, "sop_instance_uid")
    for name, data in (("plain_png", plain_png), ("heatmap_png", heatmap_png)):
        if not isinstance(data, bytes):
            raise TypeError(f"{name} must be bytes, not {type(data).__name__}")
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{name} is not a PNG image")
    method = _check_text(method, "method", 32, empty=False)
    s = _SERIES.c
    with _transaction(session_factory, "store key images") as session:
        series_id = session.execute(
            sa.select(s.id).where(s.series_instance_uid == series_instance_uid)
        ).scalar_one_or_none()
        if series_id is None:
            raise LookupError(f"unknown series {series_instance_uid!r}")
        session.execute(sa.delete(_KEY_IMAGE).where(_KEY_IMAGE.c.series_fk == series_id))
        session.execute(sa.insert(_KEY_IMAGE).values(
            series_fk=series_id, sop_instance_uid=sop_instance_uid, method=method,
            model_sha256=model_sha256, plain_png=plain_png, heatmap_png=heatmap_png,
            created_at=utcnow()))


def beat(
    session_factory: sessionmaker[Session],
    name: str,
    *,
    hostname: str,
    pid: int,
    started_at: dt.datetime,
    at: dt.datetime | None = None,
) -> None:
    """Record that worker ``name`` is alive at ``at`` (now by default); an upsert.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    name = _check_text(name, "name", 256, empty=False)
    started_at = _check_aware(started_at, "started_at")
    now = _check_aware(at, "at") if at is not None else utcnow()
    values = {"name": name, "hostname": hostname, "pid": pid, "started_at": started_at,
              "beat_at": now}
    with _transaction(session_factory, "record a worker heartbeat") as session:
        stmt = _insert_factory(session)(_HEARTBEAT).values(**values)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"hostname": hostname, "pid": pid, "started_at": started_at,
                  "beat_at": now}))


def forget_workers(session_factory: sessionmaker[Session], names: Sequence[str]) -> None:
    """Remove the heartbeat rows of workers that stopped cleanly."""
    if not names:
        return
    with _transaction(session_factory, "remove worker heartbeats") as session:
        session.execute(sa.delete(_HEARTBEAT).where(_HEARTBEAT.c.name.in_(sorted(names))))


def run_heartbeat(
    session_factory: sessionmaker[Session],
    stop: threading.Event,
    *,
    name: str | None = None,
    interval: float = HEARTBEAT_SECONDS,
) -> None:
    """Write this process's heartbeat every ``interval`` s until ``stop``; then remove it.

    Run it in a daemon thread of each classification worker process::

        threading.Thread(target=store.worklist.run_heartbeat, args=(factory, stop),
                         name="heartbeat", daemon=True).start()

    A database error is logged and retried at the next beat. The name defaults to
    ``triage@<hostname>:<pid>``.
    """
    hostname = socket.gethostname()
    pid = os.getpid()
    name = name or f"triage@{hostname}:{pid}"
    started = utcnow()
    while True:
        try:
            beat(session_factory, name, hostname=hostname, pid=pid, started_at=started)
        except Exception as exc:  # the next beat may succeed: never end the thread
            _log.warning("worker heartbeat not recorded: %s", exc)
        if stop.wait(interval):
            break
    try:
        forget_workers(session_factory, [name])
    except Exception as exc:  # a clean stop that cannot be recorded just looks stale later
        _log.warning("worker heartbeat not removed: %s", exc)
