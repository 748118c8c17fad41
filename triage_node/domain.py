"""Value objects and vocabularies shared by every layer (imports nothing of ours)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

#: The classifier's outputs, in the order of the RSNA challenge.
LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)

#: SOP classes whose instances can be triaged (axial CT images).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
TRIAGEABLE_SOP_CLASSES: frozenset[str] = frozenset({CT_IMAGE_STORAGE})


class InstanceState(StrEnum):
    """What happened to one received instance."""

    STORED = "stored"  # on disk, recorded, a triage candidate
    NOT_FOR_TRIAGE = "not_for_triage"  # on disk, recorded, never triaged (see reason)


class SeriesState(StrEnum):
    """Life cycle of a series; later stages are added by the pipeline."""

    RECEIVING = "receiving"
    NOT_TRIAGED = "not_triaged"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class EventKind(StrEnum):
    """Kinds of audit events."""

    ASSOCIATION_OPENED = "association_opened"
    ASSOCIATION_CLOSED = "association_closed"
    ASSOCIATION_ABORTED = "association_aborted"
    ASSOCIATION_REJECTED = "association_rejected"
    INSTANCE_STORED = "instance_stored"
    INSTANCE_REFUSED = "instance_refused"
    FEEDBACK_RECORDED = "feedback_recorded"  # a radiologist's verdict on a series
    RESULT_STORED = "result_stored"  # a series was classified (outcome: flagged/negative)
    SERIES_FAILED = "series_failed"  # a series could not be classified (detail: why)
    IMAGES_REMOVED = "images_removed"  # retention removed a series' spooled images
    RESULT_DELIVERED = "result_delivered"  # an SR/SC reached a destination (peer: which)
    RESULT_DELIVERY_FAILED = "result_delivery_failed"  # given up on one (detail: why)
    SERIES_VIEWED = "series_viewed"  # a user opened a series in the worklist
    WORKLIST_VIEWED = "worklist_viewed"  # a user looked at the worklist (at most 1/10 min)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Header facts of one received instance, as recorded in the database.

    ``file_path`` is relative to the spool root; ``image_position`` and
    ``image_orientation`` are the patient-space vectors or ``None`` when absent.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    received_at: dt.datetime
    calling_ae: str
    state: InstanceState
    reason: str | None = None
    patient_name: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    series_number: int | None = None
    image_type: str = ""
    instance_number: int | None = None
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, float, float, float, float, float] | None = None
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One audit event: who did what, when, with which outcome."""

    kind: EventKind
    at: dt.datetime
    actor: str = ""  # calling AE title or user name
    peer: str = ""  # remote address
    outcome: str = ""  # "success", a DICOM status in hex, or a reason
    detail: str = ""
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """One row of ``triage-node series``."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    accession_number: str
    modality: str
    series_description: str
    instance_count: int
    state: SeriesState
    reason: str | None
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """The classifier's result for one series, as stored.

    ``slices`` are ``(sop_instance_uid, position_mm, probabilities in LABELS order)`` in
    anatomical order; ``probabilities`` are the series' (max over slices).
    """

    series_instance_uid: str
    probabilities: dict[str, float]
    slices: tuple[tuple[str, float, tuple[float, ...]], ...]
    key_sop_instance_uid: str
    flagged: bool
    threshold: float
    model_name: str
    model_version: str
    model_sha256: str
    inference_started_at: dt.datetime
    inference_done_at: dt.datetime
    stored_at: dt.datetime | None = None


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float] | None:
    """Unit normal (row x column) of an ImageOrientationPatient, or None if degenerate."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    return None if norm < 1e-6 else (n[0] / norm, n[1] / norm, n[2] / norm)


def position_along_normal(
    position: Sequence[float] | None, orientation: Sequence[float] | None
) -> float | None:
    """A slice's position in mm along its normal: the sort key of a series.

    ``dot(ImagePositionPatient, row x column)``; ``ImagePositionPatient[2]`` when the
    orientation is missing or degenerate; None without a position.
    """
    if position is None or len(position) != 3:
        return None
    normal = slice_normal(orientation) if orientation is not None else None
    if normal is None:
        return float(position[2])
    return float(sum(p * n for p, n in zip(position, normal, strict=True)))


def utcnow() -> dt.datetime:
    """Timezone-aware current UTC time (the only clock the node records)."""
    return dt.datetime.now(dt.UTC)


class DeliveryState(StrEnum):
    """Life cycle of one result document's delivery to one destination (the outbox)."""

    PENDING = "pending"  # to be sent (again) at next_attempt_at
    SENT = "sent"  # the destination stored it
    FAILED = "failed"  # given up: permanent failure or max_attempts reached (see last_error)
    SUPERSEDED = "superseded"  # a newer result of the series replaced it before it went out


@dataclass(frozen=True, slots=True)
class ResultDocument:
    """A DICOM object made from a series result (the SR), stored to be sent as it is.

    ``dataset`` is the DICOM Part 10 file; every retry, and every destination, gets these
    bytes, hence the same SOP Instance UID. ``result_stored_at`` is the ``stored_at`` of the
    result it was made from.
    """

    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    result_stored_at: dt.datetime
    supersedes_sop_instance_uid: str | None
    created_at: dt.datetime
    dataset: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """One row of the outbox: a result document for one destination (``AE@host:port``)."""

    id: int
    series_instance_uid: str
    sop_instance_uid: str
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    sent_at: dt.datetime | None = None
