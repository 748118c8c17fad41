"""Header parse, triage eligibility and the group-commit recorder (no network)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from dicomfiles import make_instance

from triage_node.domain import EventKind, EventRecord, InstanceRecord, InstanceState, utcnow
from triage_node.errors import DatabaseError, InvalidDatasetError
from triage_node.ingest import Recorder, instance_record, read_header, triage_eligibility


def _record(path: Path) -> InstanceRecord:
    ds = read_header(path)
    return instance_record(ds, sop_class_uid=str(ds.SOPClassUID),
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                           file_path="x.dcm", file_size=path.stat().st_size, calling_ae="CT1",
                           received_at=utcnow())


def test_header_only_and_fields(tmp_path: Path) -> None:
    f = make_instance(tmp_path / "ct.dcm", rows=32, cols=48, InstanceNumber=7,
                      PatientID="P\x00-1")
    ds = read_header(f)
    assert "PixelData" not in ds
    rec = _record(f)
    assert rec.state is InstanceState.STORED and rec.reason is None
    assert rec.rows == 32 and rec.columns == 48 and rec.instance_number == 7
    assert rec.patient_id == "P-1", "NULs are stripped (PostgreSQL refuses them)"
    assert rec.image_position is not None and len(rec.image_position) == 3
    assert rec.image_orientation is not None and len(rec.image_orientation) == 6
    assert rec.modality == "CT" and "AXIAL" in rec.image_type


def test_header_from_head_bytes_equals_the_file(tmp_path: Path) -> None:
    """Bytes already in memory are parsed when the header ends inside them; a head that
    stops short (or is garbage) falls back to the file, so the result never differs."""
    f = make_instance(tmp_path / "ct.dcm", rows=64, cols=64)
    data = f.read_bytes()
    from_file = read_header(f)
    pixel_at = data.index(b"\xe0\x7f\x10\x00")
    for head in (data[: pixel_at + 12], data[:pixel_at], data[:300], b"junk" * 100):
        assert read_header(f, head) == from_file, len(head)
    f.write_bytes(b"not dicom")
    assert read_header(f, data[: pixel_at + 12]) == from_file, "whole header in memory"
    with pytest.raises(InvalidDatasetError):
        read_header(f, data[:300])


@pytest.mark.parametrize(
    ("kind", "overrides", "reason"),
    [
        ("localizer", {}, "localizer"),
        ("sc", {}, "not a CT image"),
        ("mr", {}, "not a CT image"),
        ("ct", {"Modality": "PT"}, "modality PT is not CT"),
        ("ct", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2.1"}, "enhanced"),
    ],
)
def test_not_for_triage_reasons(tmp_path: Path, kind: str, overrides: dict[str, str],
                                reason: str) -> None:
    f = make_instance(tmp_path / "x.dcm", kind=kind, **overrides)  # type: ignore[arg-type]
    ds = read_header(f)
    state, why = triage_eligibility(ds, str(ds.SOPClassUID))
    assert state is InstanceState.NOT_FOR_TRIAGE
    assert why is not None and reason in why


def test_malformed_values_do_not_refuse(tmp_path: Path) -> None:
    f = make_instance(tmp_path / "x.dcm", InstanceNumber=None, ImagePositionPatient=[1, 2])
    rec = _record(f)
    assert rec.instance_number is None and rec.image_position is None


def test_not_dicom_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"hello")
    with pytest.raises(InvalidDatasetError):
        read_header(tmp_path / "x.dcm")


class _Writer:
    """Records the batches it is given; optionally slow or failing."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[tuple[int, int]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, instances: Sequence[InstanceRecord],
                 events: Sequence[EventRecord]) -> list[bool]:
        time.sleep(self.delay)
        if self.fail:
            raise DatabaseError("database is down")
        self.batches.append((len(instances), len(events)))
        return [i % 2 == 0 for i in range(len(instances))]


def test_recorder_group_commits_concurrent_submissions(tmp_path: Path) -> None:
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _Writer(delay=0.05)
    recorder = Recorder(writer)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(recorder.record(rec)))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.close()
    assert len(results) == 20
    assert sum(n for n, _ in writer.batches) == 20
    assert len(writer.batches) < 20, "concurrent records share transactions"


def test_recorder_failure_reaches_every_waiter(tmp_path: Path) -> None:
    rec = _record(make_instance(tmp_path / "a.dcm"))
    recorder = Recorder(_Writer(fail=True))
    with pytest.raises(DatabaseError, match="down"):
        recorder.record(rec)
    recorder.audit(EventRecord(EventKind.ASSOCIATION_OPENED, utcnow()))
    recorder.close()
    with pytest.raises(DatabaseError, match="closed"):
        recorder.record(rec)


def test_recorder_times_out(tmp_path: Path) -> None:
    rec = _record(make_instance(tmp_path / "a.dcm"))
    recorder = Recorder(_Writer(delay=1.0))
    with pytest.raises(DatabaseError, match="did not complete"):
        recorder.record(rec, timeout=0.05)
    recorder.close()


def test_audit_events_ride_along(tmp_path: Path) -> None:
    writer = _Writer()
    recorder = Recorder(writer)
    recorder.audit(EventRecord(EventKind.ASSOCIATION_OPENED, utcnow()))
    recorder.close()
    assert writer.batches == [(0, 1)]


