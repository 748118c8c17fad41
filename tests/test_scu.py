"""Tests of triage_node.scu against real peers (dcmtk storescp, pynetdicom SCPs, raw
sockets) and against a fake association factory; plus tests of tests/dicomfiles.py."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomfiles import (
    MR_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    make_ct_series,
    make_instance,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from triage_node import scu
from triage_node.errors import (
    AssociationError,
    PermanentAssociationError,
    RetryableAssociationError,
)

STORESCP = Path("/usr/bin/storescp")
DCIODVFY = Path("/usr/bin/dciodvfy")
REALDATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

needs_storescp = pytest.mark.skipif(
    not STORESCP.exists(), reason="dcmtk storescp not installed at /usr/bin/storescp"
)
needs_dciodvfy = pytest.mark.skipif(
    not DCIODVFY.exists(), reason="dicom3tools dciodvfy not installed at /usr/bin/dciodvfy"
)


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None, limit: float = 10.0) -> None:
    """Poll until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port} after {limit} s")


@dataclass
class StoreSCP:
    """A running dcmtk storescp."""

    port: int
    out_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start ``/usr/bin/storescp`` with extra options; stopped at teardown."""
    started: list[StoreSCP] = []

    def start(*options: str) -> StoreSCP:
        out_dir = tmp_path / f"storescp{len(started)}"
        out_dir.mkdir()
        log = tmp_path / f"storescp{len(started)}.log"
        for _attempt in range(3):  # the free port may be taken in between: try another
            port = free_port()
            with log.open("wb") as log_fp:
                proc = subprocess.Popen(
                    [
                        str(STORESCP),
                        "--output-directory",
                        str(out_dir),
                        "--max-pdu",
                        "131072",
                        "--unique-filenames",
                        *options,
                        str(port),
                    ],
                    stdout=log_fp,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
            scp = StoreSCP(port, out_dir, proc, log)
            started.append(scp)
            try:
                wait_listening(port, proc)
            except RuntimeError:
                continue
            return scp
        raise RuntimeError(f"storescp did not start: {log.read_text(errors='replace')}")

    yield start
    for scp in started:
        if scp.proc.poll() is None:
            scp.proc.terminate()
            try:
                scp.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                scp.proc.kill()
                scp.proc.wait()


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """Start an in-process pynetdicom storage SCP; returns its port."""
    servers: list[ThreadedAssociationServer] = []

    def start(
        on_store: Callable[[Event], Any] | None = None,
        configure: Callable[[AE], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        ae = AE(ae_title="PYNETDICOM")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        if configure:
            configure(ae)
        handlers: list[Any] = [(evt.EVT_C_STORE, on_store)] if on_store else []
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        assert server is not None
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()


class RawPeer:
    """A TCP peer that answers every association request with fixed bytes (or nothing)."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            if self.answer is not None:
                conn.settimeout(2)
                try:
                    header = conn.recv(6)
                    remaining = int.from_bytes(header[2:6], "big")
                    while remaining > 0:
                        chunk = conn.recv(min(remaining, 65536))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def raw_peer() -> Iterator[Callable[[bytes | None], RawPeer]]:
    peers: list[RawPeer] = []

    def start(answer: bytes | None) -> RawPeer:
        peer = RawPeer(answer)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, result, source, reason])


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    ds = dcmread(path, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[meta_end:]


def comparable(ds: Dataset) -> Dataset:
    """``ds`` without group lengths (gggg,0000), which re-encoding legitimately changes."""
    for tag in [elem.tag for elem in ds if elem.tag.element == 0x0000]:
        del ds[tag]
    return ds


def assert_all_received(sent: list[Path], received: list[Path]) -> dict[Path, Dataset]:
    """Every sent file has a received counterpart with an equal dataset (file meta aside,
    group lengths ignored); returns the pairs."""
    pool = [comparable(dcmread(p)) for p in received]
    pairs: dict[Path, Dataset] = {}
    for path in sent:
        original = comparable(dcmread(path))
        match = next((ds for ds in pool if ds == original), None)
        assert match is not None, f"{path.name} did not arrive intact"
        pool.remove(match)
        pairs[path] = match
    return pairs


# ---------------------------------------------------------------------------------- echo


@needs_storescp
@pytest.mark.dcmtk
def test_echo_round_trip(storescp: Callable[..., StoreSCP]) -> None:
    scp = storescp()
    seconds = scu.echo("127.0.0.1", scp.port, called_ae="STORESCP", timeout=5)
    assert 0 < seconds < 5


def test_echo_closed_port_is_retryable() -> None:
    with pytest.raises(RetryableAssociationError, match="cannot connect"):
        scu.echo("127.0.0.1", free_port(), timeout=5)


def test_echo_unresolvable_host() -> None:
    with pytest.raises(AssociationError, match="cannot resolve host"):
        scu.echo("no-such-host.invalid", 104, timeout=5)


@pytest.mark.parametrize(
    ("configure", "reason"),
    [
        (lambda ae: setattr(ae, "require_calling_aet", ["KNOWN-SCU"]), "calling AE title"),
        (lambda ae: setattr(ae, "require_called_aet", True), "called AE title"),
    ],
    ids=["calling-ae", "called-ae"],
)
def test_echo_rejected_permanently_names_the_reason(
    pynetdicom_scp: Callable[..., int], configure: Callable[[AE], None], reason: str
) -> None:
    port = pynetdicom_scp(configure=configure)
    with pytest.raises(PermanentAssociationError) as info:
        scu.echo("127.0.0.1", port, called_ae="SOMEONE-ELSE", timeout=5)
    message = str(info.value)
    assert "rejected-permanent" in message
    assert f"{reason} not recognised" in message


def test_echo_accepted_when_ae_titles_match(pynetdicom_scp: Callable[..., int]) -> None:
    def configure(ae: AE) -> None:
        ae.require_calling_aet = ["KNOWN-SCU"]
        ae.require_called_aet = True

    port = pynetdicom_scp(configure=configure)
    assert scu.echo("127.0.0.1", port, called_ae="PYNETDICOM", calling_ae="KNOWN-SCU") > 0


def test_transient_rejection_is_retryable(raw_peer: Callable[[bytes | None], RawPeer]) -> None:
    peer = raw_peer(associate_rj(result=2, source=3, reason=1))
    with pytest.raises(RetryableAssociationError) as info:
        scu.echo("127.0.0.1", peer.port, timeout=5)
    assert "rejected-transient" in str(info.value)
    assert "temporary congestion" in str(info.value)


def test_silent_peer_times_out_as_retryable(raw_peer: Callable[[bytes | None], RawPeer]) -> None:
    peer = raw_peer(None)
    start = time.monotonic()
    with pytest.raises(RetryableAssociationError, match=r"did not answer within 0\.5 s"):
        scu.echo("127.0.0.1", peer.port, timeout=0.5)
    assert time.monotonic() - start < 5


@needs_storescp
@pytest.mark.dcmtk
def test_storescp_refusing_is_permanent(storescp: Callable[..., StoreSCP]) -> None:
    scp = storescp("--refuse")
    with pytest.raises(PermanentAssociationError, match=r"rejected-permanent.*no reason given"):
        scu.echo("127.0.0.1", scp.port, timeout=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"host": ""}, ValueError, "host"),
        ({"port": 0}, ValueError, "port"),
        ({"port": "104"}, TypeError, "port"),
        ({"called_ae": "A" * 17}, ValueError, "called_ae"),
        ({"calling_ae": "   "}, ValueError, "calling_ae"),
        ({"calling_ae": "BAD\\AE"}, ValueError, "calling_ae"),
        ({"timeout": 0}, ValueError, "timeout"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], error: type, argument: str) -> None:
    call: dict[str, Any] = {"host": "127.0.0.1", "port": 104, **kwargs}
    with pytest.raises(error, match=argument):
        scu.echo(**call)
    with pytest.raises(error, match=argument):
        scu.send([], **call)


