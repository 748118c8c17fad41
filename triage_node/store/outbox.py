"""The outbox: result documents (the SR) and their delivery to each destination.

State lives only here, in the database, so delivery survives a restart of any process::

    add_document        one document per stored result, one PENDING row per destination;
                        PENDING rows of the series' earlier documents become SUPERSEDED
    claim_due           PENDING rows due by now: attempts + 1, next_attempt_at pushed out by
                        a lease, so a second sender skips them (and picks them up again if
                        the claiming process dies)
    mark_sent           -> SENT
    mark_retry          -> PENDING again at a later time, with the error
    mark_failed         -> FAILED, with the reason

A claim is an ``UPDATE ... WHERE state = 'pending' AND attempts = <as read>``: of two
senders racing for a row exactly one wins, on SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from triage_node.domain import Delivery, DeliveryState, ResultDocument, utcnow
from triage_node.store.models import OutboxItem, Series
from triage_node.store.models import ResultDocument as ResultDocument_
from triage_node.store.models import SeriesResult as SeriesResult_
from triage_node.store.repository import (
    _check_aware,
    _check_uid,
    _insert_factory,
    _transaction,
)

__all__ = [
    "add_document",
    "claim_due",
    "delivery_counts",
    "latest_document",
    "list_deliveries",
    "mark_failed",
    "mark_retry",
    "mark_sent",
    "results_without_document",
]

_SERIES = cast(sa.Table, Series.__table__)
_DOCUMENT = cast(sa.Table, ResultDocument_.__table__)
_OUTBOX = cast(sa.Table, OutboxItem.__table__)
_RESULT = cast(sa.Table, SeriesResult_.__table__)

#: Longest error text kept in ``last_error``.
_MAX_ERROR = 2000


def _check_id(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_error(value: object, name: str = "error") -> str:
    """A non-empty error text, cut to the column's useful length."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value[:_MAX_ERROR]


def _delivery_select() -> sa.Select[Any]:
    """Outbox rows with their document's and series' UIDs (the Delivery fields)."""
    o, d, s = _OUTBOX.c, _DOCUMENT.c, _SERIES.c
    return sa.select(
        o.id,
        s.series_instance_uid,
        d.sop_instance_uid,
        o.destination,
        o.state,
        o.attempts,
        o.next_attempt_at,
        o.last_error,
        o.created_at,
        o.updated_at,
        o.sent_at,
    ).select_from(
        _OUTBOX.join(_DOCUMENT, d.id == o.document_fk).join(_SERIES, s.id == d.series_fk)
    )


def _delivery_of(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        series_instance_uid=row.series_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        destination=row.destination,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        sent_at=row.sent_at,
    )