class _TurnWriter(_Writer):
    """A writer whose turn (like InstanceWriter's lock between processes) is held by
    someone else until ``free`` is set, or cannot be taken at all."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.free = threading.Event()
        self.waiting = threading.Event()
        self.broken = broken

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        if self.broken:
            raise DatabaseError("cannot open the writers' lock")
        self.waiting.set()
        self.free.wait(10)
        yield


def test_recorder_batches_what_arrives_while_awaiting_its_turn(tmp_path: Path) -> None:
    """Records submitted while the recorder waits for its turn to write join that batch."""
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _TurnWriter()
    recorder = Recorder(writer)
    first = recorder.submit(rec)
    assert writer.waiting.wait(5)
    later = [recorder.submit(rec) for _ in range(4)]
    recorder.audit(EventRecord(EventKind.ASSOCIATION_OPENED, utcnow()))
    time.sleep(0.1)
    assert writer.batches == [] and not first.done()
    writer.free.set()
    assert [Recorder.wait(f, 5) for f in (first, *later)] == [True, False, True, False, True]
    recorder.close()
    assert writer.batches == [(5, 1)]


def test_recorder_without_a_turn_fails_the_records_and_goes_on(tmp_path: Path) -> None:
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _TurnWriter(broken=True)
    recorder = Recorder(writer)
    with pytest.raises(DatabaseError, match="writers' lock"):
        recorder.record(rec, timeout=5)
    writer.broken = False
    writer.free.set()
    assert recorder.record(rec, timeout=5) is True
    recorder.close()
    assert writer.batches == [(1, 0)]


class _StagingWriter(_Writer):
    """A writer with ``stage``: batches staged (in the caller's thread) and committed."""

    def __init__(self, decline: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.decline = decline
        self.stage_fails = fail
        self.staged: list[tuple[str, str]] = []  # (what happened, thread name)

    def stage(self, instances: Sequence[InstanceRecord],
              events: Sequence[EventRecord]) -> _Staged | None:
        if self.stage_fails:
            raise DatabaseError("database is down")
        if self.decline:
            return None
        self.staged.append(("staged", threading.current_thread().name))
        return _Staged(self, len(instances), len(events))


class _Staged:
    def __init__(self, writer: _StagingWriter, n: int, events: int) -> None:
        self.writer, self.n, self.events = writer, n, events

    def commit(self) -> list[bool]:
        self.writer.staged.append(("committed", threading.current_thread().name))
        self.writer.batches.append((self.n, self.events))
        return [True] * self.n

    def rollback(self) -> None:
        self.writer.staged.append(("rolled back", threading.current_thread().name))


def test_staged_record_is_written_in_the_callers_thread_and_holds_the_recorder(
        tmp_path: Path) -> None:
    """A record staged while the writer is free is written and committed in the caller's
    thread; the recorder's thread waits meanwhile, then writes what was submitted."""
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _StagingWriter()
    recorder = Recorder(writer)
    staged = recorder.stage(rec, [EventRecord(EventKind.INSTANCE_STORED, utcnow())])
    assert staged is not None
    queued = recorder.submit(rec)
    time.sleep(0.2)
    assert not queued.done(), "the recorder waits while a record is staged"
    assert staged.commit() is True
    assert Recorder.wait(queued, 5) is True
    me = threading.current_thread().name
    assert writer.staged == [("staged", me), ("committed", me)]
    assert writer.batches == [(1, 1), (1, 0)]
    with pytest.raises(DatabaseError, match="already"):
        staged.commit()
    staged.rollback()  # does nothing once ended
    recorder.close()


def test_stage_declines_when_records_wait_or_the_writer_is_busy(tmp_path: Path) -> None:
    """Nothing is staged while the recorder's thread writes or records are queued (they
    are older), nor when the writer declines; a rolled-back record frees the recorder."""
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _StagingWriter()
    writer.delay = 0.5
    recorder = Recorder(writer)
    first = recorder.submit(rec)
    time.sleep(0.1)  # the recorder's thread is writing it
    assert recorder.stage(rec) is None
    assert Recorder.wait(first, 5) is True
    writer.delay = 0.0
    writer.decline = True
    assert recorder.stage(rec) is None
    writer.decline = False
    staged = recorder.stage(rec)
    assert staged is not None
    staged.rollback()
    assert recorder.record(rec, timeout=5) is True, "the recorder writes again"
    assert [what for what, _ in writer.staged] == ["staged", "rolled back"]
    assert writer.batches == [(1, 0), (1, 0)]
    recorder.close()
    assert recorder.stage(rec) is None, "closed"


def test_stage_failure_is_a_database_error_and_frees_the_recorder(tmp_path: Path) -> None:
    rec = _record(make_instance(tmp_path / "a.dcm"))
    writer = _StagingWriter(fail=True)
    recorder = Recorder(writer)
    with pytest.raises(DatabaseError, match="down"):
        recorder.stage(rec)
    assert recorder.record(rec, timeout=5) is True
    recorder.close()


def test_recorder_without_stage_never_stages(tmp_path: Path) -> None:
    recorder = Recorder(_Writer())
    assert recorder.stage(_record(make_instance(tmp_path / "a.dcm"))) is None
    recorder.close()
