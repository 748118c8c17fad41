"""The receive loop's protocol edges, against a real node process, for both engines.

``tests/test_scp.py`` runs the store path (dcmtk, TLS, compressed syntaxes, SIGTERM) with
each engine; here: association negotiation limits, timeouts, aborts, odd peers and broken
PDUs. Unit checks of the hand-made command set codec come first.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from io import BytesIO
from pathlib import Path

import nodeproc
import pytest
from dicomfiles import make_ct_series, make_instance
from markers import needs_dcmtk
from nodeproc import NodeProc, echoscu, running_node, storescu
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from triage_node import scp, store
from triage_node.config import load_config
from triage_node.domain import EventKind
from triage_node.spool import Spool
from triage_node.ulserver import (
    WRITEBACK_BYTES,
    decode_command,
    encode_response,
    file_meta_bytes,
)

pytestmark = needs_dcmtk


@pytest.fixture(params=["native", "pynetdicom"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The receive loop under test (``[dicom] engine``)."""
    monkeypatch.setattr(nodeproc, "ENGINE", request.param)
    return str(request.param)


def db(node: NodeProc):
    return store.make_session_factory(store.make_engine(node.database_url))


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- codec


def test_response_round_trips_through_pydicom() -> None:
    from io import BytesIO

    from pynetdicom.dsutils import decode

    raw = encode_response(0x8001, 7, 0xA700, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45")
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert ds.AffectedSOPInstanceUID == "1.2.3.45" and ds.CommandDataSetType == 0x0101
    cmd = decode_command(raw)
    assert struct.unpack("<H", cmd[0x0900])[0] == 0xA700


def test_decode_command_refuses_overrun() -> None:
    raw = encode_response(0x8030, 1, 0)
    with pytest.raises(ValueError, match="malformed"):
        decode_command(raw[:-1])


def test_file_meta_is_what_pynetdicom_writes() -> None:
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    fp = BytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=CTImageStorage, sop_instance_uid="1.2.3",
        transfer_syntax="1.2.840.10008.1.2.1"))
    assert file_meta_bytes(CTImageStorage, "1.2.3", "1.2.840.10008.1.2.1") == fp.getvalue()


# ----------------------------------------------------------------------------- negotiation


def test_require_called_ae(tmp_path: Path, engine: str) -> None:
    with running_node(tmp_path, extra="require_called_ae = true") as node:
        bad = echoscu(node.port, called="SOMEONE")
        assert bad.returncode != 0
        assert "Called AE Title Not Recognized" in bad.stderr, bad.stderr
        assert echoscu(node.port).returncode == 0
        node.stop()
        events = store.list_events(db(node), kinds=[EventKind.ASSOCIATION_REJECTED])
        assert [e.actor for e in events] == ["ECHOSCU"]