def latest_document(
    session_factory: sessionmaker[Session], series_instance_uid: str,
    sop_class_uid: str | None = None,
) -> ResultDocument | None:
    """The newest result document of a series (highest instance number), or None.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    series_instance_uid : str
        The source series.
    sop_class_uid : str, optional
        Only documents of this SOP class (the SR, or the key-image SC).

    Returns
    -------
    ResultDocument or None

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    d, s = _DOCUMENT.c, _SERIES.c
    stmt = (
        sa.select(_DOCUMENT)
        .select_from(_DOCUMENT.join(_SERIES, s.id == d.series_fk))
        .where(s.series_instance_uid == series_instance_uid)
        .order_by(d.instance_number.desc(), d.id.desc())
        .limit(1)
    )
    if sop_class_uid is not None:
        stmt = stmt.where(d.sop_class_uid == sop_class_uid)
    with _transaction(session_factory, "read a result document", read_only=True) as session:
        row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    return ResultDocument(
        series_instance_uid=series_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        instance_number=row.instance_number,
        result_stored_at=row.result_stored_at,
        supersedes_sop_instance_uid=row.supersedes_sop_instance_uid,
        created_at=row.created_at,
        dataset=bytes(row.dataset),
    )


def add_document(
    session_factory: sessionmaker[Session],
    document: ResultDocument,
    destinations: Sequence[str],
) -> bool:
    """Store a result document and queue it for every destination, in one transaction.

    The series' earlier documents of the same SOP class still ``PENDING`` somewhere are not
    sent any more: those rows become ``SUPERSEDED`` (the new document names its predecessor
    itself).

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    document : ResultDocument
        The document; its ``series_instance_uid`` must be a recorded series.
    destinations : sequence of str
        Destination keys (``AE@host:port``); each gets a ``PENDING`` row due at once.

    Returns
    -------
    bool
        ``True`` if stored now; ``False`` if a document of the same result
        (``result_stored_at``) and SOP class was already stored, or one with the same SOP
        Instance UID: nothing is changed then.

    Raises
    ------
    TypeError, ValueError
        For a malformed document or destination list (before anything is written), or an
        unknown series.
    DatabaseError
        If the database is unreachable or refuses the write.
    """
    if not isinstance(document, ResultDocument):
        raise TypeError(f"document must be a ResultDocument, not {type(document).__name__}")
    _check_uid(document.series_instance_uid, "document.series_instance_uid")
    _check_uid(document.sop_instance_uid, "document.sop_instance_uid")
    _check_uid(document.sop_class_uid, "document.sop_class_uid")
    _check_uid(document.supersedes_sop_instance_uid, "document.supersedes_sop_instance_uid",
               optional=True)
    _check_id(document.instance_number, "document.instance_number")
    stored_at = _check_aware(document.result_stored_at, "document.result_stored_at")
    created_at = _check_aware(document.created_at, "document.created_at")
    if not isinstance(document.dataset, bytes) or not document.dataset:
        raise ValueError("document.dataset must be the non-empty bytes of a DICOM file")
    if isinstance(destinations, str):
        raise TypeError("destinations must be a sequence of str, not a single str")
    keys = list(dict.fromkeys(destinations))
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise ValueError(f"destinations[{i}] must be a non-empty str, got {key!r}")

    s, d, o = _SERIES.c, _DOCUMENT.c, _OUTBOX.c
    with _transaction(session_factory, "queue a result document") as session:
        series_id = session.execute(
            sa.select(s.id).where(s.series_instance_uid == document.series_instance_uid)
        ).scalar_one_or_none()
        if series_id is None:
            raise ValueError(f"document.series_instance_uid: unknown series "
                             f"{document.series_instance_uid!r}")
        insert = _insert_factory(session)
        stmt = (
            insert(_DOCUMENT)
            .on_conflict_do_nothing()
            .values(
                series_fk=series_id,
                sop_instance_uid=document.sop_instance_uid,
                sop_class_uid=document.sop_class_uid,
                instance_number=document.instance_number,
                result_stored_at=stored_at,
                supersedes_sop_instance_uid=document.supersedes_sop_instance_uid,
                dataset=document.dataset,
                created_at=created_at,
            )
            .returning(d.id)
        )
        document_id = session.execute(stmt).scalar_one_or_none()
        if document_id is None:
            return False
        now = utcnow()
        earlier = sa.select(d.id).where(d.series_fk == series_id, d.id != document_id,
                                        d.sop_class_uid == document.sop_class_uid)
        session.execute(
            sa.update(_OUTBOX)
            .where(o.document_fk.in_(earlier), o.state == DeliveryState.PENDING.value)
            .values(
                state=DeliveryState.SUPERSEDED.value,
                last_error=f"superseded by {document.sop_instance_uid}",
                updated_at=now,
            )
        )
        if keys:
            session.execute(
                sa.insert(_OUTBOX),
                [
                    {
                        "document_fk": document_id,
                        "destination": key,
                        "state": DeliveryState.PENDING.value,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "last_error": None,
                        "created_at": now,
                        "updated_at": now,
                        "sent_at": None,
                    }
                    for key in keys
                ],
            )
    return True


def claim_due(
    session_factory: sessionmaker[Session],
    *,
    now: dt.datetime,
    lease_seconds: float,
    limit: int = 16,
) -> list[tuple[Delivery, bytes]]:
    """Claim pending deliveries due by ``now``, oldest due first.

    Each claimed row gets ``attempts + 1`` and ``next_attempt_at = now + lease_seconds``:
    no other sender takes it meanwhile, and if this process dies before recording the
    outcome, the row is due again once the lease has run out.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    now : datetime
        Timezone-aware current time.
    lease_seconds : float
        How long the claim holds (> 0): longer than one send can take.
    limit : int, optional
        At most this many rows (>= 1).

    Returns
    -------
    list of (Delivery, bytes)
        The claimed rows as they are after the claim (``attempts`` counts this one) and
        their document's DICOM file.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    now = _check_aware(now, "now")
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int | float):
        raise TypeError(f"lease_seconds must be a number, not {type(lease_seconds).__name__}")
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
    _check_id(limit, "limit")
    o, d = _OUTBOX.c, _DOCUMENT.c
    lease_end = now + dt.timedelta(seconds=lease_seconds)
    due = (
        sa.select(o.id, o.attempts)
        .where(o.state == DeliveryState.PENDING.value, o.next_attempt_at <= now)
        .order_by(o.next_attempt_at, o.id)
        .limit(limit)
    )
    claimed: list[int] = []
    with _transaction(session_factory, "claim due deliveries") as session:
        for row_id, attempts in session.execute(due).all():
            result = cast(
                sa.CursorResult[Any],
                session.execute(
                    sa.update(_OUTBOX)
                    .where(
                        o.id == row_id,
                        o.state == DeliveryState.PENDING.value,
                        o.attempts == attempts,
                    )
                    .values(attempts=attempts + 1, next_attempt_at=lease_end, updated_at=now)
                ),
            )
            if result.rowcount:
                claimed.append(row_id)
        if not claimed:
            return []
        stmt = (
            _delivery_select()
            .add_columns(d.dataset)
            .where(o.id.in_(claimed))
            .order_by(o.id)
        )
        rows = session.execute(stmt).all()
    order = {row_id: i for i, row_id in enumerate(claimed)}
    out = [(_delivery_of(row), bytes(row.dataset)) for row in rows]
    out.sort(key=lambda pair: order[pair[0].id])
    return out


