"""Tests of triage_node.preprocess against hand-computed values and the phantom's quirks."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from triage_node.errors import InvalidDatasetError
from triage_node.phantom import RenderedSlice, generate_study, render_study
from triage_node.preprocess import (
    DEFAULT_WINDOWS,
    PreprocessSpec,
    Window,
    order_slices,
    preprocess_series,
    preprocess_slice,
    resize,
    slice_position,
    to_hu,
    window,
)

# Seed 2 with 8 slices carries all three quirks (checked in test_phantom_has_all_quirks).
SEED, N_SLICES, SIDE = 2, 8, 64
REALDATA = Path("/work/shared/realdata/ts_cornerstone")


@pytest.fixture(scope="module")
def study(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[Dataset], list[RenderedSlice]]]:
    out = tmp_path_factory.mktemp("phantom")
    truth = generate_study(out, seed=SEED, n_slices=N_SLICES, rows=SIDE, cols=SIDE)
    rendered = list(render_study(seed=SEED, n_slices=N_SLICES, rows=SIDE, cols=SIDE))
    datasets: list[Dataset] = [pydicom.dcmread(s.path) for s in truth.slices]
    yield datasets, rendered


def test_phantom_has_all_quirks(study: tuple[list[Dataset], list[RenderedSlice]]) -> None:
    _, rendered = study
    assert {r.quirk for r in rendered} >= {"unsigned_12bit", "pixel_spacing", "monochrome1"}


# --- windows -------------------------------------------------------------------------------


def test_window_hand_computed() -> None:
    hu = np.array([[-1000.0, 0.0, 20.0], [40.0, 60.0, 80.0], [100.0, 230.0, 3000.0]])
    out = window(hu, DEFAULT_WINDOWS)
    assert out.shape == (3, 3, 3)
    assert out.dtype == np.float32
    # brain 40/80: [0, 80]
    np.testing.assert_allclose(
        out[0], [[0.0, 0.0, 0.25], [0.5, 0.75, 1.0], [1.0, 1.0, 1.0]], atol=1e-7
    )
    # subdural 80/200: [-20, 180]
    np.testing.assert_allclose(
        out[1], [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5], [0.6, 1.0, 1.0]], atol=1e-6
    )
    # soft tissue 40/380: [-150, 230]
    np.testing.assert_allclose(
        out[2],
        [[0.0, 150 / 380, 170 / 380], [190 / 380, 210 / 380, 230 / 380], [250 / 380, 1.0, 1.0]],
        atol=1e-6,
    )


def test_window_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        window(np.zeros((2, 3, 3)), DEFAULT_WINDOWS)
    with pytest.raises(ValueError, match="empty"):
        window(np.zeros((3, 3)), [])
    with pytest.raises(ValueError, match="width"):
        Window(40, 0)


# --- HU ------------------------------------------------------------------------------------


def _expected_hu(true_hu: NDArray[Any], quirk: str | None) -> NDArray[Any]:
    """What the writer stored, as HU: rounded, clipped to the quirk's range."""
    low = -1000 if quirk == "unsigned_12bit" else -1024
    high = 3095 if quirk == "unsigned_12bit" else 3071
    out: NDArray[Any] = np.clip(np.rint(true_hu), low, high)
    return out


