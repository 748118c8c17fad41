"""The Storage SCP against real dcmtk peers, as a real subprocess on a free port."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nodeproc
import pytest
from dicomfiles import make_ct_series, make_instance
from markers import needs_dcmtk
from nodeproc import DCMTK, DCMTK_ENV, NodeProc, echoscu, running_node, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from triage_node import scu, store
from triage_node.domain import EventKind, InstanceState, SeriesState

pytestmark = needs_dcmtk
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


#: Tests run on both receive loops; the rest on the default (native) one only. The
#: pynetdicom engine is the alternative: its conformance core is checked, not every
#: failure path twice (CI time).
BOTH_ENGINES = {
    "test_echo", "test_series_arrives_complete_and_equal", "test_duplicates_are_idempotent",
    "test_rejected_caller_is_audited", "test_compressed_transfer_syntaxes_decode",
    "test_unparseable_dataset_gets_c000", "test_sigterm_mid_transfer_loses_nothing_acknowledged",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        both = metafunc.function.__name__ in BOTH_ENGINES
        metafunc.parametrize("engine", ["native", "pynetdicom"] if both else ["native"],
                             indirect=True)


@pytest.fixture(autouse=True)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The receive loop (``[dicom] engine``) a test runs on (see BOTH_ENGINES)."""
    monkeypatch.setattr(nodeproc, "ENGINE", request.param)
    return str(request.param)


def db(node: NodeProc):
    return store.make_session_factory(store.make_engine(node.database_url))


def same_dataset(a: Dataset, b: Dataset) -> bool:
    """Element-wise equality, pixel data included (file meta excluded)."""
    return bool(a == b)


def stored_files(node: NodeProc) -> list[Path]:
    return sorted(p for p in node.spool.rglob("*.dcm") if ".incoming" not in p.parts)


def test_echo(tmp_path: Path) -> None:
    with running_node(tmp_path) as node:
        out = echoscu(node.port)
        assert out.returncode == 0, out.stderr
        assert node.stop() == 0


@pytest.mark.parametrize("processes", [1, 2])
def test_series_arrives_complete_and_equal(tmp_path: Path, processes: int) -> None:
    sent = make_ct_series(tmp_path / "in", 200)
    with running_node(tmp_path, processes=processes) as node:
        out = storescu(node.port, sent)
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("Received Store Response (Success)") == 200
        files = stored_files(node)
        assert len(files) == 200
        by_uid = {dcmread(p).SOPInstanceUID: p for p in files}
        for path in sent:
            ds = dcmread(path)
            assert same_dataset(dcmread(by_uid[ds.SOPInstanceUID]), ds), path
        sessions = db(node)
        series = store.list_series(sessions)
        assert len(series) == 1
        assert series[0].instance_count == 200
        assert series[0].state is SeriesState.RECEIVING
        rec = store.get_instance(sessions, ds.SOPInstanceUID)
        assert rec is not None and rec.state is InstanceState.STORED
        assert rec.calling_ae == "STORESCU"
        assert (node.spool / rec.file_path).is_file()
        assert rec.image_position is not None and rec.rows == 512
        for uid, path in by_uid.items():  # the recorded size is the stored file's
            got = store.get_instance(sessions, uid)
            assert got is not None and got.file_size == path.stat().st_size
        # `triage-node series --json` shows the same
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "triage_node.cli",
                "series",
                "--json",
                "--config",
                str(node.config),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(listing.stdout)
        assert rows[0]["instance_count"] == 200 and rows[0]["modality"] == "CT"
        assert rows[0]["patient_id"] == "PHANTOM-1"
        assert node.stop() == 0


def test_duplicates_are_idempotent(tmp_path: Path) -> None:
    sent = make_ct_series(tmp_path / "in", 5, rows=64, cols=64)
    with running_node(tmp_path) as node:
        for _ in range(2):
            out = storescu(node.port, sent)
            assert out.returncode == 0 and out.stderr.count("(Success)") == 5
        assert len(stored_files(node)) == 5
        assert store.count_instances(db(node)) == 5
        log = node.log_text()
        assert "duplicates=5" in log


