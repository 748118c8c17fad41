"""Tests of triage_node.sr: the SR is valid (dciodvfy), reads back (highdicom, dsrdump) and
says what the result says."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from triage_node import sr
from triage_node.domain import LABELS, SeriesResult
from triage_node.phantom import StudyTruth, generate_study
from triage_node.sr import FINDING_CODES, build_sr, sr_series_uid

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DISCLAIMER = "Triage aid - not for diagnostic use"
SHA256 = "0123456789abcdef" * 4
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

needs_dciodvfy = pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools dciodvfy missing")
needs_dsrdump = pytest.mark.skipif(not DSRDUMP.exists(), reason="dcmtk dsrdump missing")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyTruth:
    """A small synthetic head CT series."""
    return generate_study(tmp_path_factory.mktemp("phantom"), seed=11, n_slices=12, rows=64,
                          cols=64, positive=True, quirks=False)


@pytest.fixture
def headers(study: StudyTruth) -> list[Dataset]:
    return [dcmread(s.path, stop_before_pixels=True) for s in study.slices]


def make_result(study: StudyTruth, *, any_p: float = 0.91, key_index: int = 6) -> SeriesResult:
    """A result whose slice ``key_index`` has the highest ``any`` and label i peaks at slice i."""
    slices = []
    for i, s in enumerate(study.slices):
        probs = [0.05] * len(LABELS)
        probs[0] = any_p if i == key_index else 0.1
        if 1 <= i < len(LABELS):
            probs[i] = 0.6
        slices.append((s.sop_uid, i * 5.0, tuple(probs)))
    probabilities = {label: max(p[j] for _, _, p in slices) for j, label in enumerate(LABELS)}
    done = dt.datetime(2026, 11, 23, 12, 30, 15, 123456, tzinfo=dt.UTC)
    return SeriesResult(
        series_instance_uid=study.series_uid,
        probabilities=probabilities,
        slices=tuple(slices),
        key_sop_instance_uid=study.slices[key_index].sop_uid,
        flagged=any_p >= 0.5,
        threshold=0.5,
        model_name="ich-demo",
        model_version="1.2.3",
        model_sha256=SHA256,
        inference_started_at=done - dt.timedelta(seconds=2),
        inference_done_at=done,
    )


def write(ds: Dataset, path: Path) -> Path:
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def value_of(item: Dataset) -> Any:
    kind = item.ValueType
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue)
    if kind == "UIDREF":
        return str(item.UID)
    if kind == "IMAGE":
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


# ------------------------------------------------------------------------- validity


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(tmp_path: Path, study: StudyTruth,
                                    headers: list[Dataset]) -> None:
    path = write(build_sr(headers, make_result(study), disclaimer=DISCLAIMER), tmp_path / "sr.dcm")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert "Comprehensive3DSR" in output  # it did recognise and check the IOD
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == [], output


@needs_dsrdump
def test_dsrdump_reads_it(tmp_path: Path, study: StudyTruth, headers: list[Dataset]) -> None:
    path = write(build_sr(headers, make_result(study), disclaimer=DISCLAIMER), tmp_path / "sr.dcm")
    run = subprocess.run([str(DSRDUMP), "+Pl", str(path)], capture_output=True, text=True,
                         timeout=60, env=DCMTK_ENV)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Comprehensive 3D SR Document" in out
    assert '"Imaging Measurement Report"' in out
    assert out.count('"Measurement Group"') == len(LABELS)
    assert f'"Algorithm Parameters")="model_sha256={SHA256}"' in out
    assert f'"Comment")="{DISCLAIMER}"' in out
    assert "PHANTOM^11" in out
    assert "Error" not in run.stderr and "Warning" not in run.stderr


def test_highdicom_reads_back_the_measurements(tmp_path: Path, study: StudyTruth,
                                               headers: list[Dataset]) -> None:
    result = make_result(study)
    path = write(build_sr(headers, result, disclaimer=DISCLAIMER), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert [str(g.finding_type.meaning) for g in groups] == [
        FINDING_CODES[label].meaning for label in LABELS
    ]
    for label, group in zip(LABELS, groups, strict=True):
        (measurement,) = group.get_measurements()
        assert measurement.name.meaning == "Probability"
        assert measurement.value == pytest.approx(result.probabilities[label])
        assert measurement.unit.value == "1"
        (evaluation,) = group.get_qualitative_evaluations()
        expected = "Present" if result.probabilities[label] >= result.threshold else "Absent"
        assert evaluation.name == FINDING_CODES[label]
        assert evaluation.value.meaning == expected
        # The slice each probability was inferred from: the slice of its maximum.
        (image,) = measurement.referenced_images
        peak = max(result.slices, key=lambda s: s[2][LABELS.index(label)])[0]
        assert image.referenced_sop_instance_uid == (
            result.key_sop_instance_uid if label == "any" else peak
        )
    # The example is positive for "any" and for the five subtypes (0.6 >= 0.5).
    assert {g.get_qualitative_evaluations()[0].value.meaning for g in groups} == {"Present"}


def test_negative_labels_are_absent(study: StudyTruth, headers: list[Dataset]) -> None:
    result = make_result(study, any_p=0.2)
    result = dataclasses.replace(
        result, flagged=False, probabilities={**result.probabilities, "subdural": 0.49}
    )
    ds = build_sr(headers, result, disclaimer=DISCLAIMER)
    found = {meaning(i): value_of(i) for i in items(ds) if i.ValueType == "CODE"}
    assert found["Subdural intracranial hemorrhage"] == "Absent"
    assert found["Intracranial hemorrhage"] == "Absent"
    assert found["Cerebral hemorrhage"] == "Present"


def test_algorithm_identification_and_device_observer(study: StudyTruth,
                                                      headers: list[Dataset]) -> None:
    ds = build_sr(headers, make_result(study), disclaimer=DISCLAIMER)
    pairs = [(meaning(i), value_of(i)) for i in items(ds)]
    assert ("Algorithm Name", "ich-demo") in pairs
    assert ("Algorithm Version", "1.2.3") in pairs
    assert ("Algorithm Parameters", f"model_sha256={SHA256}") in pairs
    assert ("Algorithm Parameters", "threshold=0.5") in pairs
    assert ("Observer Type", "Device") in pairs
    assert ("Device Observer Name", "triage-node") in pairs
    assert any(m == "Device Observer UID" and v for m, v in pairs)
    assert ("Comment", DISCLAIMER) in pairs


# --------------------------------------------------------------------- header and references


def test_patient_and_study_copied_new_series(study: StudyTruth, headers: list[Dataset]) -> None:
    result = make_result(study)
    ds = build_sr(headers, result, disclaimer=DISCLAIMER, sop_instance_uid="1.2.3.4")
    src = headers[0]
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.Modality == "SR"
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.SeriesInstanceUID == sr_series_uid(study.series_uid) != study.series_uid
    assert ds.SeriesNumber == 9901 and ds.InstanceNumber == 1
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert (str(ds.ContentDate), str(ds.ContentTime)) == ("20261123", "123015.123456")
    assert ds.TimezoneOffsetFromUTC == "+0000"
    assert "PixelData" not in ds


def test_evidence_lists_every_source_slice(study: StudyTruth, headers: list[Dataset]) -> None:
    ds = build_sr(headers, make_result(study), disclaimer=DISCLAIMER)
    (study_item,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == study.study_uid
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == study.series_uid
    referenced = {i.ReferencedSOPInstanceUID for i in series_item.ReferencedSOPSequence}
    assert referenced == {s.sop_uid for s in study.slices}
    assert "PertinentOtherEvidenceSequence" not in ds


def test_key_slice_in_the_image_library(study: StudyTruth, headers: list[Dataset]) -> None:
    result = make_result(study)
    ds = build_sr(headers, result, disclaimer=DISCLAIMER)
    library = next(i for i in items(ds) if meaning(i) == "Image Library")
    images = [value_of(i) for i in items(library) if i.ValueType == "IMAGE"]
    assert images == [result.key_sop_instance_uid]


def test_evidence_from_uid_only_headers(study: StudyTruth, headers: list[Dataset]) -> None:
    """Only the key slice needs a full header; the others only their UIDs."""
    result = make_result(study)
    slim = []
    for h in headers:
        if h.SOPInstanceUID == result.key_sop_instance_uid:
            slim.append(h)
            continue
        d = Dataset()
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(d, kw, h[kw].value)
        slim.append(d)
    ds = build_sr(slim, result, disclaimer=DISCLAIMER)
    assert ds.PatientID == headers[0].PatientID
    series_item = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(series_item.ReferencedSOPSequence) == len(headers)


def test_supersedes_names_the_predecessor(study: StudyTruth, headers: list[Dataset]) -> None:
    first = build_sr(headers, make_result(study), disclaimer=DISCLAIMER)
    second = build_sr(headers, make_result(study, any_p=0.3), disclaimer=DISCLAIMER,
                      instance_number=2, supersedes=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    (pre_study,) = second.PredecessorDocumentsSequence
    assert pre_study.StudyInstanceUID == first.StudyInstanceUID
    (pre_series,) = pre_study.ReferencedSeriesSequence
    assert pre_series.SeriesInstanceUID == first.SeriesInstanceUID
    (pre,) = pre_series.ReferencedSOPSequence
    assert pre.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert pre.ReferencedSOPClassUID == COMPREHENSIVE_3D_SR
    assert "PredecessorDocumentsSequence" not in first


def test_same_inputs_same_bytes(study: StudyTruth, headers: list[Dataset]) -> None:
    """A rebuild with the stored UID is the same document (nothing depends on the clock)."""
    result = make_result(study)
    encoded = []
    for _ in range(2):
        buffer = io.BytesIO()
        dcmwrite(buffer, build_sr(headers, result, disclaimer=DISCLAIMER,
                                  sop_instance_uid="1.2.3.4.5"), enforce_file_format=True)
        encoded.append(buffer.getvalue())
    assert encoded[0] == encoded[1]


def test_any_disclaimer_text_is_encoded(tmp_path: Path, study: StudyTruth,
                                        headers: list[Dataset]) -> None:
    text = "Hilfsmittel zur Triage \u2013 nicht f\u00fcr die Diagnose \u2713"
    path = write(build_sr(headers, make_result(study), disclaimer=text), tmp_path / "sr.dcm")
    back = dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert ("Comment", text) in [(meaning(i), value_of(i)) for i in items(back)]
    assert back.PatientName == headers[0].PatientName


# ------------------------------------------------------------------ real and messy headers

REALDATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "headct_dcm_qa_ct"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@needs_dciodvfy
@pytest.mark.parametrize("folder", ["GE", "Philips/S21570/S2010"])
def test_real_scanner_headers(tmp_path: Path, folder: str) -> None:
    """Real head CTs (GE: de-identified without a method, no birth date or sex)."""
    source = REALDATA / folder
    if not source.is_dir():
        pytest.skip(f"real data not found at {source}")
    headers = [
        ds for ds in (dcmread(p, stop_before_pixels=True, force=True)
                      for p in sorted(source.iterdir()) if p.is_file())
        if ds.get("SOPClassUID") == CT_IMAGE_STORAGE
    ]
    assert len(headers) >= 10
    now = dt.datetime.now(dt.UTC)
    result = SeriesResult(
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        probabilities=dict.fromkeys(LABELS, 0.7), slices=(),
        key_sop_instance_uid=str(headers[5].SOPInstanceUID), flagged=True, threshold=0.5,
        model_name="ich-demo", model_version="1", model_sha256=SHA256,
        inference_started_at=now, inference_done_at=now,
    )
    ds = build_sr(headers, result, disclaimer=DISCLAIMER)
    path = write(ds, tmp_path / "sr.dcm")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == [], run.stdout + run.stderr
    assert ds.PatientName == headers[5].PatientName
    assert ds.PatientID == headers[5].PatientID


def test_messy_patient_attributes(study: StudyTruth, headers: list[Dataset]) -> None:
    """Values highdicom refuses or warns about do not stop the SR; the sources stay as they are."""
    result = make_result(study)
    messy = []
    for h in headers:
        d = Dataset()
        d.update(h)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the bad date: it is the point
            d.PatientName, d.PatientSex, d.PatientBirthDate = "REMOVED", "U", "1970"
        del d.StudyTime
        messy.append(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_sr(messy, result, disclaimer=DISCLAIMER)
    assert [str(w.message) for w in caught] == []
    assert ds.PatientName == "REMOVED"  # the source's name, unchanged
    assert (ds.PatientSex, ds.PatientBirthDate, ds.StudyTime) == ("", "", "")
    assert messy[6].PatientSex == "U" and "StudyTime" not in messy[6]  # inputs untouched


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda h, r: {"sources": []}, ValueError, "sources must not be empty"),
        (lambda h, r: {"sources": h[0]}, TypeError, "sources must be a sequence"),
        (lambda h, r: {"sources": [*h, "x"]}, TypeError, r"sources\[12\]"),
        (lambda h, r: {"sources": h[:3]}, ValueError, "key slice"),
        (lambda h, r: {"result": dataclasses.replace(r, series_instance_uid="1.2.3")},
         ValueError, r"sources\[0\] is of series"),
        (lambda h, r: {"result": dataclasses.replace(
            r, probabilities={**r.probabilities, "epidural": 1.5})},
         ValueError, r"result.probabilities\['epidural'\]"),
        (lambda h, r: {"result": dataclasses.replace(
            r, probabilities={k: v for k, v in r.probabilities.items() if k != "subdural"})},
         ValueError, r"result.probabilities\['subdural'\]"),
        (lambda h, r: {"result": dataclasses.replace(r, model_sha256="")},
         ValueError, "result.model_sha256"),
        (lambda h, r: {"result": "not a result"}, TypeError, "result must be a SeriesResult"),
        (lambda h, r: {"disclaimer": " "}, ValueError, "disclaimer must not be empty"),
        (lambda h, r: {"disclaimer": None}, TypeError, "disclaimer must be a str"),
        (lambda h, r: {"instance_number": 0}, ValueError, "instance_number must be >= 1"),
        (lambda h, r: {"created_at": dt.datetime(2026, 1, 1)}, ValueError, "created_at"),
        (lambda h, r: {"supersedes": Dataset()}, ValueError, "supersedes has no"),
    ],
)
def test_bad_arguments_are_named(study: StudyTruth, headers: list[Dataset], change: Any,
                                 error: type[Exception], message: str) -> None:
    kwargs: dict[str, Any] = {"sources": headers, "result": make_result(study),
                              "disclaimer": DISCLAIMER}
    kwargs.update(change(headers, kwargs["result"]))
    sources, result = kwargs.pop("sources"), kwargs.pop("result")
    with pytest.raises(error, match=message):
        build_sr(sources, result, **kwargs)


def test_other_study_in_sources_is_refused(study: StudyTruth, headers: list[Dataset]) -> None:
    other = Dataset()
    other.update(headers[1])
    other.StudyInstanceUID = "1.2.3.999"
    with pytest.raises(ValueError, match=r"sources\[1\] is of study"):
        build_sr([headers[0], other, *headers[2:]], make_result(study), disclaimer=DISCLAIMER)


def test_sr_series_uid_is_stable() -> None:
    assert sr_series_uid("1.2.3") == sr_series_uid("1.2.3") != sr_series_uid("1.2.4")
    with pytest.raises(ValueError, match="source_series_instance_uid"):
        sr_series_uid("")


def test_key_image_secondary_capture(tmp_path: Path, study: StudyTruth,
                                     headers: list[Dataset]) -> None:
    """The key-image SC: valid (dciodvfy), RGB as given, in the patient's study, in its own
    series, pointing at the key slice; a wrong array or key slice is refused."""
    import numpy as np

    result = make_result(study)
    key = headers[6]
    rgb = np.zeros((96, 80, 3), np.uint8)
    rgb[10:20, 30:40] = (255, 0, 0)
    sc = sr.build_key_image(key, rgb, result, disclaimer="Triage aid - not for diagnostic use")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (sc.PatientID, sc.StudyInstanceUID) == (key.PatientID, key.StudyInstanceUID)
    assert sc.SeriesInstanceUID == sr.key_image_series_uid(study.series_uid) != \
        sr.sr_series_uid(study.series_uid)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert "SUSPECTED ICH" in sc.ImageComments and "not for diagnostic use" in sc.ImageComments
    path = write(sc, tmp_path / "sc.dcm")
    back = dcmread(path)
    assert np.array_equal(back.pixel_array, rgb)
    if DCIODVFY.exists():
        run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True,
                             timeout=60)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert errors == []
    with pytest.raises(ValueError, match="rgb"):
        sr.build_key_image(key, rgb[..., 0], result, disclaimer="x")
    with pytest.raises(ValueError, match="key slice"):
        sr.build_key_image(headers[0], rgb, result, disclaimer="x")