def test_to_hu_matches_truth_on_every_quirk(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, rendered = study
    for ds, r in zip(datasets, rendered, strict=True):
        hu = to_hu(ds)
        assert hu.dtype == np.float32
        assert hu.shape == (SIDE, SIDE)
        np.testing.assert_array_equal(hu, _expected_hu(r.hu, r.quirk), err_msg=f"quirk {r.quirk}")
        # and within rounding of the renderer's float HU wherever it is in range
        inside = (r.hu > -1000) & (r.hu < 3071)
        assert np.max(np.abs(hu[inside] - r.hu[inside])) <= 0.5 + 1e-4


def test_naive_rescale_is_wrong_for_unsigned_quirk(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, rendered = study
    pairs = [
        (ds, r) for ds, r in zip(datasets, rendered, strict=True) if r.quirk == "unsigned_12bit"
    ]
    assert pairs
    for ds, r in pairs:
        naive = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        expected = _expected_hu(r.hu, r.quirk)
        assert not np.array_equal(naive, expected)
        assert naive.max() >= 3096  # air reads as dense bone without the fix
        np.testing.assert_array_equal(to_hu(ds), expected)


def test_monochrome1_is_not_inverted_again(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, rendered = study
    pairs = [(ds, r) for ds, r in zip(datasets, rendered, strict=True) if r.quirk == "monochrome1"]
    assert pairs
    for ds, r in pairs:
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert float(ds.RescaleSlope) == -1.0
        np.testing.assert_array_equal(to_hu(ds), _expected_hu(r.hu, r.quirk))
    # tag-only variant: MONOCHROME1 on ordinary data (slope +1) - HU from the LUT alone
    ds, r = next((d, x) for d, x in zip(datasets, rendered, strict=True) if x.quirk is None)
    tagged = copy.deepcopy(ds)
    tagged.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(to_hu(tagged), _expected_hu(r.hu, None))


def test_to_hu_without_intercept_skips_12bit_fix() -> None:
    ds = _bare_dataset(np.array([[0, 100], [3096, 4095]], dtype=np.uint16), bits_stored=12)
    np.testing.assert_array_equal(to_hu(ds), [[0, 100], [3071, 3071]])
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    np.testing.assert_array_equal(to_hu(ds), [[0, 100], [-1000, -1]])


def test_to_hu_errors() -> None:
    with pytest.raises(InvalidDatasetError, match="PixelData"):
        to_hu(Dataset())
    ds = _bare_dataset(np.zeros((2, 4, 4), dtype=np.int16), bits_stored=16)
    with pytest.raises(InvalidDatasetError, match="one grey-scale frame"):
        to_hu(ds)


def _bare_dataset(pixels: NDArray[Any], *, bits_stored: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0 if pixels.dtype == np.uint16 else 1
    ds.PixelData = pixels.tobytes()
    return ds


_LOSSLESS = [
    "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
    "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
    "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
    "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
]


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} not present on this machine")
@pytest.mark.parametrize("name", _LOSSLESS)
def test_to_hu_compressed_lossless_equals_uncompressed(name: str) -> None:
    reference = to_hu(pydicom.dcmread(REALDATA / "CTImage.dcm"))
    ds = pydicom.dcmread(REALDATA / name)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    hu = to_hu(ds)
    np.testing.assert_array_equal(hu, reference)
    assert hu.min() >= -1024 and hu.max() <= 3071
    out = preprocess_slice(ds, PreprocessSpec(size=128))
    assert out.shape == (3, 128, 128)


def test_to_hu_pydicom_jpeg2000() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPEG2000.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test file JPEG2000.dcm not installed")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    hu = to_hu(ds)
    assert hu.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(hu).all()
    assert hu.std() > 0


# --- ordering ------------------------------------------------------------------------------


def test_order_slices_restores_phantom_order(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, _ = study
    perm = np.random.default_rng(0).permutation(len(datasets))
    shuffled = [datasets[i] for i in perm]
    order = order_slices(shuffled)
    assert [int(shuffled[i].InstanceNumber) for i in order] == list(range(1, N_SLICES + 1))


def _oblique_slices(n: int, tilt_deg: float) -> list[Dataset]:
    """Slices of a gantry-tilted series, in order, with large in-plane origin shifts."""
    a = math.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(a), math.sin(a)])
    normal = np.cross(row, col)
    shifts = np.random.default_rng(1).uniform(-150, 150, size=n)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ipp = np.array([-100.0, -100.0, 20.0]) + 5.0 * i * normal + shifts[i] * col
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.InstanceNumber = n - i  # deliberately misleading
        out.append(ds)
    return out


def test_order_slices_oblique() -> None:
    slices = _oblique_slices(12, 25.0)
    positions = [slice_position(ds) for ds in slices]
    np.testing.assert_allclose(np.diff(positions), 5.0, atol=1e-3)
    # the z-fallback alone would get this series wrong, so the normal matters
    z_order = sorted(range(12), key=lambda i: float(slices[i].ImagePositionPatient[2]))
    assert z_order != list(range(12))
    perm = list(np.random.default_rng(2).permutation(12))
    shuffled = [slices[i] for i in perm]
    assert [perm[i] for i in order_slices(shuffled)] == list(range(12))


def test_order_slices_fallbacks_and_stability() -> None:
    a, b, c, d = Dataset(), Dataset(), Dataset(), Dataset()
    a.ImagePositionPatient = ["0", "0", "10"]  # no orientation: z
    b.ImagePositionPatient = ["0", "0", "-5"]
    c.InstanceNumber = 3  # no position: instance number
    d.ImagePositionPatient = ["0", "0", "-5"]  # duplicate of b, keeps its place after b
    assert slice_position(a) == 10.0
    assert slice_position(c) == 3.0
    assert order_slices([a, b, c, d]) == [1, 3, 2, 0]
    with pytest.raises(InvalidDatasetError, match="cannot order"):
        slice_position(Dataset())


# --- resize and spacing --------------------------------------------------------------------


def test_resize_area_is_block_mean() -> None:
    x = np.random.default_rng(3).random((3, 64, 64), dtype=np.float32)
    out = resize(x, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, x.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4)), atol=1e-6)
    up = resize(x, 96)
    assert up.shape == (3, 96, 96)
    assert up.min() >= 0.0 and up.max() <= 1.0


def _disk(rows: int, cols: int, spacing: tuple[float, float], radius_mm: float) -> NDArray[Any]:
    dy, dx = spacing
    y = (np.arange(rows) + 0.5 - rows / 2) * dy
    x = (np.arange(cols) + 0.5 - cols / 2) * dx
    return ((y[:, None] ** 2 + x[None, :] ** 2) < radius_mm**2).astype(np.float32)[None]


def _extent(mask: NDArray[Any]) -> tuple[int, int]:
    m = mask[0] > 0.5
    return int(m.any(axis=1).sum()), int(m.any(axis=0).sum())