def _finish(
    session_factory: sessionmaker[Session],
    delivery: Delivery,
    values: dict[str, Any],
    action: str,
    *,
    only_if_claimed: bool,
) -> bool:
    """Update one claimed row; with ``only_if_claimed``, only while the claim holds."""
    if not isinstance(delivery, Delivery):
        raise TypeError(f"delivery must be a Delivery, not {type(delivery).__name__}")
    o = _OUTBOX.c
    stmt = sa.update(_OUTBOX).where(o.id == delivery.id).values(**values)
    if only_if_claimed:
        stmt = stmt.where(
            o.state == DeliveryState.PENDING.value, o.attempts == delivery.attempts
        )
    with _transaction(session_factory, action) as session:
        result = cast(sa.CursorResult[Any], session.execute(stmt))
        return bool(result.rowcount)


def mark_sent(
    session_factory: sessionmaker[Session], delivery: Delivery, *, at: dt.datetime
) -> bool:
    """Record that ``delivery`` (as claimed) reached its destination.

    Recorded whatever happened to the row meanwhile (superseded, claimed again after its
    lease ran out): the destination has the document.

    Returns
    -------
    bool
        Whether the row exists.
    """
    at = _check_aware(at, "at")
    values = {"state": DeliveryState.SENT.value, "sent_at": at, "updated_at": at,
              "last_error": None}
    return _finish(session_factory, delivery, values, "record a delivery", only_if_claimed=False)