def test_rejected_caller_is_audited(tmp_path: Path) -> None:
    extra = 'allowed_callers = [{ae_title = "GOODCT", host = "127.0.0.1"}]'
    with running_node(tmp_path, extra=extra) as node:
        bad = echoscu(node.port, calling="EVILCT")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stderr or "Rejected" in bad.stderr
        good = echoscu(node.port, calling="GOODCT")
        assert good.returncode == 0, good.stderr
        node.stop()
        events = store.list_events(db(node), kinds=[EventKind.ASSOCIATION_REJECTED])
        assert [e.actor for e in events] == ["EVILCT"]
        assert "calling AE title not recognised" in events[0].detail
        assert "EVILCT@127.0.0.1 rejected" in node.log_text()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # those UIDs are the point
@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [
        ("../../escape", "1.2.3", "1.2.3.4"),
        ("1.2.3", "1.2/3/../..", "../x"),
        ("1.2.3", "4.5.6", "ID_abc123"),
    ],
)
def test_path_traversal_uids_stay_in_spool(
    tmp_path: Path, study: str, series: str, sop: str
) -> None:
    f = make_instance(
        tmp_path / "evil.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop
    )
    with running_node(tmp_path) as node:
        out = storescu(node.port, [f])
        assert out.returncode == 0 and "(Success)" in out.stderr, out.stderr
        files = stored_files(node)
        assert len(files) == 1
        assert node.spool.resolve() in files[0].resolve().parents
        assert dcmread(files[0]).SOPInstanceUID == sop
    outside = [p for p in tmp_path.rglob("*.dcm") if node.spool not in p.parents]
    assert outside == [f], "nothing written outside the spool"


def test_not_for_triage_instances_recorded_with_reason(tmp_path: Path) -> None:
    files = [
        make_instance(tmp_path / "scout.dcm", kind="localizer"),
        make_instance(tmp_path / "sc.dcm", kind="sc"),
        make_instance(tmp_path / "mr.dcm", kind="mr"),
    ]
    with running_node(tmp_path) as node:
        out = storescu(node.port, files)
        assert out.returncode == 0 and out.stderr.count("(Success)") == 3, out.stderr
        sessions = db(node)
        reasons = {}
        for f in files:
            rec = store.get_instance(sessions, dcmread(f).SOPInstanceUID)
            assert rec is not None and rec.state is InstanceState.NOT_FOR_TRIAGE
            reasons[f.stem] = rec.reason
        assert "localizer" in (reasons["scout"] or "")
        assert "not a CT image" in (reasons["sc"] or "")
        assert "not a CT image" in (reasons["mr"] or "") or "MR" in (reasons["mr"] or "")


def _realdata(sub: str) -> Path:
    path = REALDATA / sub
    if not path.is_dir():
        pytest.skip(f"real DICOM not found at {path}")
    return path


_RETIRED = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}
_DCMTK_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def test_compressed_transfer_syntaxes_decode(tmp_path: Path) -> None:
    """Real compressed CT from ../shared/realdata arrives as sent and its pixels decode."""
    src = _realdata("ts_cornerstone")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "MANIFEST.txt")
    sendable = []
    for p in files:
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if "PixelData" in dcmread(p) and ds.file_meta.TransferSyntaxUID.is_compressed:
            # The variants share one SOP Instance UID; give each its own (pixels untouched).
            full = dcmread(p)
            full.SOPInstanceUID = full.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            copy = tmp_path / "in" / p.name
            copy.parent.mkdir(exist_ok=True)
            full.save_as(copy, enforce_file_format=True)
            sendable.append(copy)
    assert len(sendable) >= 6, [p.name for p in files]
    with running_node(tmp_path) as node:
        for p in sendable:
            ts = str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            if ts in _DCMTK_PROPOSE:
                # dcmtk proposes the compressed syntax only when told, as scanners are
                out = storescu(node.port, [p], extra=("-R", _DCMTK_PROPOSE[ts]))
                assert "(Success)" in out.stderr, (p.name, out.stderr[-500:])
            else:  # retired JPEG processes dcmtk cannot propose: our own SCU sends as is
                report = scu.send([p], "127.0.0.1", node.port, called_ae="ICHTRIAGE")
                assert report.sent == 1, (p.name, report.failed)
        sessions = db(node)
        decoded = []
        for p in sendable:
            sent = dcmread(p)
            rec = store.get_instance(sessions, sent.SOPInstanceUID)
            assert rec is not None
            got = dcmread(node.spool / rec.file_path)
            assert got.file_meta.TransferSyntaxUID == rec.transfer_syntax_uid
            assert got.PixelData == sent.PixelData or rec.transfer_syntax_uid != str(
                sent.file_meta.TransferSyntaxUID
            )
            assert got.PixelData == sent.PixelData, "stored as received, not re-encoded"
            if rec.transfer_syntax_uid in _RETIRED:
                continue  # retired JPEG processes: stored, but no pydicom decoder exists
            arr = got.pixel_array
            assert arr.shape[-2:] == (got.Rows, got.Columns)
            assert int(arr.max()) > int(arr.min()), "decoded to an image, not a constant"
            decoded.append(rec.transfer_syntax_uid)
        assert len(set(decoded)) >= 5, decoded