def test_resize_corrects_non_square_spacing() -> None:
    spacing = (1.2, 1.0)  # rows are 1.2 mm apart: the matrix squashes the disk in y
    disk = _disk(100, 100, spacing, 40.0)
    h, w = _extent(disk)
    assert h < w - 10  # squashed on the matrix
    out = resize(disk, 120, spacing=spacing)  # fov 120 mm -> 1 mm pixels
    h, w = _extent(out)
    assert abs(h - w) <= 1 and abs(h - 80) <= 2
    assert out[0, 0, 0] == 0.0  # padded with air


def test_resize_common_fov_gives_same_scale() -> None:
    a = resize(_disk(100, 100, (1.0, 1.0), 30.0), 100, fov_mm=100.0)
    b = resize(_disk(100, 100, (0.9, 0.9), 30.0), 100, spacing=(0.9, 0.9), fov_mm=100.0)
    assert _extent(_disk(100, 100, (0.9, 0.9), 30.0))[0] >= 66  # larger on its own grid
    assert abs(_extent(a)[0] - _extent(b)[0]) <= 2
    assert abs(_extent(a)[0] - 60) <= 2


def test_series_pixel_spacing_quirk_matches_neighbour_scale(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, rendered = study
    out = preprocess_series(datasets, PreprocessSpec(size=SIDE))
    soft = out[:, 2]  # soft-tissue window: head (> -150 HU) vs air
    widths = [int((s > 0.5).any(axis=0).sum()) for s in soft]
    heights = [int((s > 0.5).any(axis=1).sum()) for s in soft]
    for i, r in enumerate(rendered):
        if r.quirk == "pixel_spacing" and 0 < i < N_SLICES - 1:
            # the head's size on a quirk slice lies between its neighbours' (within a pixel)
            for size in (widths, heights):
                lo, hi = sorted((size[i - 1], size[i + 1]))
                assert lo - 2 <= size[i] <= hi + 2, (i, size)


# --- series and spec -----------------------------------------------------------------------


def test_preprocess_series_shapes_and_edges(
    study: tuple[list[Dataset], list[RenderedSlice]],
) -> None:
    datasets, _ = study
    s0 = PreprocessSpec(size=32)
    s1 = PreprocessSpec(size=32, context=1)
    out0 = preprocess_series(datasets, s0)
    out1 = preprocess_series(datasets, s1)
    assert s0.channels == 3 and s1.channels == 9
    assert out0.shape == (N_SLICES, 3, 32, 32) and out0.dtype == np.float32
    assert out1.shape == (N_SLICES, 9, 32, 32)
    assert out0.min() >= 0.0 and out0.max() <= 1.0
    for i in range(N_SLICES):
        prev, nxt = max(i - 1, 0), min(i + 1, N_SLICES - 1)
        np.testing.assert_array_equal(out1[i, 0:3], out0[prev])
        np.testing.assert_array_equal(out1[i, 3:6], out0[i])
        np.testing.assert_array_equal(out1[i, 6:9], out0[nxt])
    np.testing.assert_array_equal(out1[0, 0:3], out1[0, 3:6])  # edge replicates itself
    np.testing.assert_array_equal(out1[-1, 6:9], out1[-1, 3:6])
    # a slice with the series' own spacing comes out as preprocess_slice makes it
    np.testing.assert_array_equal(out0[3], preprocess_slice(datasets[3], s0))
    with pytest.raises(ValueError, match="empty"):
        preprocess_series([], s0)


def test_preprocess_deterministic(study: tuple[list[Dataset], list[RenderedSlice]]) -> None:
    datasets, _ = study
    spec = PreprocessSpec(size=48, context=2)
    a = preprocess_series(datasets, spec)
    b = preprocess_series([copy.deepcopy(ds) for ds in datasets], spec)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (N_SLICES, 15, 48, 48)


def test_spec_round_trip() -> None:
    spec = PreprocessSpec(windows=(Window(40, 80), Window(600, 2800.5)), size=128, context=2)
    d = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(d) == spec
    assert PreprocessSpec.from_dict(PreprocessSpec().to_dict()) == PreprocessSpec()
    assert PreprocessSpec().channels == 3 and spec.channels == 10


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"size": 0}, "'size'"),
        ({"size": "256"}, "'size'"),
        ({"size": True}, "'size'"),
        ({"context": -1}, "'context'"),
        ({"windows": []}, "'windows'"),
        ({"windows": [{"center": 40, "width": 80}, {"center": 1, "width": -5}]}, "'windows[1]'"),
        ({"windows": [{"center": "x", "width": 80}]}, "'windows[0]'"),
        ({"windows": [{"center": 40}]}, "'windows[0]'"),
        ({"extra": 1}, "'extra'"),
    ],
)
def test_spec_from_dict_names_bad_key(patch: dict[str, object], key: str) -> None:
    d = {**PreprocessSpec().to_dict(), **patch}
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        PreprocessSpec.from_dict(d)


def test_spec_from_dict_missing_key() -> None:
    d = PreprocessSpec().to_dict()
    del d["context"]
    with pytest.raises(ValueError, match="'context'"):
        PreprocessSpec.from_dict(d)