def mark_retry(
    session_factory: sessionmaker[Session],
    delivery: Delivery,
    *,
    error: str,
    next_attempt_at: dt.datetime,
    at: dt.datetime,
) -> bool:
    """Put ``delivery`` (as claimed) back to pending, due at ``next_attempt_at``.

    Returns
    -------
    bool
        ``False`` if the claim no longer holds (another sender took the row after the lease
        ran out, or it was superseded): nothing is changed then.
    """
    next_attempt_at = _check_aware(next_attempt_at, "next_attempt_at")
    at = _check_aware(at, "at")
    values = {"next_attempt_at": next_attempt_at, "last_error": _check_error(error),
              "updated_at": at}
    return _finish(session_factory, delivery, values, "reschedule a delivery",
                   only_if_claimed=True)


def mark_failed(
    session_factory: sessionmaker[Session], delivery: Delivery, *, error: str, at: dt.datetime
) -> bool:
    """Give up on ``delivery`` (as claimed): ``FAILED`` with the reason.

    Returns
    -------
    bool
        ``False`` if the claim no longer holds: nothing is changed then.
    """
    at = _check_aware(at, "at")
    values = {"state": DeliveryState.FAILED.value, "last_error": _check_error(error),
              "updated_at": at}
    return _finish(session_factory, delivery, values, "record a failed delivery",
                   only_if_claimed=True)


def list_deliveries(
    session_factory: sessionmaker[Session],
    *,
    series_instance_uid: str | None = None,
    states: Sequence[DeliveryState] | None = None,
) -> list[Delivery]:
    """Outbox rows, oldest first; of one series and/or in some states when given.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid", optional=True)
    o, s = _OUTBOX.c, _SERIES.c
    stmt = _delivery_select().order_by(o.id)
    if series_instance_uid is not None:
        stmt = stmt.where(s.series_instance_uid == series_instance_uid)
    if states is not None:
        if isinstance(states, str):
            raise TypeError("states must be a sequence of DeliveryState, not a single str")
        stmt = stmt.where(o.state.in_(sorted({DeliveryState(x).value for x in states})))
    with _transaction(session_factory, "list deliveries", read_only=True) as session:
        return [_delivery_of(row) for row in session.execute(stmt)]


def delivery_counts(session_factory: sessionmaker[Session]) -> dict[DeliveryState, int]:
    """Number of outbox rows in each state (every state present, zero included).

    The delivery metric: ``FAILED`` counts the results no PACS received.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    o = _OUTBOX.c
    stmt = sa.select(o.state, sa.func.count()).group_by(o.state)
    with _transaction(session_factory, "count deliveries", read_only=True) as session:
        found = {str(state): int(n) for state, n in session.execute(stmt).all()}
    return {state: found.get(state.value, 0) for state in DeliveryState}


def results_without_document(session_factory: sessionmaker[Session], sop_class_uid: str, *,
                             since: dt.datetime) -> list[str]:
    """Done series whose result, stored since ``since``, has no document of this SOP class.

    Negative results that are not sent show up here too: the caller's queueing decides.
    """
    _check_uid(sop_class_uid, "sop_class_uid")
    since = _check_aware(since, "since")
    s, r, d = _SERIES.c, _RESULT.c, _DOCUMENT.c
    has_document = (
        sa.select(sa.literal(1))
        .where(d.series_fk == r.series_fk, d.result_stored_at == r.stored_at,
               d.sop_class_uid == sop_class_uid)
        .exists()
    )
    stmt = (
        sa.select(s.series_instance_uid)
        .select_from(_RESULT.join(_SERIES, s.id == r.series_fk))
        .where(r.stored_at >= since, s.state == "done", ~has_document)
        .order_by(r.stored_at)
    )
    with _transaction(session_factory, "find results without documents",
                      read_only=True) as session:
        return list(session.execute(stmt).scalars())