def test_max_associations(tmp_path: Path, engine: str) -> None:
    # pynetdicom counts a bare TCP connection (the readiness probe) against the limit until
    # its ACSE timeout; a short one lets the probe expire.
    with running_node(tmp_path, extra="max_associations = 1\nacse_timeout = 2.0") as node:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        holder = []

        def associated() -> bool:
            holder.append(ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE"))
            return bool(holder[-1].is_established)

        assert wait_for(associated)
        held = holder[-1]
        try:
            out = echoscu(node.port)
            assert out.returncode != 0
            assert "Local Limit Exceeded" in out.stderr, out.stderr
        finally:
            held.release()
        assert wait_for(lambda: echoscu(node.port).returncode == 0)


def test_no_acceptable_context_is_accepted_empty(tmp_path: Path, engine: str) -> None:
    """As pynetdicom does: A-ASSOCIATE-AC with every context rejected (pynetdicom as the
    requestor then aborts); the node keeps serving."""
    with running_node(tmp_path) as node:
        ae = AE(ae_title="FINDER")
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert not assoc.is_established
        assert assoc.acceptor.primitive is not None and assoc.acceptor.primitive.result == 0
        assert [cx.result for cx in assoc.acceptor.primitive.presentation_context_definition_results_list] == [0x03]  # noqa: E501
        assert wait_for(lambda: "FINDER@127.0.0.1 aborted" in node.log_text())
        assert echoscu(node.port).returncode == 0


# ----------------------------------------------------------------------------- odd peers


def test_pynetdicom_scu_with_small_pdu(tmp_path: Path, engine: str) -> None:
    """pynetdicom as SCU, receiving at most 4 KiB PDUs, explicit VR; the node receives
    4 KiB PDUs too (many fragments per slice): stored dataset-equal, C-ECHO answered."""
    sent = make_ct_series(tmp_path / "in", 4, rows=128, cols=128)
    with running_node(tmp_path, extra="max_pdu_size = 4096") as node:
        ae = AE(ae_title="PYSCU")
        ae.maximum_pdu_size = 4096
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 4096
        for p in sent:
            rsp = assoc.send_c_store(dcmread(p))
            assert rsp.Status == 0
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        sessions = db(node)
        for p in sent:
            ds = dcmread(p)
            rec = store.get_instance(sessions, ds.SOPInstanceUID)
            assert rec is not None and rec.transfer_syntax_uid == "1.2.840.10008.1.2.1"
            assert dcmread(node.spool / rec.file_path) == ds


def test_storescu_with_small_pdus(tmp_path: Path, engine: str) -> None:
    sent = make_ct_series(tmp_path / "in", 3, rows=64, cols=64)
    with running_node(tmp_path, extra="max_pdu_size = 4096") as node:
        out = storescu(node.port, sent, extra=("--max-pdu", "4096"))
        assert out.stderr.count("(Success)") == 3, out.stderr[-2000:]
        assert store.count_instances(db(node)) == 3


def _in_process_native_node(tmp_path: Path) -> scp.RunningSCP:
    """A native-engine receiving server in this process (SQLite ``node.db`` and ``spool``
    in ``tmp_path``), on a free port: the caller stops it."""
    config = load_config(nodeproc.write_config(
        tmp_path / "config.toml", port=0, spool=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path / 'node.db'}", extra='engine = "native"'))
    scp.prepare(config)
    return scp.serve_scp(config, port=0)


@pytest.mark.parametrize("failure", ["fsync fails", "a bug"])
def test_staged_record_commits_after_the_rename_or_not_at_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """In-process node, dcmtk storescu as the peer. From the second slice of a series on,
    the record is written before the file's fsync (staged) and committed only once the
    file has its name: the commit finds the file in place. When the fsync fails (0xA700),
    or anything unforeseen is raised there (0xC211), the staged record is rolled back
    (nothing recorded) and the writer is free again: the next slice is stored as usual."""
    from triage_node.errors import SpoolError
    from triage_node.ingest import Recorder
    from triage_node.store.repository import StagedBatch

    sent = make_ct_series(tmp_path / "in", 4, rows=64, cols=64)
    running = _in_process_native_node(tmp_path)
    spool_root = running.scp.spool.root
    staged: list[bool] = []
    in_place_at_commit: list[bool] = []
    real_stage, real_commit, real_sync = Recorder.stage, StagedBatch.commit, Spool.sync

    def stage(self: Recorder, instance, events=()):  # type: ignore[no-untyped-def]
        result = real_stage(self, instance, events)
        staged.append(result is not None)
        if result is not None:
            assert not (spool_root / instance.file_path).exists(), "staged before the rename"
        return result

    def commit(self: StagedBatch) -> list[bool]:
        paths = [p for p in spool_root.rglob("*.dcm") if ".incoming" not in p.parts]
        in_place_at_commit.append(len(paths))
        return real_commit(self)

    def sync(self: Spool, tmp: Path) -> None:
        if len(staged) == 3:  # the third slice's file cannot be synced
            raise SpoolError("I/O error") if failure == "fsync fails" else RuntimeError("bug")
        real_sync(self, tmp)

    monkeypatch.setattr(Recorder, "stage", stage)
    monkeypatch.setattr(StagedBatch, "commit", commit)
    monkeypatch.setattr(Spool, "sync", sync)
    try:
        out = storescu(running.port, sent, extra=("--no-halt",))
    finally:
        running.stop(5.0)
    assert out.stderr.count("(Success)") == 3, out.stderr[-2000:]
    status = "OutOfResources" if failure == "fsync fails" else "Error: CannotUnderstand"
    assert status in out.stderr, out.stderr[-2000:]
    # the fourth may find the recorder writing the refusal's audit event, and not stage
    assert staged[:3] == [False, True, True], "the first slice of a series is not staged"
    assert in_place_at_commit == ([2, 3] if staged[3] else [2]), "commits find their files"
    factory = store.make_session_factory(store.make_engine(running.scp.config.database.url))
    assert store.count_instances(factory) == 3
    assert not any(running.scp.spool.incoming.iterdir())


def test_native_writes_large_datasets_back_early_and_leaves_no_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process native server, dcmtk storescu as the peer: a 512 KiB slice starts its
    disk writes while it still arrives, in consecutive ranges of the receiving file (the
    head start is only that: each stored file is dataset-equal), and neither a partial nor
    the next instance's prepared file is left in ``.incoming`` once the association is
    released."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    real = Spool.start_writeback

    def recording(self: Spool, fd: int, offset: int, length: int) -> None:
        ranges.setdefault(os.fstat(fd).st_ino, []).append((offset, length))
        real(self, fd, offset, length)

    monkeypatch.setattr(Spool, "start_writeback", recording)
    sent = make_ct_series(tmp_path / "in", 4, rows=512, cols=512)
    running = _in_process_native_node(tmp_path)
    try:
        out = storescu(running.port, sent)
        assert out.stderr.count("(Success)") == 4, out.stderr[-2000:]
        assert wait_for(lambda: not any(running.scp.spool.incoming.iterdir()))
    finally:
        running.stop(5.0)
    assert len(ranges) == 4, f"not every 512 KiB dataset was written back early: {ranges}"
    for calls in ranges.values():
        assert calls[0][0] > 128  # after the file's first write: preamble and File Meta
        for (off, length), (next_off, _) in itertools.pairwise(calls):
            assert length >= WRITEBACK_BYTES and next_off == off + length
        # all but the last PDU's worth is on its way before the dataset is complete
        assert sum(length for _, length in calls) >= 512 * 512 * 2 - WRITEBACK_BYTES
    config = running.scp.config
    sessions = store.make_session_factory(store.make_engine(config.database.url))
    for p in sent:
        ds = dcmread(p)
        rec = store.get_instance(sessions, ds.SOPInstanceUID)
        assert rec is not None
        assert dcmread(config.storage.path / rec.file_path) == ds


def _store_pdus(path: Path, context_id: int, max_pdu: int) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of one C-STORE-RQ, as a peer would send them."""
    ds = dcmread(path)
    prim = C_STORE()
    prim.MessageID = 99
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.DataSet = BytesIO(encode(ds, True, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    out = []
    for p in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        out.append(pdu.encode())
    return out


def test_abort_mid_transfer_keeps_the_acknowledged(tmp_path: Path, engine: str) -> None:
    """An A-ABORT halfway through a dataset: what was acknowledged stays, the partial
    file is gone, the abort is audited and the node keeps serving."""
    sent = make_ct_series(tmp_path / "in", 3, rows=128, cols=128)
    with running_node(tmp_path) as node:
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        for p in sent[:2]:
            assert assoc.send_c_store(dcmread(p)).Status == 0
        ctx = assoc.accepted_contexts[0].context_id
        pdus = _store_pdus(sent[2], ctx, 4096)
        assert len(pdus) > 4
        sock = assoc.dul.socket.socket
        for pdu in pdus[: len(pdus) // 2]:
            sock.sendall(pdu)
        time.sleep(0.3)
        assoc.abort()
        assert wait_for(lambda: "aborted: stored=2" in node.log_text()), node.log_text()[-2000:]
        assert store.count_instances(db(node)) == 2
        assert echoscu(node.port).returncode == 0
        if engine == "native":  # pynetdicom leaves its partial file until the next start
            assert wait_for(lambda: not any((node.spool / ".incoming").iterdir()))
        node.stop()
        events = store.list_events(db(node), kinds=[EventKind.ASSOCIATION_ABORTED])
        assert [e.actor for e in events] == ["ABORTER"]


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_malformed_associate_rq_gets_abort(tmp_path: Path, engine: str) -> None:
    with running_node(tmp_path) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16)
            reply = _recv_all(s, 10)
        assert reply[:1] == b"\x07", reply  # A-ABORT, then closed
        assert echoscu(node.port).returncode == 0


def test_unknown_pdu_in_association_aborts_it(tmp_path: Path, engine: str) -> None:
    good = make_instance(tmp_path / "ok.dcm")
    with running_node(tmp_path) as node:
        ae = AE(ae_title="BROKEN")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(b"\x0b\x00\x00\x00\x00\x02\x00\x00")
        assert wait_for(lambda: assoc.is_aborted, 20)
        out = storescu(node.port, [good])
        assert "(Success)" in out.stderr, "node keeps serving"


def test_pdv_on_unaccepted_context_aborts(tmp_path: Path, engine: str) -> None:
    good = make_instance(tmp_path / "ok.dcm", rows=32, cols=32)
    with running_node(tmp_path) as node:
        ae = AE(ae_title="ODDCTX")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        try:
            for pdu in _store_pdus(good, 99, 16384):
                sock.sendall(pdu)
        except OSError:
            pass  # already aborted by the node
        assert wait_for(lambda: assoc.is_aborted, 20)
        assert store.count_instances(db(node)) == 0
        assert echoscu(node.port).returncode == 0


# ----------------------------------------------------------------------------- timeouts


def test_acse_timeout_drops_a_silent_connection(tmp_path: Path, engine: str) -> None:
    with running_node(tmp_path, extra="acse_timeout = 1.0") as node:
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            t0 = time.monotonic()
            _recv_all(s, 15)
            waited = time.monotonic() - t0
        assert waited < 10, f"connection held {waited:.1f} s"
        assert echoscu(node.port).returncode == 0


def test_network_timeout_aborts_an_idle_association(tmp_path: Path, engine: str) -> None:
    with running_node(tmp_path, extra="network_timeout = 1.0") as node:
        ae = AE(ae_title="IDLER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        assert wait_for(lambda: assoc.is_aborted, 15), "idle association not aborted"
        assert wait_for(lambda: "IDLER@127.0.0.1 aborted" in node.log_text())


def test_dimse_timeout_aborts_a_stalled_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                ) -> None:
    """Native engine: a dataset that stops arriving mid-way is aborted after dimse_timeout
    (the idle network_timeout is far longer); its partial file is removed. (pynetdicom as
    an acceptor applies only its network timeout there.)"""
    monkeypatch.setattr(nodeproc, "ENGINE", "native")
    sent = make_ct_series(tmp_path / "in", 1, rows=128, cols=128)
    extra = "dimse_timeout = 1.0\nnetwork_timeout = 600.0"
    with running_node(tmp_path, extra=extra) as node:
        ae = AE(ae_title="STALLER")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_established
        pdus = _store_pdus(sent[0], assoc.accepted_contexts[0].context_id, 4096)
        for pdu in pdus[:3]:
            assoc.dul.socket.socket.sendall(pdu)
        assert wait_for(lambda: assoc.is_aborted, 15), "stalled dataset not aborted"
        assert wait_for(lambda: "STALLER@127.0.0.1 aborted" in node.log_text())
        assert "no data for 1 s" in node.log_text()
        assert wait_for(lambda: not any((node.spool / ".incoming").iterdir()))
