"""Malformed DICOM against a live node: every case gets a proper DIMSE status, or is stored
and recorded as not for triage with the reason; the node keeps serving; memory stays bounded.

The corpus is generated here from one good CT slice. Each case is sent with pynetdicom as
the SCU, its encoded bytes as they are (never re-encoded), in a presentation context we
choose - so a dataset can disagree with the context it arrives in. Then a property-based
fuzzer (hypothesis) mutates the encoded bytes of a good slice and sends those.

RSNA-style identifiers (``ID_0a1b2c3d4``, not valid DICOM UIDs) are accepted and stored
under their own string, in a sanitised spool path: they are what the RSNA data set uses, and
refusing them would make the scanner resend forever. A UID that could leave the spool
(``../x``) is sanitised the same way (tests/test_scp.py).
"""

from __future__ import annotations

import io
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicomfiles import make_instance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import needs_dcmtk
from nodeproc import NodeProc, echoscu, running_node
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from triage_node import store
from triage_node.domain import InstanceState

pytestmark = needs_dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"

#: Statuses a C-STORE may get from us (PS3.4 B.2.3): success, warnings, our failures.
ALLOWED = {0x0000, 0xB000, 0xB007, 0xB006, 0xA700, 0xA701, 0xA702, 0xA900, 0xC000, 0xC001,
           0xC002}


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """A dataset's bytes in ``transfer_syntax`` (no preamble, no file meta)."""
    from pynetdicom.dsutils import encode

    raw = encode(ds, transfer_syntax == ImplicitVRLittleEndian, True)
    assert raw is not None, "pydicom could not encode the case"
    return raw


def _good(tmp: Path, uid: str, **overrides: object) -> Dataset:
    path = make_instance(tmp / f"{uid}.dcm", rows=64, cols=64, SOPInstanceUID=uid, **overrides)
    return dcmread(path)


