"""From a received file to a database record: header parse, triage eligibility, group commit.

Nothing here touches the network; :mod:`triage_node.scp` calls it from the C-STORE handler.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triage_node.domain import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    EventRecord,
    InstanceRecord,
    InstanceState,
)
from triage_node.errors import DatabaseError, InvalidDatasetError

log = logging.getLogger(__name__)

_MAX_TEXT = 256


class Header(Protocol):
    """What the record is built from: a pydicom Dataset, or the fast path's
    :class:`triage_node.header.HeaderFields`."""

    def get(self, keyword: str, default: Any = None) -> Any: ...


_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def read_header(path: Path, head: bytes = b"") -> Dataset:
    """Parse a DICOM file up to (not including) its pixel data.

    Parameters
    ----------
    path : Path
        The file.
    head : bytes, optional
        The file's first bytes, when the caller still has them in memory. They are parsed
        instead of the file if the parse stops before their end (at the pixel data): the
        parse reads sequentially, so the file would give the same dataset. Otherwise (the
        header runs past them, or they do not parse) the file is read.

    Raises
    ------
    InvalidDatasetError
        If the file is not DICOM or its header cannot be decoded.
    """
    if head:
        fp = BytesIO(head)
        try:
            ds = dcmread(fp, stop_before_pixels=True)
            for kw in _IDENTIFYING:
                ds.get(kw)
        except Exception:  # decided on the whole file below, with its own error
            pass
        else:
            if fp.tell() < len(head):
                _check_encoding(ds, path, head)
                return ds
    try:
        ds = dcmread(path, stop_before_pixels=True)
        # Touch the identifying elements now so a malformed value fails here, not later.
        for kw in _IDENTIFYING:
            ds.get(kw)
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError,
            OSError, NotImplementedError) as exc:
        raise InvalidDatasetError(f"cannot parse dataset header: {exc}") from exc
    _check_encoding(ds, path, head)
    return ds


IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_VRS = frozenset(v.encode() for v in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV"))


def _check_encoding(ds: Dataset, path: Path, head: bytes) -> None:
    """Refuse a dataset whose VR encoding is not the one its transfer syntax (the
    presentation context it came in) says: pydicom would read it anyway, other readers
    would not."""
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax not in (IMPLICIT_VR_LE, EXPLICIT_VR_LE):
        return
    explicit = _starts_explicit(path, head)
    if explicit is not None and explicit != (syntax == EXPLICIT_VR_LE):
        raise InvalidDatasetError(
            f"the dataset is encoded in {'explicit' if explicit else 'implicit'} VR but "
            f"its transfer syntax {syntax} is {'implicit' if explicit else 'explicit'} VR")


def _starts_explicit(path: Path, head: bytes = b"") -> bool | None:
    """Whether the dataset after the file meta begins with an explicit-VR element (the test
    pydicom itself uses); None when the file is too short to tell. Uses ``head`` (the
    file's first bytes) when it reaches far enough, else reads the file."""
    def first_element(buf: bytes) -> bytes | None:
        if len(buf) < 144 or buf[128:132] != b"DICM" or buf[132:136] != b"\x02\x00\x00\x00":
            return None
        start = 144 + int.from_bytes(buf[140:144], "little")
        return buf[start:start + 8] if len(buf) >= start + 8 else None

    first = first_element(head)
    if first is None:
        with path.open("rb") as f:
            buf = f.read(144)
            if len(buf) == 144:
                buf += f.read(int.from_bytes(buf[140:144], "little") + 8)
        first = first_element(buf)
    return None if first is None else first[4:6] in _VRS


def _text(value: Any, limit: int = _MAX_TEXT) -> str:
    """A value as clean text for the database: no NULs (PostgreSQL refuses them), bounded."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).replace("\x00", "").strip()[:limit]


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _get(ds: Header, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # a malformed optional element must not refuse the instance
        return None


def triage_eligibility(ds: Header, sop_class_uid: str) -> tuple[InstanceState, str | None]:
    """Whether an instance can be triaged, and if not, why (stored and recorded either way).

    Series-level rules (head, axial, enough slices) come later, in series assembly.
    """
    if sop_class_uid == ENHANCED_CT_IMAGE_STORAGE:
        return InstanceState.NOT_FOR_TRIAGE, "enhanced (multi-frame) CT is not triaged yet"
    if sop_class_uid != CT_IMAGE_STORAGE:
        name = getattr(_get(ds, "SOPClassUID"), "name", sop_class_uid)
        return InstanceState.NOT_FOR_TRIAGE, f"not a CT image (SOP class {name})"
    modality = _text(_get(ds, "Modality"))
    if modality and modality != "CT":
        return InstanceState.NOT_FOR_TRIAGE, f"modality {modality} is not CT"
    image_type = [_text(v).upper() for v in (_get(ds, "ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return InstanceState.NOT_FOR_TRIAGE, "localizer/scout image"
    return InstanceState.STORED, None


#: Largest matrix a triageable CT slice may claim (CT is 512 x 512, rarely 1024 or 2048).
MAX_MATRIX = 4096

#: Transfer syntaxes whose pixel data length follows from the image geometry.
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def pixel_problem(ds: Header, transfer_syntax_uid: str, file_size: int) -> str | None:
    """Why a slice's image cannot be used, judged from its header and file size; or None.

    The header parse stops before the pixel data, so a missing or short Pixel Data
    element shows only as a file too small for Rows x Columns x BitsAllocated (checked for
    native transfer syntaxes; compressed data is checked when it is decoded).
    """
    rows, cols = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    if not rows or not cols or rows < 1 or cols < 1:
        return "no image: Rows/Columns missing"
    if rows > MAX_MATRIX or cols > MAX_MATRIX:
        return f"matrix {rows}x{cols} is larger than a CT slice (at most {MAX_MATRIX})"
    bits = _int(_get(ds, "BitsAllocated"))
    if bits not in (8, 16, 32):
        return f"BitsAllocated {bits} is not 8, 16 or 32"
    if transfer_syntax_uid in _NATIVE_SYNTAXES:
        samples = _int(_get(ds, "SamplesPerPixel")) or 1
        frames = _int(_get(ds, "NumberOfFrames")) or 1
        needed = rows * cols * samples * frames * bits // 8
        if file_size < needed:
            return (f"pixel data missing or short: the file has {file_size} bytes, "
                    f"{rows}x{cols}x{bits} bits need {needed}")
    return None


def instance_record(
    ds: Header,
    *,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    file_path: str,
    file_size: int,
    calling_ae: str,
    received_at: dt.datetime,
) -> InstanceRecord:
    """Build the database record of one stored instance from its header."""
    state, reason = triage_eligibility(ds, sop_class_uid)
    if state is InstanceState.STORED:
        problem = pixel_problem(ds, transfer_syntax_uid, file_size)
        if problem:
            state, reason = InstanceState.NOT_FOR_TRIAGE, problem
    return InstanceRecord(
        sop_instance_uid=_text(_get(ds, "SOPInstanceUID"), 128),
        sop_class_uid=sop_class_uid,
        study_instance_uid=_text(_get(ds, "StudyInstanceUID"), 128),
        series_instance_uid=_text(_get(ds, "SeriesInstanceUID"), 128),
        patient_id=_text(_get(ds, "PatientID"), 64),
        transfer_syntax_uid=transfer_syntax_uid,
        file_path=file_path,
        file_size=file_size,
        received_at=received_at,
        calling_ae=calling_ae,
        state=state,
        reason=reason,
        patient_name=_text(_get(ds, "PatientName")),
        accession_number=_text(_get(ds, "AccessionNumber"), 64),
        study_date=_text(_get(ds, "StudyDate"), 16),
        study_description=_text(_get(ds, "StudyDescription")),
        modality=_text(_get(ds, "Modality"), 16),
        body_part_examined=_text(_get(ds, "BodyPartExamined"), 64),
        series_description=_text(_get(ds, "SeriesDescription")),
        series_number=_int(_get(ds, "SeriesNumber")),
        image_type=_text(_get(ds, "ImageType")),
        instance_number=_int(_get(ds, "InstanceNumber")),
        image_position=_floats(_get(ds, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
        image_orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
    )


# ----------------------------------------------------------------------------- recorder

#: ``(instances, events) -> list[bool]``, e.g. a partial of
#: :func:`triage_node.store.record_batch`. It may have a ``turn()`` method: a context
#: manager that :class:`Recorder` holds while it picks a batch and writes it
#: (:meth:`triage_node.store.InstanceWriter.turn`).
BatchWriter = Callable[[Sequence[InstanceRecord], Sequence[EventRecord]], list[bool]]


@dataclass(slots=True)
class _Item:
    instance: InstanceRecord
    events: tuple[EventRecord, ...]
    future: Future[bool]


class Recorder:
    """Group commit: one thread writes what many handler threads submit, in batches.

    A handler submits an instance's record once its file is in place and blocks until the
    transaction holding it has committed, so its C-STORE is acknowledged only for a durable
    record; meanwhile concurrent associations share that commit. A batch is everything
    submitted by the time the thread gets its turn to write (the writer's ``turn()``, if
    it has one: on a SQLite file the receiving processes take turns); what arrives while a
    transaction is written, or while the turn is awaited, makes the next batch, so batches
    grow with the load and a lone record is written at once. Audit-only events
    (:meth:`audit`) ride along with the next batch and are not waited for.

    Parameters
    ----------
    write_batch : callable
        ``(instances, events) -> list[bool]``, e.g. a partial of
        :func:`triage_node.store.record_batch`; True per instance that was new.
    max_batch : int
        Most instances per transaction.
    """

    def __init__(self, write_batch: BatchWriter, *, max_batch: int = 256) -> None:
        self._write = write_batch
        self._turn: Callable[[], contextlib.AbstractContextManager[Any]] = getattr(
            write_batch, "turn", contextlib.nullcontext)
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._items: list[_Item] = []
        self._events: list[EventRecord] = []
        self._closed = False
        #: held by whoever uses the writer: the recorder's thread, or a handler's stage()
        self._writing = threading.Lock()
        self._stage: Callable[..., Any] | None = getattr(write_batch, "stage", None)
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def record(self, instance: InstanceRecord, events: Sequence[EventRecord] = (), *,
               timeout: float = 60) -> bool:
        """Durably record one instance (and its events); True if it was new.

        Raises
        ------
        DatabaseError
            If the transaction failed or did not finish within ``timeout``.
        """
        return self.wait(self.submit(instance, events), timeout)

    def submit(self, instance: InstanceRecord,
               events: Sequence[EventRecord] = ()) -> Future[bool]:
        """:meth:`record` without waiting: collect the outcome with :meth:`wait`.

        Raises
        ------
        DatabaseError
            If the recorder is closed.
        """
        fut: Future[bool] = Future()
        with self._cond:
            if self._closed:
                raise DatabaseError("recorder is closed")
            self._items.append(_Item(instance, tuple(events), fut))
            self._cond.notify()
        return fut

    def stage(self, instance: InstanceRecord,
              events: Sequence[EventRecord] = ()) -> StagedRecord | None:
        """Write a record now, in the caller's thread, and commit it later: for a caller
        whose record may not commit yet (its file's ``fsync`` and rename are still to
        come) and who would rather write it while the disk works than after.

        Only when the writer is free this moment (nothing queued, the recorder's thread
        not writing, the writer's ``stage`` able to start at once). Otherwise None, with
        nothing written: the caller submits the record (:meth:`submit`) once it may commit.
        While staged, the recorder's thread waits: end it soon with
        :meth:`StagedRecord.commit` or :meth:`StagedRecord.rollback`.

        Raises
        ------
        DatabaseError
            If the writer failed (nothing is written).
        """
        if self._stage is None or not self._writing.acquire(blocking=False):
            return None
        try:
            with self._cond:
                busy = bool(self._items) or self._closed  # queued records go first
            staged = None if busy else self._stage([instance], events)
        except Exception as exc:
            self._writing.release()
            raise exc if isinstance(exc, DatabaseError) else DatabaseError(str(exc)) from exc
        if staged is None:
            self._writing.release()
            return None
        return StagedRecord(staged, self._writing)

    @staticmethod
    def wait(recorded: Future[bool], timeout: float = 60) -> bool:
        """The outcome of :meth:`submit`: True if the instance was new.

        Raises
        ------
        DatabaseError
            If the transaction failed or did not finish within ``timeout``.
        """
        try:
            return recorded.result(timeout=timeout)
        except TimeoutError as exc:
            raise DatabaseError(f"database write did not complete within {timeout:g} s") from exc

    def audit(self, *events: EventRecord) -> None:
        """Queue audit events for the next transaction (not waited for)."""
        with self._cond:
            if not self._closed:
                self._events.extend(events)
                self._cond.notify()

    def close(self, timeout: float = 30) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        close = getattr(self._write, "close", None)
        if close is not None and not self._thread.is_alive():
            close()  # e.g. InstanceWriter's connection

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._items or self._events):
                    if self._closed:
                        return
                    self._cond.wait()
            taken = False
            with self._writing:
                try:
                    with self._turn():
                        batch, events = self._take()  # with what came while it waited
                        taken = True
                        self._flush(batch, events)
                except Exception as exc:  # no turn to write (e.g. its lock file): say so
                    if not taken:
                        batch, events = self._take()
                        self._fail(batch, events, exc)

    def _take(self) -> tuple[list[_Item], list[EventRecord]]:
        with self._cond:
            batch, self._items = self._items[:self._max_batch], self._items[self._max_batch:]
            events, self._events = self._events, []
        return batch, events

    def _flush(self, batch: list[_Item], events: list[EventRecord]) -> None:
        events = [ev for it in batch for ev in it.events] + events
        try:
            results = self._write([it.instance for it in batch], events)
        except Exception as exc:
            self._fail(batch, events, exc)
            return
        for it, is_new in zip(batch, results, strict=True):
            it.future.set_result(is_new)

    @staticmethod
    def _fail(batch: list[_Item], events: list[EventRecord], exc: Exception) -> None:
        err = exc if isinstance(exc, DatabaseError) else DatabaseError(str(exc))
        if not batch:
            log.warning("could not record %d audit events: %s", len(events), err)
        for it in batch:
            it.future.set_exception(err)


class StagedRecord:
    """A record :meth:`Recorder.stage` wrote and has not committed. One of :meth:`commit`
    and :meth:`rollback` ends it and lets the recorder write again (after that, commit
    raises and rollback does nothing)."""

    def __init__(self, batch: Any, writing: threading.Lock) -> None:
        self._batch = batch
        self._writing: threading.Lock | None = writing

    def commit(self) -> bool:
        """Commit; True if the instance was new.

        Raises
        ------
        DatabaseError
            If the commit failed: nothing is recorded.
        """
        writing, self._writing = self._writing, None
        if writing is None:
            raise DatabaseError("this record was already committed or rolled back")
        try:
            return bool(self._batch.commit()[0])
        except DatabaseError:
            raise
        except Exception as exc:
            raise DatabaseError(str(exc)) from exc
        finally:
            writing.release()

    def rollback(self) -> None:
        """Drop the record: nothing of it is recorded."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        try:
            self._batch.rollback()
        finally:
            writing.release()
