"""ORM tables of the node's database: patient, study, series, instance and event.

The schema is created by the Alembic migrations in ``migrations/versions``, never by
``metadata.create_all``; a test checks both describe the same tables.

Only :mod:`triage_node.store` touches these classes: everything leaving the package is a
value object from :mod:`triage_node.domain`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "NAMING_CONVENTION",
    "UID_LENGTH",
    "Base",
    "Event",
    "Instance",
    "Patient",
    "Series",
    "Study",
    "UTCDateTime",
]

#: Longest UID stored. DICOM allows 64 characters; files breaking that rule exist.
UID_LENGTH = 128

#: Length of columns holding our own vocabularies (domain enum values).
_STATE_LENGTH = 32

#: Deterministic constraint names, so later migrations can refer to them (also on SQLite).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that only accepts aware values and returns aware UTC.

    SQLite has no time zone type: values are stored there as naive UTC text, which keeps
    comparisons correct, and read back as UTC-aware. PostgreSQL stores ``timestamptz``.
    """

    impl = sa.DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: Any | None, dialect: Dialect) -> dt.datetime | None:
        """Convert an aware datetime to UTC (naive UTC on SQLite); refuse naive ones."""
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} (use an aware UTC time)")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> dt.datetime | None:
        """Return the stored time as an aware UTC datetime."""
        if value is None:
            return None
        if not isinstance(value, dt.datetime):  # pragma: no cover - driver contract
            raise TypeError(f"database returned {type(value).__name__} for a datetime")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base holding the node's metadata."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class Patient(Base):
    """A patient, by Patient ID (which may be empty: all such studies share one row)."""

    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(sa.String, unique=True)
    patient_name: Mapped[str] = mapped_column(sa.String, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Study(Base):
    """A study, by Study Instance UID."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    patient_fk: Mapped[int] = mapped_column(sa.ForeignKey("patient.id"), index=True)
    accession_number: Mapped[str] = mapped_column(sa.String, default="")
    study_date: Mapped[str] = mapped_column(sa.String, default="")
    study_description: Mapped[str] = mapped_column(sa.String, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Series(Base):
    """A series, by Series Instance UID, with its triage life cycle state."""

    __tablename__ = "series"
    __table_args__ = (
        # "receiving series quiet since X": equality on state, range on last_received_at.
        sa.Index("ix_series_state_last_received_at", "state", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    study_fk: Mapped[int] = mapped_column(sa.ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(sa.String, default="")
    body_part_examined: Mapped[str] = mapped_column(sa.String, default="")
    series_description: Mapped[str] = mapped_column(sa.String, default="")
    series_number: Mapped[int | None] = mapped_column(sa.Integer)
    state: Mapped[str] = mapped_column(sa.String(_STATE_LENGTH))  # domain.SeriesState
    reason: Mapped[str | None] = mapped_column(sa.Text)
    first_received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    #: an association that delivered instances of this series was released at this time
    release_hint_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    #: when series assembly last declared it complete (selected or not)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Instance(Base):
    """A received SOP instance, by SOP Instance UID, and where its file lies in the spool."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    series_fk: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    instance_number: Mapped[int | None] = mapped_column(sa.Integer)
    image_type: Mapped[str] = mapped_column(sa.String, default="")
    image_position: Mapped[str | None] = mapped_column(sa.String)  # "x\y\z"
    image_orientation: Mapped[str | None] = mapped_column(sa.String)  # 6 values, "\"-joined
    rows: Mapped[int | None] = mapped_column(sa.Integer)
    columns: Mapped[int | None] = mapped_column(sa.Integer)
    file_path: Mapped[str] = mapped_column(sa.String)  # relative to the spool root
    file_size: Mapped[int] = mapped_column(sa.BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    calling_ae: Mapped[str] = mapped_column(sa.String, default="")
    state: Mapped[str] = mapped_column(sa.String(_STATE_LENGTH))  # domain.InstanceState
    reason: Mapped[str | None] = mapped_column(sa.Text)


class Event(Base):
    """One audit event (association opened, instance stored, ...)."""

    __tablename__ = "event"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    kind: Mapped[str] = mapped_column(sa.String(_STATE_LENGTH))  # domain.EventKind
    actor: Mapped[str] = mapped_column(sa.String, default="")
    peer: Mapped[str] = mapped_column(sa.String, default="")
    outcome: Mapped[str] = mapped_column(sa.String, default="")
    detail: Mapped[str] = mapped_column(sa.Text, default="")
    study_instance_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))
    series_instance_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))
    sop_instance_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))