class Sender:
    """One pynetdicom association offering every context the corpus needs."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="BADINPUT")
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
        for sop_class in (CT, MR, RT_DOSE):
            for syntax in syntaxes:  # one context each, so each syntax is accepted
                ae.add_requested_context(sop_class, [syntax])
        self.assoc = ae.associate("127.0.0.1", port, ae_title="ICHTRIAGE")
        assert self.assoc.is_established

    def send(self, raw: bytes, *, sop_class: str, sop_uid: str, transfer_syntax: str) -> int:
        """C-STORE ``raw`` as it is, in a ``transfer_syntax`` context; the status."""
        from pynetdicom import _config

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = transfer_syntax
        head = io.BytesIO()
        head.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(head, meta)  # type: ignore[arg-type]
        with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
            fh.write(head.getvalue() + raw)
            fh.flush()
            old = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
            try:
                rsp = self.assoc.send_c_store(fh.name)
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = old
        assert "Status" in rsp, "no response: the association broke"
        return int(rsp.Status)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    sop_uid: str
    expect: int  # the DIMSE status
    not_for_triage: str | None = None  # a reason fragment when stored but not triageable
    sop_class: str = CT
    transfer_syntax: str = ExplicitVRLittleEndian


def _corpus(tmp: Path) -> list[Case]:
    ex = ExplicitVRLittleEndian
    cases: list[Case] = []

    good = _good(tmp, "1.2.826.0.1.3680043.8.498.900")
    raw = _encode(good, ex)
    cases.append(Case("good", raw, "1.2.826.0.1.3680043.8.498.900", 0x0000))

    # Truncated: in the header (identifiers lost) and in the pixel data.
    cases.append(Case("truncated_header", raw[:300], "1.2.826.0.1.3680043.8.498.900", 0xC001))
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.901")
    cut = _encode(ds, ex)
    cases.append(Case("truncated_pixels", cut[:-4000], "1.2.826.0.1.3680043.8.498.901",
                      0x0000, not_for_triage="pixel data missing or short"))

    # Missing and short pixel data (well-formed elements).
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.902")
    del ds.PixelData
    cases.append(Case("no_pixel_data", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.902",
                      0x0000, not_for_triage="pixel data missing or short"))
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.903")
    ds.PixelData = ds.PixelData[:64]
    cases.append(Case("short_pixel_data", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.903",
                      0x0000, not_for_triage="pixel data missing or short"))

    # Rows x Columns claiming gigabytes: recorded, never decoded.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.904")
    ds.Rows = ds.Columns = 65535
    cases.append(Case("gigabyte_matrix", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.904",
                      0x0000, not_for_triage="larger than a CT slice"))

    # An element whose length claims 2 GiB more than the dataset holds.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.905")
    body = _encode(ds, ImplicitVRLittleEndian)
    huge = body + struct.pack("<HHI", 0x0009, 0x1010, 0x7FFFFFF0) + b"x" * 16
    cases.append(Case("element_length_2gib", huge, "1.2.826.0.1.3680043.8.498.905", 0x0000,
                      transfer_syntax=ImplicitVRLittleEndian))

    # Wrong VRs: a UID element written as US, a date as garbage bytes with an odd length.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.906")
    raw6 = bytearray(_encode(ds, ex))
    tag = struct.pack("<HH", 0x0008, 0x0020)  # StudyDate DA -> written as "UL" with 3 bytes
    at = raw6.find(tag)
    assert at > 0
    length = struct.unpack("<H", raw6[at + 6:at + 8])[0]
    raw6[at:at + 8 + length] = tag + b"UL" + struct.pack("<H", 3) + b"\x01\x02\x03"
    cases.append(Case("wrong_vr", bytes(raw6), "1.2.826.0.1.3680043.8.498.906", 0x0000))

    # Compressed transfer syntax whose fragments are not JPEG 2000: stored as received
    # (the header is fine); decoding fails later, in the worker, naming the slice.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.907")
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 300])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    cases.append(Case("undecodable_jpeg2000", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.907",
                      0x0000, transfer_syntax=JPEG2000Lossless))

    # RSNA identifiers: not DICOM UIDs, stored under their own string.
    ds = _good(tmp, "ID_0a1b2c3d4", StudyInstanceUID="ID_s0a1b2c3d4",
               SeriesInstanceUID="ID_r0a1b2c3d4")
    cases.append(Case("rsna_uids", _encode(ds, ex), "ID_0a1b2c3d4", 0x0000))

    # Not CT: an MR image and an RT Dose, stored, not triaged.
    mr = make_instance(tmp / "mr.dcm", kind="mr", SOPInstanceUID="1.2.826.0.1.3680043.8.498.908")
    cases.append(Case("mr_image", _encode(dcmread(mr), ex), "1.2.826.0.1.3680043.8.498.908",
                      0x0000, not_for_triage="not a CT image", sop_class=MR))
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.909", SOPClassUID=RT_DOSE, Modality="RTDOSE")
    cases.append(Case("rt_dose", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.909", 0x0000,
                      not_for_triage="not a CT image", sop_class=RT_DOSE))

    # Odd character sets: ISO 2022 Japanese, and one pydicom does not know.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.910")
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    cases.append(Case("iso2022_japanese", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.910",
                      0x0000))
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.911")
    raw11 = _encode(ds, ex).replace(b"ISO_IR 100", b"ISO_IR 999", 1)
    if b"ISO_IR 999" not in raw11:
        ds.SpecificCharacterSet = "ISO_IR 999"
        raw11 = _encode(ds, ex)
    cases.append(Case("unknown_charset", raw11, "1.2.826.0.1.3680043.8.498.911", 0x0000))

    # Bytes that disagree with the context: explicit VR data in an implicit VR context.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.912")
    cases.append(Case("explicit_in_implicit_context", _encode(ds, ex),
                      "1.2.826.0.1.3680043.8.498.912", 0xC000,
                      transfer_syntax=ImplicitVRLittleEndian))

    # The request's SOP class is not the dataset's.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.913")
    cases.append(Case("sop_class_mismatch", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.913",
                      0xA900, sop_class=MR))

    # The request's SOP Instance UID is not the dataset's.
    ds = _good(tmp, "1.2.826.0.1.3680043.8.498.914")
    cases.append(Case("sop_instance_mismatch", _encode(ds, ex), "1.2.826.0.1.3680043.8.498.999",
                      0xC002))

    # Not DICOM at all.
    cases.append(Case("zeros", bytes(512), "1.2.826.0.1.3680043.8.498.915", 0xC000))
    cases.append(Case("text", b"%PDF-1.4 not a dataset\n" * 20,
                      "1.2.826.0.1.3680043.8.498.916", 0xC000))
    return cases


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    tmp = tmp_path_factory.mktemp("badinput-node")
    with running_node(tmp) as proc:
        yield proc


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_corpus(node: NodeProc, tmp_path: Path) -> None:
    cases = _corpus(tmp_path)
    sender = Sender(node.port)
    try:
        got = {c.name: sender.send(c.raw, sop_class=c.sop_class, sop_uid=c.sop_uid,
                                   transfer_syntax=c.transfer_syntax) for c in cases}
    finally:
        sender.close()
    print("\nbad input corpus: case -> DIMSE status")
    for c in cases:
        print(f"  {c.name:<30} 0x{got[c.name]:04X}")
    assert {c.name: f"0x{got[c.name]:04X}" for c in cases} == {
        c.name: f"0x{c.expect:04X}" for c in cases}
    engine = store.make_engine(node.database_url)
    factory = store.make_session_factory(engine)
    try:
        for c in cases:
            if c.expect != 0x0000:
                continue
            record = store.get_instance(factory, c.sop_uid)
            assert record is not None, c.name
            if c.not_for_triage:
                assert record.state is InstanceState.NOT_FOR_TRIAGE, c.name
                assert record.reason and c.not_for_triage in record.reason, (c.name,
                                                                             record.reason)
            assert (node.spool / record.file_path).is_file()
    finally:
        engine.dispose()
    assert echoscu(node.port).returncode == 0, "the node keeps serving"
    assert node.proc.poll() is None
    print(f"SCP peak RSS after the corpus: {_peak_rss_kib(node.proc.pid) / 1024:.0f} MiB")


_SEED: bytes | None = None
_FUZZ_STATUSES: Counter[int] = Counter()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_datasets_get_a_proper_status(node: NodeProc, data: st.DataObject) -> None:
    """Mutated encodings of a good slice: flipped bytes, cuts, insertions. Every one gets
    an allowed status on a live association; afterwards the node still answers C-ECHO and
    its peak RSS stays bounded."""
    global _SEED
    if _SEED is None:
        tmp = Path(tempfile.mkdtemp(prefix="fuzz-seed-", dir=node.config.parent))
        _SEED = _encode(_good(tmp, "1.2.826.0.1.3680043.8.498.990"), ExplicitVRLittleEndian)
    raw = bytearray(_SEED)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "lengthen"]), label="kind")
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        if kind == "flip":
            raw[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "cut":
            del raw[at:at + data.draw(st.integers(1, 64), label="n")]
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=32), label="bytes")
        else:  # a 32-bit length field somewhere becomes huge
            raw[at:at + 4] = struct.pack("<I", data.draw(st.integers(2**20, 2**32 - 1)))
        if not raw:
            raw = bytearray(b"\0")
    syntax = data.draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                       label="context")
    sender = Sender(node.port)
    try:
        status = sender.send(bytes(raw), sop_class=CT, sop_uid="1.2.826.0.1.3680043.8.498.990",
                             transfer_syntax=syntax)
    finally:
        sender.close()
    _FUZZ_STATUSES[status] += 1
    assert status in ALLOWED, f"0x{status:04X}"
    assert node.proc.poll() is None


def test_after_fuzzing_node_serves_and_memory_is_bounded(node: NodeProc) -> None:
    assert echoscu(node.port).returncode == 0
    peak = _peak_rss_kib(node.proc.pid) / 1024
    print("\nfuzzed C-STOREs by status: " + ", ".join(
        f"0x{k:04X} x{v}" for k, v in sorted(_FUZZ_STATUSES.items())))
    print(f"SCP peak RSS after the corpus and fuzzing: {peak:.0f} MiB")
    assert peak < 400, f"peak RSS {peak:.0f} MiB"
