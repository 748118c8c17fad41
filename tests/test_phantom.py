"""Tests of the synthetic head-CT phantom generator."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from triage_node.domain import LABELS
from triage_node.phantom import (
    QUIRKS,
    SUBTYPES,
    RenderedSlice,
    StudyTruth,
    generate,
    generate_study,
    render_study,
)

ROWS = COLS = 192
N = 24


def _hu(path: Path) -> NDArray[np.float64]:
    ds = pydicom.dcmread(path)
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


def _rsna_fix_hu(path: Path) -> NDArray[np.float64]:
    """The known RSNA correction for unsigned 12-bit files with intercept ~0."""
    ds = pydicom.dcmread(path)
    x = np.asarray(ds.pixel_array, dtype=np.int64)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100:
        x = x + 1000
        x[x >= 4096] -= 4096
        return x.astype(np.float64) - 1000.0
    return _hu(path)


@pytest.fixture(scope="module")
def positives(tmp_path_factory: pytest.TempPathFactory) -> list[StudyTruth]:
    out = tmp_path_factory.mktemp("pos")
    return [
        generate_study(out, seed=s, n_slices=N, positive=True, rows=ROWS, cols=COLS)
        for s in range(30)
    ]


def _rendered(truth: StudyTruth) -> list[RenderedSlice]:
    return list(render_study(seed=truth.seed, n_slices=N, positive=True, rows=ROWS, cols=COLS))


def test_tissue_hu_ranges(tmp_path: Path) -> None:
    truth = generate_study(
        tmp_path, seed=7, n_slices=N, positive=False, quirks=False, rows=ROWS, cols=COLS
    )
    assert truth.series_labels == dict.fromkeys(LABELS, 0)
    ranges = {"skull": (700, 1500), "parenchyma": (25, 45), "csf": (0, 15)}
    seen = set()
    for sl, rs in zip(truth.slices, _rendered_neg(truth), strict=True):
        hu = _hu(sl.path)
        assert np.allclose(hu, np.rint(rs.hu).clip(-1024, 3071))
        for name, (lo, hi) in ranges.items():
            vals = hu[rs.tissue[name]]
            if vals.size > 50:
                seen.add(name)
                assert lo <= np.percentile(vals, 0.5) and np.percentile(vals, 99.5) <= hi, name
        air = hu[rs.tissue["air"]]
        assert abs(float(np.median(air)) + 1000) < 5
        assert air.max() < -950
        assert not rs.lesions
        # no hemorrhage-density voxels inside the brain of a negative study
        brain = rs.tissue["parenchyma"] | rs.tissue["csf"]
        assert np.count_nonzero(hu[brain] >= 50) <= max(3, brain.sum() // 10000)
    assert seen == set(ranges)
    assert any(rs.tissue["ventricle"].any() for rs in _rendered_neg(truth))


def _rendered_neg(truth: StudyTruth) -> list[RenderedSlice]:
    return list(
        render_study(
            seed=truth.seed, n_slices=N, positive=False, quirks=False, rows=ROWS, cols=COLS
        )
    )


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_lesion_voxels_match_labels(positives: list[StudyTruth], subtype: str) -> None:
    studies = [t for t in positives if t.series_labels[subtype]]
    assert studies, f"no {subtype} in the positive seeds"
    truth = studies[0]
    labelled = 0
    for sl, rs in zip(truth.slices, _rendered(truth), strict=True):
        hu = _rsna_fix_hu(sl.path)
        mask = rs.lesions.get(subtype)
        assert sl.labels[subtype] == int(mask is not None)
        assert sl.labels["any"] == max(sl.labels[s] for s in SUBTYPES)
        if mask is None:
            continue
        labelled += 1
        vals = hu[mask]
        assert vals.size > 0
        assert vals.min() >= 50 and vals.max() <= 90, (vals.min(), vals.max())
    assert labelled >= 1
    if subtype == "intraventricular":
        for rs in _rendered(truth):
            if subtype in rs.lesions:
                assert not (rs.lesions[subtype] & ~rs.tissue["ventricle"]).any()


def test_every_subtype_spans_slices_and_co_occurs(positives: list[StudyTruth]) -> None:
    for truth in positives:
        assert truth.series_labels["any"] == 1 or not truth.lesions
    multi = [t for t in positives if sum(t.series_labels[s] for s in SUBTYPES) >= 2]
    assert multi
    spans = [sum(sl.labels["any"] for sl in t.slices) for t in positives]
    assert max(spans) >= 3


def test_rsna_csv_layout(tmp_path: Path) -> None:
    truths = generate(tmp_path, studies=4, seed=3, n_slices=8, rows=64, cols=64)
    with (tmp_path / "stage_2_train.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"]
    body = rows[1:]
    slices = [sl for t in truths for sl in t.slices]
    assert len(body) == 6 * len(slices)
    by_id = {r[0]: int(r[1]) for r in body}
    for sl in slices:
        assert pydicom.dcmread(sl.path, stop_before_pixels=True).SOPInstanceUID == sl.sop_uid
        vals = {lab: by_id[f"ID_{sl.sop_uid}_{lab}"] for lab in LABELS}
        assert vals == dict(sl.labels)
        assert vals["any"] == max(vals[s] for s in SUBTYPES)
    with (tmp_path / "series_labels.csv").open() as fh:
        series = list(csv.DictReader(fh))
    assert len(series) == 4
    for row, truth in zip(series, truths, strict=True):
        assert row["SeriesInstanceUID"] == truth.series_uid
        assert {lab: int(row[lab]) for lab in LABELS} == dict(truth.series_labels)


def test_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", studies=3, seed=11, n_slices=6, rows=64, cols=64)
    b = generate(tmp_path / "b", studies=3, seed=11, n_slices=6, rows=64, cols=64)
    for ta, tb in zip(a, b, strict=True):
        assert (ta.study_uid, ta.series_uid) == (tb.study_uid, tb.series_uid)
        for sa, sb in zip(ta.slices, tb.slices, strict=True):
            assert sa.sop_uid == sb.sop_uid and sa.labels == sb.labels
            assert sa.path.read_bytes() == sb.path.read_bytes()
    assert (tmp_path / "a" / "stage_2_train.csv").read_bytes() == (
        tmp_path / "b" / "stage_2_train.csv"
    ).read_bytes()
    c = generate(tmp_path / "c", studies=1, seed=12, n_slices=6, rows=64, cols=64)
    assert c[0].study_uid != a[0].study_uid


def test_quirks_present_and_recoverable(tmp_path: Path) -> None:
    truths = [generate_study(tmp_path, seed=s, n_slices=12, rows=96, cols=96) for s in range(12)]
    seen: set[str] = set()
    for truth in truths:
        rendered = list(render_study(seed=truth.seed, n_slices=12, rows=96, cols=96))
        for sl, rs in zip(truth.slices, rendered, strict=True):
            assert sl.quirk == rs.quirk
            if sl.quirk is None:
                continue
            seen.add(sl.quirk)
            assert sl.quirk in truth.quirk_descriptions
            ds = pydicom.dcmread(sl.path)
            expected = np.rint(rs.hu)
            if sl.quirk == "unsigned_12bit":
                assert (ds.PixelRepresentation, ds.BitsStored) == (0, 12)
                assert float(ds.RescaleIntercept) == 0
                assert _hu(sl.path).max() > 3000  # naive rescale is wrong (air ~3096)
                assert np.array_equal(_rsna_fix_hu(sl.path), expected.clip(-1000, 3095))
            elif sl.quirk == "monochrome1":
                assert ds.PhotometricInterpretation == "MONOCHROME1"
                assert float(ds.RescaleSlope) == -1
                raw = ds.pixel_array
                assert raw[0, 0] > raw[48, 48]  # air stored high
                assert np.array_equal(_hu(sl.path), expected.clip(-1024, 3071))
            else:
                spacing = [float(v) for v in ds.PixelSpacing]
                assert spacing != [230.0 / 96, 230.0 / 96]
                assert tuple(spacing) == pytest.approx(sl.pixel_spacing)
                assert np.array_equal(_hu(sl.path), expected.clip(-1024, 3071))
    assert seen == set(QUIRKS)


def test_quirks_off(tmp_path: Path) -> None:
    truth = generate_study(tmp_path, seed=0, n_slices=12, rows=64, cols=64, quirks=False)
    assert all(sl.quirk is None for sl in truth.slices)
    assert not truth.quirk_descriptions


def test_headers(tmp_path: Path) -> None:
    truth = generate_study(tmp_path, seed=5, n_slices=4, rows=64, cols=64, quirks=False)
    zs = []
    for sl in truth.slices:
        ds = pydicom.dcmread(sl.path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
        assert ds.PatientID == "PHANTOM-5" and str(ds.PatientName) == "PHANTOM^5"
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == 5.0
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40, 80)
        assert ds.pixel_array.dtype == np.int16
        zs.append(float(ds.ImagePositionPatient[2]))
        assert sl.path.parent == tmp_path / truth.study_uid / truth.series_uid
    assert np.allclose(np.diff(zs), 5.0)


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None and not Path("/usr/bin/dciodvfy").exists(),
    reason="dciodvfy (dicom3tools) is not installed",
)
def test_dciodvfy_clean(tmp_path: Path) -> None:
    paths = []
    for seed in range(12):
        truth = generate_study(tmp_path, seed=seed, n_slices=12, rows=64, cols=64)
        paths.append(truth.slices[6].path)
        paths += [sl.path for sl in truth.slices if sl.quirk]
    for path in paths:
        res = subprocess.run(
            ["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
        assert not errors, (path, errors)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_slices"):
        generate_study(tmp_path, seed=0, n_slices=0)
    with pytest.raises(ValueError, match="positive_rate"):
        generate(tmp_path, studies=1, seed=0, positive_rate=2.0)
    with pytest.raises(ValueError, match="studies"):
        generate(tmp_path, studies=0, seed=0)
