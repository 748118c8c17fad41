"""The ingest fast path's header reader agrees with pydicom, or steps aside.

:func:`triage_node.header.parse` must give the same database record as pydicom's parse for
every file it accepts, and return None (pydicom decides) for anything it does not handle.
Checked on real scanners' files (../shared/realdata), pydicom's own test files, and made-up
files with sequences of undefined length, other character sets and hostile structures.
"""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import pytest
from dicomfiles import make_instance
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from triage_node import header
from triage_node.ingest import instance_record, read_header

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
#: what the native receive loop keeps of each file for the header parse
HEAD = 64 * 1024
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".md", ".txt"))


def _compare(path: Path) -> bool | None:
    """True if the fast path accepted ``path`` (and agreed), False if it stepped aside,
    None if pydicom cannot read it either."""
    head = path.read_bytes()[:HEAD]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_header(path, head)
    except Exception:
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    fast = header.parse(head, syntax)
    if fast is None:
        return False
    kwargs = dict(sop_class_uid=str(ds.get("SOPClassUID", "")), transfer_syntax_uid=syntax,
                  file_path="x.dcm", file_size=path.stat().st_size, calling_ae="SCU",
                  received_at=NOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow_record = instance_record(ds, **kwargs)  # type: ignore[arg-type]
    assert instance_record(fast, **kwargs) == slow_record, path  # type: ignore[arg-type]
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert str(fast.get(keyword, "")).strip() == str(ds.get(keyword, "") or "").strip()
    return True


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} (real scanners' DICOM) absent")
def test_agrees_with_pydicom_on_real_scanner_files() -> None:
    outcomes = {p: _compare(p) for p in _files(REALDATA)}
    accepted = [p for p, ok in outcomes.items() if ok]
    # The head CTs of both vendors go the fast way (the bench and the tests exercise it).
    ge = [p for p in accepted if "/GE/" in str(p)]
    philips = [p for p in accepted if "/Philips/" in str(p)]
    assert len(ge) >= 10 and len(philips) >= 10, (len(ge), len(philips))
    # Encodings it leaves to pydicom.
    for p, ok in outcomes.items():
        if "BigEndian" in p.name or "Deflated" in p.name:
            assert ok is not True, p


def test_agrees_with_pydicom_on_its_test_files() -> None:
    outcomes = [_compare(p) for p in _files(Path(DATA_ROOT) / "test_files")]
    assert outcomes.count(True) >= 50


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_steps_over_sequences_of_undefined_length(tmp_path: Path, syntax: str) -> None:
    """Scanners put sequences (often of undefined length, items too) before the UIDs."""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    inner = Dataset()
    inner.CodeValue = "X"
    inner.CodingSchemeDesignator = "99TEST"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    f = make_instance(tmp_path / "x.dcm", transfer_syntax=syntax,
                      ReferencedImageSequence=Sequence([item, Dataset()]),
                      PatientName="Doe^Jane", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    ds = dcmread(f)
    ds["ReferencedImageSequence"].is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence[0]["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    ds.save_as(f, enforce_file_format=True)
    data = f.read_bytes()
    assert data.count(b"\xfe\xff\xdd\xe0") == 2 and data.count(b"\xfe\xff\x0d\xe0") == 2
    assert _compare(f) is True


def test_latin1_and_utf8_names(tmp_path: Path) -> None:
    a = make_instance(tmp_path / "a.dcm", SpecificCharacterSet="ISO_IR 100",
                      PatientName="Müller^Jörg", StudyDescription="Schädel nativ")
    b = make_instance(tmp_path / "b.dcm", SpecificCharacterSet="ISO_IR 192",
                      PatientName="山田^太郎", SeriesDescription="頭部 5mm")
    assert _compare(a) is True and _compare(b) is True
    fast = header.parse(b.read_bytes(), ExplicitVRLittleEndian)
    assert fast is not None and fast.get("PatientName") == "山田^太郎"


@pytest.mark.parametrize("case", ["iso2022", "truncated", "wrong syntax", "implicit as explicit",
                                  "bad meta", "not dicom", "odd US length"])
def test_steps_aside(tmp_path: Path, case: str) -> None:
    """What it does not fully understand is pydicom's to read (None), never a guess."""
    syntax = ExplicitVRLittleEndian
    if case == "iso2022":
        f = make_instance(tmp_path / "x.dcm", SpecificCharacterSet=["", "ISO 2022 IR 87"],
                          PatientName="Yamada^Tarou")
        data = f.read_bytes()
    elif case == "truncated":
        data = make_instance(tmp_path / "x.dcm").read_bytes()[:400]
    elif case == "wrong syntax":
        data = make_instance(tmp_path / "x.dcm").read_bytes()
        syntax = "1.2.840.10008.1.2.4.50"
    elif case == "implicit as explicit":  # the dataset is implicit VR, the meta says explicit
        implicit = make_instance(tmp_path / "x.dcm", transfer_syntax=ImplicitVRLittleEndian)
        data = implicit.read_bytes().replace(ImplicitVRLittleEndian.encode() + b"\x00",
                                             ExplicitVRLittleEndian.encode())
    elif case == "bad meta":
        data = bytearray(make_instance(tmp_path / "x.dcm").read_bytes())
        data[140:144] = (10_000).to_bytes(4, "little")
        data = bytes(data)
    elif case == "not dicom":
        data = b"hello" * 100
    else:  # Rows (0028,0010) with two US values: not what a CT slice has
        data = make_instance(tmp_path / "y.dcm").read_bytes()
        at = data.index(b"\x28\x00\x10\x00US\x02\x00")
        data = data[:at] + b"\x28\x00\x10\x00US\x04\x00\x40\x00\x40\x00" + data[at + 10:]
    assert header.parse(data, syntax) is None, case


def test_phantom_series_takes_the_fast_path(tmp_path: Path) -> None:
    from dicomfiles import make_ct_series

    for f in make_ct_series(tmp_path, 3, rows=64, cols=64):
        assert _compare(f) is True