class SeriesResult(Base):
    """The classifier's latest result for a series (replaced when it is recomputed)."""

    __tablename__ = "series_result"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), unique=True)
    probabilities: Mapped[dict[str, Any]] = mapped_column(sa.JSON)  # label -> p
    slices: Mapped[list[Any]] = mapped_column(sa.JSON)  # [[sop uid, position, [p x 6]], ...]
    key_sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    flagged: Mapped[bool] = mapped_column(sa.Boolean)
    threshold: Mapped[float] = mapped_column(sa.Float)
    model_name: Mapped[str] = mapped_column(sa.String)
    model_version: Mapped[str] = mapped_column(sa.String)
    model_sha256: Mapped[str] = mapped_column(sa.String(64))
    inference_started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    inference_done_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    stored_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SlicePrediction(Base):
    """One slice's probabilities under one model and one 2.5D neighbourhood.

    Computed in batches while the series arrives, so that little is left to do when it
    completes. ``neighbours`` is a digest of the SOP Instance UIDs whose pixels went into the
    input (the slice and its 2.5D context, in order): when a late slice changes a slice's
    neighbours, its cached prediction no longer matches and is recomputed.
    """

    __tablename__ = "slice_prediction"
    __table_args__ = (sa.UniqueConstraint("instance_fk", "model_sha256", "neighbours"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    instance_fk: Mapped[int] = mapped_column(sa.ForeignKey("instance.id"))
    model_sha256: Mapped[str] = mapped_column(sa.String(64))
    neighbours: Mapped[str] = mapped_column(sa.String(64))
    probabilities: Mapped[list[float]] = mapped_column(sa.JSON)  # in domain.LABELS order
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ResultDocument(Base):
    """A DICOM object made from a series result (the SR), kept to be sent byte for byte."""

    __tablename__ = "result_document"
    __table_args__ = (
        # One document per stored result and SOP class (the SR, the key-image SC):
        # queueing the same result twice adds nothing.
        sa.UniqueConstraint("series_fk", "result_stored_at", "sop_class_uid"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    instance_number: Mapped[int] = mapped_column(sa.Integer)
    #: ``series_result.stored_at`` of the result the document was made from
    result_stored_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    supersedes_sop_instance_uid: Mapped[str | None] = mapped_column(sa.String(UID_LENGTH))
    dataset: Mapped[bytes] = mapped_column(sa.LargeBinary)  # DICOM Part 10 file
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class OutboxItem(Base):
    """The delivery of one result document to one destination (the durable outbox)."""

    __tablename__ = "outbox"
    __table_args__ = (
        sa.UniqueConstraint("document_fk", "destination"),
        # "pending rows due by now": equality on state, range on next_attempt_at.
        sa.Index("ix_outbox_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    document_fk: Mapped[int] = mapped_column(sa.ForeignKey("result_document.id"))
    destination: Mapped[str] = mapped_column(sa.String)  # "AE@host:port"
    state: Mapped[str] = mapped_column(sa.String(_STATE_LENGTH))  # domain.DeliveryState
    attempts: Mapped[int] = mapped_column(sa.Integer)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Feedback(Base):
    """A radiologist's verdict on a series (append-only: the latest one is the label)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), index=True)
    user: Mapped[str] = mapped_column(sa.String)
    ich: Mapped[bool] = mapped_column(sa.Boolean)
    subtypes: Mapped[dict[str, Any]] = mapped_column(sa.JSON)  # subtype label -> bool
    comment: Mapped[str] = mapped_column(sa.Text, default="")
    #: ``series_result.stored_at`` of the result the radiologist saw (None: no result yet)
    result_stored_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class KeyImage(Base):
    """The key slice of a series' result as PNGs: brain window, and with the heatmap."""

    __tablename__ = "key_image"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), unique=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(UID_LENGTH))
    method: Mapped[str] = mapped_column(sa.String(_STATE_LENGTH))  # "gradcam", ...
    model_sha256: Mapped[str] = mapped_column(sa.String(64))
    plain_png: Mapped[bytes] = mapped_column(sa.LargeBinary)
    heatmap_png: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class WorkerHeartbeat(Base):
    """The last sign of life of each classification worker (``/healthz`` reads it)."""

    __tablename__ = "worker_heartbeat"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, unique=True)  # "triage@host:pid"
    hostname: Mapped[str] = mapped_column(sa.String)
    pid: Mapped[int] = mapped_column(sa.Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    beat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