def test_unwritable_spool_answers_failure_and_keeps_serving(tmp_path: Path) -> None:
    good = make_ct_series(tmp_path / "good", 2, rows=32, cols=32)
    blocked = make_instance(tmp_path / "blocked.dcm", StudyInstanceUID="1.2.3.999")
    with running_node(tmp_path) as node:
        # A file where the study folder must go: mkdir fails (works as root too).
        (node.spool / "1.2.3.999").write_bytes(b"in the way")
        out = storescu(node.port, [blocked])
        assert "Store Response (Success)" not in out.stderr
        assert "Refused: OutOfResources" in out.stderr, out.stderr
        assert "refused with 0xA700" in node.log_text()
        assert store.get_instance(db(node), dcmread(blocked).SOPInstanceUID) is None
        out = storescu(node.port, good)
        assert out.stderr.count("(Success)") == 2, "node keeps serving"


def test_disk_reserve_refuses(tmp_path: Path) -> None:
    f = make_instance(tmp_path / "a.dcm")
    with running_node(tmp_path, min_free_mb=10**9) as node:
        out = storescu(node.port, [f])
        assert "Refused: OutOfResources" in out.stderr, out.stderr
        assert "spool disk nearly full" in node.log_text()
        assert node.stop() == 0


def test_unparseable_dataset_gets_c000(tmp_path: Path) -> None:
    """A dataset whose header does not decode: 0xC000 and the node keeps going."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    good = make_instance(tmp_path / "ok.dcm")
    with running_node(tmp_path) as node:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        ds = dcmread(good)
        ds.SOPInstanceUID = "1.2.3.4.5"
        # Corrupt: an element claiming more bytes than the dataset holds.
        from pynetdicom.dsutils import encode

        raw = encode(ds, True, True)
        assert raw is not None
        # Truncated mid-header: parses, but without its identifying UIDs.
        truncated = raw[:200] + b"\x10\x00\x20\x00\xff\xff\xff\x7f" + b"junk"
        assert _send_raw(assoc, truncated, "1.2.3.4.5") == 0xC001
        # Undecodable: a sequence of undefined length whose items are zeros.
        garbage = b"\x08\x00\x15\x11\xff\xff\xff\xff" + bytes(20)
        assert _send_raw(assoc, garbage, "1.2.3.4.6") == 0xC000
        assoc.release()
        out = storescu(node.port, [good])
        assert "(Success)" in out.stderr


def _send_raw(assoc, raw: bytes, sop_uid: str) -> int:
    """C-STORE already-encoded dataset bytes as CT Image Storage, without decoding them."""
    import tempfile
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2"  # implicit VR little endian
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(buf.getvalue() + raw)
        fh.flush()
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
        try:
            rsp = assoc.send_c_store(fh.name)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
    return int(rsp.Status)


def test_sop_class_mismatch_gets_a900(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    f = make_instance(tmp_path / "mr.dcm", kind="mr")
    ds = dcmread(f)
    with running_node(tmp_path) as node:
        ae = AE(ae_title="ODD")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        raw = encode(ds, True, True)
        assert raw is not None
        status = _send_raw(assoc, raw, ds.SOPInstanceUID)
        assoc.release()
        assert status == 0xA900
        assert "refused with 0xA900" in node.log_text()


_SENT = re.compile(r"Sending file: (\S+)")


def _acknowledged(storescu_log: str) -> list[str]:
    """Files storescu got a success response for, from its -v output."""
    acked, current = [], None
    for line in storescu_log.splitlines():
        m = _SENT.search(line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_transfer_loses_nothing_acknowledged(tmp_path: Path, processes: int) -> None:
    sent = make_ct_series(tmp_path / "in", 200)
    with running_node(tmp_path, processes=processes, extra="shutdown_grace = 0.1") as node:
        sessions = db(node)
        sender = subprocess.Popen(
            [
                str(DCMTK / "storescu"),
                "-v",
                "-aec",
                "ICHTRIAGE",
                "127.0.0.1",
                str(node.port),
                *map(str, sent),
            ],
            env=DCMTK_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while store.count_instances(sessions) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.stop() == 0, node.log_text()[-2000:]
        _, err = sender.communicate(timeout=60)
    acked = _acknowledged(err)
    assert 20 <= len(acked) < 200, f"expected an interrupted transfer, {len(acked)} acked"
    engine = store.make_engine(node.database_url)
    sessions = store.make_session_factory(engine)
    for path in acked:
        ds = dcmread(path)
        rec = store.get_instance(sessions, ds.SOPInstanceUID)
        assert rec is not None, f"acknowledged but not recorded: {path}"
        assert same_dataset(dcmread(node.spool / rec.file_path), ds)
    engine.dispose()
    shutil.rmtree(tmp_path / "in")


@contextlib.contextmanager
def _two_receivers(tmp_path: Path,
                   until: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``triage-node scp`` with two receiving processes, once its log says ``until``;
    SIGTERM must then stop it with exit 0."""
    cfg = nodeproc.write_config(tmp_path / "config.toml", port=nodeproc.free_port(),
                                spool=tmp_path / "spool",
                                database_url=f"sqlite:///{tmp_path / 'node.db'}", processes=2)
    log = tmp_path / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "triage_node.cli", "scp", "--config", str(cfg)],
            stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while until not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.01)
        yield proc, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_receivers_start_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM as soon as the supervisor has started its receivers, before they listen:
    nothing was received, so it is a clean stop (exit 0), not a failure."""
    with _two_receivers(tmp_path, "starting 2 receiving processes"):
        pass


def test_supervisor_says_listening_once_every_receiver_listens(tmp_path: Path) -> None:
    """The supervisor's "listening" line (what an operator or a script waits for) comes
    after each receiving process accepts associations, not when they were started."""
    with _two_receivers(tmp_path, "with 2 receiving processes") as (_, log):
        lines = log.read_text().splitlines()
        ready = next(i for i, line in enumerate(lines) if "with 2 receiving processes" in line)
        for index in (0, 1):
            listening = [i for i, line in enumerate(lines)
                         if f"receiver {index} (pid" in line and "listening" in line]
            assert listening and listening[0] < ready, "\n".join(lines)


def _pg_admin(url: str):
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    base = make_url(url).set(database="postgres")
    return sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)


@pytest.mark.postgres
def test_series_into_postgresql_with_two_receivers(tmp_path: Path, postgres_url: str) -> None:
    sent = make_ct_series(tmp_path / "in", 40, rows=128, cols=128)
    with running_node(tmp_path, database_url=postgres_url, processes=2) as node:
        out = storescu(node.port, sent)
        assert out.stderr.count("(Success)") == 40, out.stderr[-2000:]
        sessions = db(node)
        assert store.count_instances(sessions) == 40
        assert store.list_series(sessions)[0].instance_count == 40
        assert node.stop() == 0


@pytest.mark.postgres
def test_database_unreachable_refuses_then_recovers(tmp_path: Path, postgres_url: str) -> None:
    """Database down: 0xA701 (never success for what is not recorded); back up: success."""
    from sqlalchemy.engine import make_url

    first = make_instance(tmp_path / "a.dcm")
    second = make_instance(tmp_path / "b.dcm")
    name = make_url(postgres_url).database
    admin = _pg_admin(postgres_url)
    with running_node(tmp_path, database_url=postgres_url) as node:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE datname = '{name}'")
        try:
            out = storescu(node.port, [first])
            assert "Store Response (Success)" not in out.stderr, out.stderr
            assert "Refused: OutOfResources" in out.stderr, out.stderr
            assert "refused with 0xA701" in node.log_text()
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        out = storescu(node.port, [first, second])
        assert out.stderr.count("(Success)") == 2, out.stderr
        assert store.count_instances(db(node)) == 2
        assert node.stop() == 0
    admin.dispose()


def test_tls_storage(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """[dicom.tls]: dcmtk storescu over TLS stores; a plain-TCP caller gets nothing."""
    cert, key = tls_files
    sent = make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    extra = f'[dicom.tls]\ncert = "{cert}"\nkey = "{key}"\n'
    with running_node(tmp_path, extra=extra) as node:
        out = storescu(node.port, sent, extra=("+tla", "+cf", str(cert)))
        assert out.stderr.count("(Success)") == 3, out.stderr
        plain = storescu(node.port, sent[:1])
        assert "(Success)" not in plain.stderr
        assert store.count_instances(db(node)) == 3


def test_idle_tcp_probe_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    """A health-check style connection that never associates gets no drain grace."""
    import socket as _socket

    with running_node(tmp_path, extra="shutdown_grace = 60.0") as node:
        probe = _socket.create_connection(("127.0.0.1", node.port))
        try:
            assert echoscu(node.port).returncode == 0
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=20) == 0, "waited out the grace for a probe"
        finally:
            probe.close()
        assert "aborting" not in node.log_text()


def test_sigterm_lets_an_open_association_finish_within_grace(tmp_path: Path) -> None:
    sent = make_ct_series(tmp_path / "in", 80, rows=128, cols=128)
    with running_node(tmp_path, extra="shutdown_grace = 60.0") as node:
        sessions = db(node)
        sender = subprocess.Popen(
            [str(DCMTK / "storescu"), "-v", "-aec", "ICHTRIAGE", "127.0.0.1", str(node.port),
             *map(str, sent)], env=DCMTK_ENV, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while store.count_instances(sessions) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert node.stop() == 0
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err[-2000:]
        assert len(_acknowledged(err)) == 80, "the open association ran to completion"
        assert store.count_instances(sessions) == 80
        log = node.log_text()
        assert log.index("stopping") < log.index("released: stored="), "SIGTERM came mid-transfer"


def test_real_scanner_studies_as_a_scanner_sends_them(tmp_path: Path) -> None:
    """Real GE and Philips head CT (../shared/realdata): axial slices are triage candidates;
    the Philips scout and its 'Exam Summary' secondary captures are kept but not triaged;
    DICOMDIR/DIRFILE are not sent at all."""
    src = _realdata("headct_dcm_qa_ct")
    files = scu.collect_files([src / "GE", src / "Philips"])
    assert not any(p.name in ("DICOMDIR", "DIRFILE") for p in files)
    with running_node(tmp_path) as node:
        report = scu.send(files, "127.0.0.1", node.port, called_ae="ICHTRIAGE")
        assert report.sent == len(files), report.failed
        sessions = db(node)
        states: dict[str, list[str]] = {}
        for p in files:
            ds = dcmread(p, stop_before_pixels=True)
            rec = store.get_instance(sessions, ds.SOPInstanceUID)
            assert rec is not None, p
            key = "SC" if rec.sop_class_uid.endswith(".7") else (
                "scout" if "S1000" in p.parts else p.parent.name)
            states.setdefault(key, []).append(rec.state.value)
        assert states["GE"] == ["stored"] * 28
        assert states["S2010"] == ["stored"] * 28
        assert states["scout"] == ["not_for_triage"]
        assert states["SC"] and set(states["SC"]) == {"not_for_triage"}
        by_desc = {s.series_description: s for s in store.list_series(sessions)}
        assert by_desc["STD BRAIN 5MM"].state is SeriesState.RECEIVING