def test_echo_and_send_over_tls(
    pynetdicom_scp: Callable[..., int], tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    stored: list[str] = []

    def on_store(event: Event) -> int:
        stored.append(event.dataset.SOPInstanceUID)
        return 0x0000

    port = pynetdicom_scp(on_store=on_store, ssl_context=server_context)
    client_context = ssl.create_default_context(cafile=str(cert))
    files = make_ct_series(tmp_path / "s", 2, rows=32, cols=32)

    assert scu.echo("127.0.0.1", port, ssl_context=client_context, timeout=5) > 0
    report = scu.send(files, "127.0.0.1", port, ssl_context=client_context, timeout=5)
    assert (report.sent, report.failed, len(stored)) == (2, (), 2)

    untrusting = ssl.create_default_context()  # does not know our self-signed CA
    with pytest.raises(RetryableAssociationError, match="TLS handshake failed"):
        scu.echo("127.0.0.1", port, ssl_context=untrusting, timeout=5)


# ---------------------------------------------------------------------- send to storescp


@needs_storescp
@pytest.mark.dcmtk
def test_send_series_arrives_bit_for_bit(
    storescp: Callable[..., StoreSCP], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = storescp("+xa", "--bit-preserving")
    files = make_ct_series(tmp_path / "series", 20)  # 512x512: several PDUs per file
    caplog.set_level(logging.INFO, logger="triage_node.scu")

    report = scu.send(files, "127.0.0.1", scp.port, called_ae="STORESCP", timeout=10)

    assert report.sent == 20
    assert report.failed == ()
    assert report.warnings == ()
    assert report.ok
    assert report.seconds > 0
    received = scp.received()
    assert len(received) == 20
    pairs = assert_all_received(files, received)
    for ds in pairs.values():
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Streamed unchanged from disk: the encoded dataset is byte-identical.
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(path)
    # One line per association, and never the patient's name.
    lines = [r.getMessage() for r in caplog.records if r.name == "triage_node.scu"]
    assert sum("association with STORESCP@127.0.0.1" in line for line in lines) == 1
    assert not any("PHANTOM" in line for line in lines)


@needs_storescp
@pytest.mark.dcmtk
def test_send_converts_uncompressed_transfer_syntax(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp("--implicit")  # accepts implicit VR little endian only
    files = make_ct_series(tmp_path / "explicit", 3, rows=64, cols=64)

    report = scu.send(files, "127.0.0.1", scp.port, timeout=10)

    assert (report.sent, report.failed) == (3, ())
    pairs = assert_all_received(files, scp.received())
    assert {ds.file_meta.TransferSyntaxUID for ds in pairs.values()} == {ImplicitVRLittleEndian}


@needs_storescp
@pytest.mark.dcmtk
def test_send_compressed_pydicom_test_files(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    names = ["JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm"]
    files = [Path(p) for n in names if (p := get_testdata_file(n, download=False))]
    if len(files) < 2:
        pytest.skip("pydicom's bundled compressed test files are missing")
    scp = storescp("+xa", "--bit-preserving")

    report = scu.send(files, "127.0.0.1", scp.port, timeout=10)

    assert report.failed == ()
    assert report.sent == len(files)
    pairs = assert_all_received(files, scp.received())
    for path, ds in pairs.items():
        sent_syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ds.file_meta.TransferSyntaxUID == sent_syntax
        assert sent_syntax.is_compressed


@needs_storescp
@pytest.mark.dcmtk
def test_compressed_file_fails_alone_when_its_syntax_is_refused(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp()  # default: uncompressed transfer syntaxes only
    j2k = make_instance(tmp_path / "j2k.dcm", transfer_syntax=JPEG2000Lossless)
    plain = make_ct_series(tmp_path / "plain", 2, rows=64, cols=64)

    report = scu.send([j2k, *plain], "127.0.0.1", scp.port, timeout=10)

    assert report.sent == 2
    assert [f.path for f in report.failed] == [j2k]
    failure = report.failed[0]
    assert failure.status is None
    assert not failure.retryable
    assert "JPEG 2000" in failure.reason
    assert "transfer syntax(es) not supported" in failure.reason
    assert len(scp.received()) == 2


@needs_storescp
@pytest.mark.dcmtk
def test_send_folder_skips_dicomdir_and_text(
    storescp: Callable[..., StoreSCP], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cd"
    files = make_ct_series(folder / "series", 4, rows=64, cols=64)
    dicomdir = get_testdata_file("DICOMDIR", download=False)
    assert dicomdir is not None
    shutil.copy(dicomdir, folder / "DICOMDIR")
    shutil.copy(dicomdir, folder / "series" / "DIRFILE")  # a directory file by another name
    (folder / "README.txt").write_text("not DICOM\n")
    scp = storescp()
    caplog.set_level(logging.INFO, logger="triage_node.scu")

    collected = scu.collect_files([folder])
    report = scu.send(collected, "127.0.0.1", scp.port, timeout=10)

    assert collected == files
    assert (report.sent, report.failed) == (4, ())
    assert len(scp.received()) == 4
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert any("DICOMDIR" in m and m.endswith("not an instance") for m in skipped)
    assert any("DIRFILE" in m for m in skipped)
    assert any("README.txt" in m and "not a DICOM Part 10 file" in m for m in skipped)
    assert all(r.levelno == logging.INFO for r in caplog.records if "skipping" in r.getMessage())


@needs_storescp
@pytest.mark.dcmtk
def test_send_to_refusing_storescp_raises_permanent(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp("--refuse")
    files = make_ct_series(tmp_path / "s", 2, rows=64, cols=64)
    with pytest.raises(PermanentAssociationError, match="rejected-permanent"):
        scu.send(files, "127.0.0.1", scp.port, timeout=10)


def test_send_to_closed_port_raises_retryable(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 2, rows=64, cols=64)
    with pytest.raises(RetryableAssociationError, match="cannot connect"):
        scu.send(files, "127.0.0.1", free_port(), timeout=5)


@needs_storescp
@pytest.mark.dcmtk
def test_storescp_abort_reports_remaining_files_retryable(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp("--abort-after")  # aborts on receipt of the first C-STORE-RQ
    files = make_ct_series(tmp_path / "s", 3, rows=64, cols=64)

    report = scu.send(files, "127.0.0.1", scp.port, timeout=10)

    assert report.sent == 0
    assert [f.path for f in report.failed] == files
    assert all(f.retryable and f.status is None for f in report.failed)
    assert all("aborted" in f.reason for f in report.failed)


@needs_storescp
@pytest.mark.dcmtk
def test_real_transfer_syntaxes_arrive_intact(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    folder = REALDATA / "ts_cornerstone"
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder}")
    files = scu.collect_files([folder])
    scp = storescp("+xa", "--bit-preserving")

    report = scu.send(files, "127.0.0.1", scp.port, timeout=10)

    # dcmtk 3.6.7 does not accept the retired JPEG processes (.53, .55) nor JPEG
    # lossless process 14 (.57) even with +xa; each fails alone with the reason.
    refused = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55", "1.2.840.10008.1.2.4.57"}
    for failure in report.failed:
        syntax = dcmread(failure.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax in refused, failure
        assert "transfer syntax(es) not supported" in failure.reason
    delivered = [p for p in files if p not in {f.path for f in report.failed}]
    assert report.sent == len(delivered) >= len(files) - len(refused)
    names = {p.name for p in delivered}
    assert any("Deflated" in n for n in names)  # odd-length deflated data: re-encoded
    assert any("BigEndian" in n for n in names)
    assert_all_received(delivered, scp.received())


# ----------------------------------------------------------- send to pynetdicom SCPs


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(0xA700, True), (0xC001, False), (0xA900, False)],
    ids=["A700-out-of-resources", "C001-cannot-understand", "A900-sop-class-mismatch"],
)
def test_failure_status_is_reported(
    pynetdicom_scp: Callable[..., int], tmp_path: Path, status: int, retryable: bool
) -> None:
    port = pynetdicom_scp(on_store=lambda event: status)
    files = make_ct_series(tmp_path / "s", 3, rows=64, cols=64)

    report = scu.send(files, "127.0.0.1", port, timeout=10)

    assert report.sent == 0
    assert [f.path for f in report.failed] == files
    assert {f.status for f in report.failed} == {status}
    assert all(f"0x{status:04X}" in f.reason for f in report.failed)
    assert all(f.retryable is retryable for f in report.failed)


def test_warning_status_counts_as_sent(pynetdicom_scp: Callable[..., int], tmp_path: Path) -> None:
    def on_store(event: Event) -> Dataset:
        status = Dataset()
        status.Status = 0xB000 if event.request.MessageID == 2 else 0x0000
        status.ErrorComment = "coerced PatientID"
        return status

    port = pynetdicom_scp(on_store=on_store)
    files = make_ct_series(tmp_path / "s", 3, rows=64, cols=64)

    report = scu.send(files, "127.0.0.1", port, timeout=10)

    assert (report.sent, report.failed) == (3, ())
    assert [(w.path, w.status) for w in report.warnings] == [(files[1], 0xB000)]
    assert "Coercion of Data Elements" in report.warnings[0].reason
    assert "coerced PatientID" in report.warnings[0].reason


def test_peer_aborting_mid_send_reports_what_went_through(
    pynetdicom_scp: Callable[..., int], tmp_path: Path
) -> None:
    stored: list[str] = []

    def on_store(event: Event) -> int:
        if len(stored) == 2:
            event.assoc.abort()
            return 0xA700
        stored.append(event.dataset.SOPInstanceUID)
        return 0x0000

    port = pynetdicom_scp(on_store=on_store)
    files = make_ct_series(tmp_path / "s", 5, rows=64, cols=64)

    report = scu.send(files, "127.0.0.1", port, timeout=10)

    assert report.sent == 2
    assert [f.path for f in report.failed] == files[2:]
    assert all(f.retryable and f.status is None for f in report.failed)
    assert len(stored) == 2


def test_sop_class_the_peer_does_not_support(
    pynetdicom_scp: Callable[..., int], tmp_path: Path
) -> None:
    def configure(ae: AE) -> None:
        ae.supported_contexts = []
        ae.add_supported_context(CT_IMAGE_STORAGE)

    port = pynetdicom_scp(on_store=lambda event: 0x0000, configure=configure)
    ct = make_ct_series(tmp_path / "ct", 2, rows=64, cols=64)
    mr = make_instance(tmp_path / "mr.dcm", kind="mr")

    report = scu.send([*ct, mr], "127.0.0.1", port, timeout=10)

    assert report.sent == 2
    assert [f.path for f in report.failed] == [mr]
    assert "MR Image Storage" in report.failed[0].reason
    assert "abstract syntax not supported" in report.failed[0].reason

    with pytest.raises(PermanentAssociationError, match="none of the 1 proposed"):
        scu.send([mr], "127.0.0.1", port, timeout=10)


# --------------------------------------------------------------- fake association factory


@dataclass
class FakeAssociation:
    """Accepts contexts per ``choose`` and answers C-STOREs from ``statuses``."""

    request: scu.AssociationRequest
    choose: Callable[[scu.ProposedContext], str | None]
    statuses: list[int] = field(default_factory=list)
    lose_after: int | None = None
    is_established: bool = True
    stored: list[str | Path | Dataset] = field(default_factory=list)
    released: bool = False
    aborted: bool = False
    accepted_contexts: list[PresentationContext] = field(default_factory=list)
    rejected_contexts: list[PresentationContext] = field(default_factory=list)

    def __post_init__(self) -> None:
        for index, proposed in enumerate(self.request.contexts):
            syntax = self.choose(proposed)
            cx = build_context(proposed.abstract_syntax, [syntax or ImplicitVRLittleEndian])
            cx.context_id = 2 * index + 1
            cx.result = 0x00 if syntax else 0x03
            (self.accepted_contexts if syntax else self.rejected_contexts).append(cx)

    def send_c_store(self, dataset: str | Path | Dataset, msg_id: int = 1) -> Dataset:
        if self.lose_after is not None and len(self.stored) >= self.lose_after:
            self.is_established = False
            return Dataset()
        self.stored.append(dataset)
        status = Dataset()
        status.Status = self.statuses.pop(0) if self.statuses else 0x0000
        return status

    def release(self) -> None:
        self.released, self.is_established = True, False

    def abort(self) -> None:
        self.aborted, self.is_established = True, False


@dataclass
class FakeFactory:
    """Records requests; makes FakeAssociations, or raises the queued errors."""

    choose: Callable[[scu.ProposedContext], str | None] = lambda cx: cx.transfer_syntaxes[0]
    errors: dict[int, Exception] = field(default_factory=dict)
    lose_after: int | None = None
    statuses: list[int] = field(default_factory=list)
    requests: list[scu.AssociationRequest] = field(default_factory=list)
    associations: list[FakeAssociation] = field(default_factory=list)

    def __call__(self, request: scu.AssociationRequest) -> FakeAssociation:
        self.requests.append(request)
        if len(self.requests) - 1 in self.errors:
            raise self.errors[len(self.requests) - 1]
        assoc = FakeAssociation(request, self.choose, self.statuses, self.lose_after)
        self.associations.append(assoc)
        return assoc


def send_fake(paths: list[Path], factory: FakeFactory) -> scu.SendReport:
    return scu.send(paths, "pacs.example", 11112, called_ae="PACS", assoc_factory=factory)


def test_fake_one_context_per_pair_with_fallbacks(tmp_path: Path) -> None:
    explicit = make_ct_series(tmp_path / "e", 2, rows=16, cols=16)
    implicit = make_instance(tmp_path / "i.dcm", transfer_syntax=ImplicitVRLittleEndian)
    big = make_instance(tmp_path / "b.dcm", transfer_syntax=ExplicitVRBigEndian)
    rle = make_instance(tmp_path / "r.dcm", transfer_syntax=RLELossless)
    sc = make_instance(tmp_path / "sc.dcm", kind="sc")
    factory = FakeFactory()

    report = send_fake([*explicit, implicit, big, rle, sc], factory)

    assert (report.sent, report.failed) == (6, ())
    [request] = factory.requests
    assert request.peer == "PACS@pacs.example:11112"
    assert request.calling_ae == "TRIAGE-SCU"
    assert request.contexts == (
        scu.ProposedContext(CT_IMAGE_STORAGE, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        scu.ProposedContext(CT_IMAGE_STORAGE, (ImplicitVRLittleEndian, ExplicitVRLittleEndian)),
        scu.ProposedContext(CT_IMAGE_STORAGE, (ExplicitVRBigEndian,)),
        scu.ProposedContext(CT_IMAGE_STORAGE, (RLELossless,)),
        scu.ProposedContext(
            SECONDARY_CAPTURE_IMAGE_STORAGE, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        ),
    )
    [assoc] = factory.associations
    assert assoc.stored == [*explicit, implicit, big, rle, sc]  # paths: streamed, in order
    assert assoc.released and not assoc.aborted


def test_fake_conversion_only_for_uncompressed(tmp_path: Path) -> None:
    explicit = make_instance(tmp_path / "e.dcm")
    rle = make_instance(tmp_path / "r.dcm", transfer_syntax=RLELossless)
    # The peer picks implicit VR for everything it can, and takes RLE as implicit too.
    factory = FakeFactory(choose=lambda cx: ImplicitVRLittleEndian)

    report = send_fake([explicit, rle], factory)

    assert report.sent == 1
    [assoc] = factory.associations
    [converted] = assoc.stored
    assert isinstance(converted, Dataset)  # decoded for pynetdicom to re-encode
    assert converted.SOPInstanceUID == dcmread(explicit).SOPInstanceUID
    [failure] = report.failed
    assert failure.path == rle
    assert "RLE Lossless" in failure.reason and "not converted" in failure.reason


def test_fake_more_than_128_contexts_split_associations(tmp_path: Path) -> None:
    files = [
        make_instance(tmp_path / f"{i}.dcm", rows=8, cols=8, SOPClassUID=f"1.2.826.0.1.99.{i}")
        for i in range(130)
    ]
    factory = FakeFactory()

    report = send_fake(files, factory)

    assert report.sent == 130
    assert [len(r.contexts) for r in factory.requests] == [128, 2]
    assert [len(a.stored) for a in factory.associations] == [128, 2]
    assert all(a.released for a in factory.associations)


def test_fake_second_association_unreachable_is_reported_not_raised(tmp_path: Path) -> None:
    files = [
        make_instance(tmp_path / f"{i}.dcm", rows=8, cols=8, SOPClassUID=f"1.2.826.0.1.99.{i}")
        for i in range(130)
    ]
    factory = FakeFactory(errors={1: RetryableAssociationError("peer went away")})

    report = send_fake(files, factory)

    assert report.sent == 128
    assert [f.path for f in report.failed] == files[128:]
    assert all(f.retryable and f.reason == "peer went away" for f in report.failed)


def test_fake_first_association_failure_raises(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 2, rows=16, cols=16)
    factory = FakeFactory(errors={0: PermanentAssociationError("unknown AE")})
    with pytest.raises(PermanentAssociationError, match="unknown AE"):
        send_fake(files, factory)


def test_fake_lost_association_fails_the_rest(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 5, rows=16, cols=16)
    factory = FakeFactory(lose_after=3)

    report = send_fake(files, factory)

    assert report.sent == 3
    assert [f.path for f in report.failed] == files[3:]
    assert all(f.retryable and "aborted" in f.reason for f in report.failed)
    assert not factory.associations[0].released


def test_fake_statuses(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 5, rows=16, cols=16)
    factory = FakeFactory(statuses=[0x0000, 0xB007, 0xB006, 0x0117, 0xFE00])

    report = send_fake(files, factory)

    assert report.sent == 3
    assert [(w.path, w.status) for w in report.warnings] == [(files[1], 0xB007), (files[2], 0xB006)]
    assert [(f.path, f.status) for f in report.failed] == [(files[3], 0x0117), (files[4], 0xFE00)]
    assert "0x0117" in report.failed[0].reason
    assert "0xFE00" in report.failed[1].reason


def test_fake_unreadable_files_fail_without_an_association(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    missing = tmp_path / "gone.dcm"
    factory = FakeFactory()

    report = send_fake([text, missing], factory)

    assert report.sent == 0
    assert {f.path: f.reason for f in report.failed} == {
        text: "not a DICOM Part 10 file (no DICM prefix)",
        missing: f"no such file: {missing}",
    }
    assert factory.requests == []
    nothing = send_fake([], factory)
    assert (nothing.sent, nothing.failed, factory.requests) == (0, (), [])


def test_send_rejects_a_single_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence of paths"):
        scu.send(tmp_path, "127.0.0.1", 104)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- collect_files


def test_collect_files_order_dedup_and_missing(tmp_path: Path) -> None:
    b = make_ct_series(tmp_path / "b", 2, rows=8, cols=8)
    a = make_ct_series(tmp_path / "a" / "deep", 2, rows=8, cols=8)
    single = make_instance(tmp_path / "z.dcm", rows=8, cols=8)
    no_preamble = tmp_path / "a" / "raw.dcm"
    ds = dcmread(single)
    ds.file_meta = FileMetaDataset()  # a bare dataset: no preamble, no DICM, no file meta
    ds.save_as(no_preamble, implicit_vr=True, little_endian=True)
    assert dcmread(no_preamble, force=True).SOPInstanceUID == ds.SOPInstanceUID

    assert scu.collect_files([tmp_path]) == [*a, *b, single]
    assert scu.collect_files([single, tmp_path / "b", b[0]]) == [single, *b]
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        scu.collect_files([tmp_path / "nope"])


# ------------------------------------------------------------------- tests/dicomfiles.py


def test_ct_series_headers(tmp_path: Path) -> None:
    files = make_ct_series(
        tmp_path, 4, rows=32, cols=48, study_uid="1.2.3.4", patient_id="P-9", seed=3
    )
    datasets = [dcmread(p) for p in files]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4]
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [0.0, 5.0, 10.0, 15.0]
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    first = datasets[0]
    assert first.SOPClassUID == CT_IMAGE_STORAGE
    assert first.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (first.Rows, first.Columns) == (32, 48)
    assert first.Modality == "CT" and first.PatientID == "P-9"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert first.BodyPartExamined == "HEAD"
    assert (first.StudyDescription, first.SeriesDescription) == ("CT HEAD", "HEAD 5mm")
    assert float(first.SliceThickness) == 5.0 and len(first.PixelSpacing) == 2
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    assert first.PatientName and first.AccessionNumber and first.StudyDate


def test_ct_series_pixels_are_head_like_and_seeded(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "a", 3, rows=64, cols=64, seed=7)
    again = make_ct_series(tmp_path / "b", 3, rows=64, cols=64, seed=7)
    other = make_ct_series(tmp_path / "c", 3, rows=64, cols=64, seed=8)
    pixels = [dcmread(p).pixel_array for p in files]
    assert pixels[0].dtype == np.int16
    hu = pixels[0].astype(np.int32) - 1024
    assert hu[0, 0] < -900  # air in the corner
    assert -100 < np.median(hu[28:36, 28:36]) < 100  # brain in the middle
    assert hu.max() > 700  # skull
    assert not np.array_equal(pixels[0], pixels[1])
    assert np.array_equal(pixels[1], dcmread(again[1]).pixel_array)
    assert not np.array_equal(pixels[1], dcmread(other[1]).pixel_array)


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEG2000Lossless]
)
def test_ct_series_transfer_syntaxes_keep_pixels(tmp_path: Path, syntax: str) -> None:
    [reference] = make_ct_series(tmp_path / "ref", 1, rows=32, cols=32)
    [encoded] = make_ct_series(tmp_path / "enc", 1, rows=32, cols=32, transfer_syntax=syntax)
    ds = dcmread(encoded)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, dcmread(reference).pixel_array)


def test_make_instance_kinds_and_hostile_uids(tmp_path: Path) -> None:
    localizer = dcmread(make_instance(tmp_path / "l.dcm", kind="localizer"))
    assert list(localizer.ImageType)[-1] == "LOCALIZER"
    sc = dcmread(make_instance(tmp_path / "sc.dcm", kind="sc"))
    assert (sc.SOPClassUID, sc.Modality) == (SECONDARY_CAPTURE_IMAGE_STORAGE, "OT")
    assert sc.file_meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    mr = dcmread(make_instance(tmp_path / "mr.dcm", kind="mr"))
    assert (mr.SOPClassUID, mr.Modality) == (MR_IMAGE_STORAGE, "MR")

    hostile = dcmread(
        make_instance(
            tmp_path / "h.dcm",
            SOPInstanceUID="../../x",
            SeriesInstanceUID="1.2/3",
            AccessionNumber=None,
        )
    )
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # written as given
        assert hostile.SOPInstanceUID == "../../x"
        assert hostile.file_meta.MediaStorageSOPInstanceUID == "../../x"
        assert hostile.SeriesInstanceUID == "1.2/3"
    assert "AccessionNumber" not in hostile


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@needs_dciodvfy
@pytest.mark.dcmtk
def test_ct_file_passes_dciodvfy(tmp_path: Path) -> None:
    [path] = make_ct_series(tmp_path, 1)
    assert _dciodvfy_errors(path) == []


@needs_dciodvfy
@pytest.mark.dcmtk
@pytest.mark.parametrize("kind", ["localizer", "sc", "mr"])
def test_instance_kinds_pass_dciodvfy(tmp_path: Path, kind: Any) -> None:
    assert _dciodvfy_errors(make_instance(tmp_path / f"{kind}.dcm", kind=kind)) == []


def test_uid_is_valid_for_generated_files(tmp_path: Path) -> None:
    [path] = make_ct_series(tmp_path, 1, rows=8, cols=8)
    ds = dcmread(path)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert UID(ds[keyword].value).is_valid
