"""Synthetic head-CT phantoms with hemorrhages, RSNA-style labels and RSNA data quirks.

One study is one axial CT series of ``n_slices`` 5 mm slices. Anatomy and lesions are
defined in millimetres (patient space), so a slice with a different pixel spacing shows
the same anatomy on a different grid. Everything is drawn from ``numpy.random`` generators
seeded by the study seed; UIDs come from :func:`pydicom.uid.generate_uid` with the seed as
entropy and all dates are fixed, so the same seed gives byte-identical files.

Quirks (``quirks=True``; chosen per study from the seed, at most one per slice):

``"unsigned_12bit"``
    The RSNA "bad RescaleIntercept" files. Written: BitsAllocated 16, BitsStored 12,
    HighBit 11, PixelRepresentation 0 (unsigned), RescaleSlope 1, **RescaleIntercept 0**,
    stored value ``raw = HU mod 4096`` with HU first clipped to [-1000, 3095] (a negative
    HU wraps to ``4096 + HU``, so air reads 3096 and the naive slope/intercept is wrong).
    Recovery (the known fix, J. Howard, Kaggle 2019): when BitsStored == 12,
    PixelRepresentation == 0 and RescaleIntercept > -100, compute ``x = raw + 1000``,
    ``x[x >= 4096] -= 4096`` and use ``HU = x - 1000`` (i.e. stored ``x`` with
    intercept -1000); equivalently ``HU = raw - 4096 where raw >= 3096 else raw``.
``"pixel_spacing"``
    Non-square PixelSpacing (row spacing != column spacing) on a few slices, or a
    different square spacing on a few slices of the series; the pixels are rendered on
    that grid, so resampling by PixelSpacing gives consistent anatomy. HU are normal.
``"monochrome1"``
    PhotometricInterpretation MONOCHROME1 with inverted stored values:
    ``stored = 3071 - HU`` (HU clipped to [-1024, 3071], stored in [0, 4095], int16),
    **RescaleSlope -1, RescaleIntercept 3071**. The Modality LUT alone gives HU
    (``HU = -1 * stored + 3071``); the result must *not* be inverted again. A reader that
    ignores the slope sign, or inverts after rescaling, gets wrong HU.

Other slices: int16, BitsStored 16, ``stored = HU + 1024``, RescaleSlope 1,
RescaleIntercept -1024, MONOCHROME2.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from triage_node.domain import LABELS

__all__ = [
    "QUIRKS",
    "SUBTYPES",
    "Lesion",
    "RenderedSlice",
    "SliceTruth",
    "StudyTruth",
    "generate",
    "generate_study",
    "render_study",
]

#: Hemorrhage subtypes (``LABELS`` without ``any``).
SUBTYPES: tuple[str, ...] = tuple(label for label in LABELS if label != "any")
#: Names of the quirks a slice can carry.
QUIRKS: tuple[str, ...] = ("unsigned_12bit", "pixel_spacing", "monochrome1")

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SLICE_MM = 5.0
FOV_MM = 230.0
_HEAD_A, _HEAD_B = 74.0, 90.0  # outer skull semi-axes (x: left-right, y: ant-post), mm
_SKULL_MM = 7.0
_NOISE_SD = 2.0
_DATE, _TIME = "20240101", "120000"

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Lesion:
    """One hemorrhage, in millimetres; ``params`` depend on the subtype."""

    subtype: str
    z0: float
    half_z: float
    hu: float
    params: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class SliceTruth:
    """Truth for one written slice; ``labels`` maps each of ``LABELS`` to 0 or 1."""

    index: int
    sop_uid: str
    path: Path
    labels: Mapping[str, int]
    quirk: str | None
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True, slots=True)
class StudyTruth:
    """Truth for one written study (one series)."""

    seed: int
    patient_id: str
    study_uid: str
    series_uid: str
    positive: bool
    lesions: tuple[Lesion, ...]
    slices: tuple[SliceTruth, ...]
    series_labels: Mapping[str, int]
    quirk_descriptions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RenderedSlice:
    """HU image of one slice before encoding, with tissue and per-subtype lesion masks."""

    index: int
    hu: FloatArray
    tissue: Mapping[str, BoolArray]
    lesions: Mapping[str, BoolArray]
    quirk: str | None
    pixel_spacing: tuple[float, float]


QUIRK_DESCRIPTIONS: dict[str, str] = {
    "unsigned_12bit": (
        "BitsStored 12, PixelRepresentation 0, RescaleIntercept 0, stored = HU mod 4096; "
        "recover: x = stored + 1000; x[x >= 4096] -= 4096; HU = x - 1000"
    ),
    "pixel_spacing": "PixelSpacing differs from the series' (non-square or another size)",
    "monochrome1": (
        "MONOCHROME1, stored = 3071 - HU, RescaleSlope -1, RescaleIntercept 3071; "
        "HU = slope * stored + intercept, no further inversion"
    ),
}


@dataclass(frozen=True, slots=True)
class _Plan:
    positive: bool
    lesions: tuple[Lesion, ...]
    quirks: tuple[str | None, ...]
    spacings: tuple[tuple[float, float], ...]


def _check(seed: int, n_slices: int, rows: int, cols: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if rows < 32 or cols < 32:
        raise ValueError(f"rows and cols must be >= 32, got {rows}x{cols}")


def _scale(t: float) -> float:
    """Head cross-section scale at relative height ``t`` (0 skull base, 1 vertex)."""
    return math.sqrt(max(1.0 - ((t - 0.45) / 0.62) ** 2, 0.05))


def _t(index: int, n: int) -> float:
    return (index + 0.5) / n


def _ventricle_size(t: float) -> float:
    return max(0.0, 1.0 - ((t - 0.52) / 0.16) ** 2)


def _plan(seed: int, n: int, positive: bool | None, rows: int, cols: int, quirks: bool) -> _Plan:
    rng = np.random.default_rng([seed, 1])
    if positive is None:
        positive = bool(rng.random() < 0.5)
    lesions: list[Lesion] = []
    if positive:
        k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        for subtype in rng.choice(SUBTYPES, size=k, replace=False):
            for _ in range(int(rng.integers(1, 3))):
                lesions.append(_draw_lesion(str(subtype), rng, n))
    base = FOV_MM / max(rows, cols)
    spacings = [(base, base)] * n
    slice_quirks: list[str | None] = [None] * n
    if quirks and n >= 3:
        free = list(rng.permutation(n))
        for quirk in QUIRKS:
            if rng.random() < 0.4:
                for _ in range(int(rng.integers(1, 4))):
                    if not free:
                        break
                    i = int(free.pop())
                    slice_quirks[i] = quirk
                    if quirk == "pixel_spacing":
                        if rng.random() < 0.5:
                            spacings[i] = (base * 1.12, base)
                        else:
                            spacings[i] = (base * 0.9, base * 0.9)
    return _Plan(positive, tuple(lesions), tuple(slice_quirks), tuple(spacings))


def _draw_lesion(subtype: str, rng: np.random.Generator, n: int) -> Lesion:
    height = n * SLICE_MM
    hu = float(rng.uniform(62.0, 78.0))
    theta = float(rng.uniform(0.0, 2.0 * math.pi))
    params: tuple[float, ...]
    if subtype == "epidural":  # lens: max depth, angular half-width
        z0 = height * float(rng.uniform(0.3, 0.75))
        params = (float(rng.uniform(7.0, 14.0)), float(rng.uniform(0.3, 0.55)), theta)
        return Lesion(subtype, z0, float(rng.uniform(8.0, 15.0)), hu, params)
    if subtype == "subdural":  # crescent: thin, long
        z0 = height * float(rng.uniform(0.3, 0.7))
        params = (float(rng.uniform(3.0, 7.0)), float(rng.uniform(0.8, 1.4)), theta)
        return Lesion(subtype, z0, float(rng.uniform(15.0, 30.0)), hu, params)
    if subtype == "intraparenchymal":  # ellipsoid: rb0, theta, rx, ry
        z0 = height * float(rng.uniform(0.3, 0.7))
        params = (
            float(rng.uniform(0.15, 0.55)),
            theta,
            float(rng.uniform(5.0, 14.0)),
            float(rng.uniform(5.0, 14.0)),
        )
        return Lesion(subtype, z0, float(rng.uniform(6.0, 14.0)), hu, params)
    if subtype == "intraventricular":  # side, y centre, radius
        z0 = height * float(rng.uniform(0.46, 0.58))
        params = (
            float(rng.choice([-1.0, 1.0])),
            float(rng.uniform(-12.0, 6.0)),
            float(rng.uniform(10.0, 18.0)),
        )
        return Lesion(subtype, z0, float(rng.uniform(6.0, 12.0)), hu, params)
    # subarachnoid: region radius, theta, midline flag
    z0 = height * float(rng.uniform(0.35, 0.8))
    midline = float(rng.random() < 0.3)
    params = (float(rng.uniform(25.0, 40.0)), theta, midline)
    return Lesion(subtype, z0, float(rng.uniform(10.0, 20.0)), hu, params)


class _Grid:
    """Per-spacing pixel coordinates in mm and the quantities that do not depend on z."""

    def __init__(self, rows: int, cols: int, spacing: tuple[float, float]) -> None:
        dy, dx = spacing
        self.x0 = -dx * cols / 2.0
        self.y0 = -dy * rows / 2.0
        x = (self.x0 + dx * (np.arange(cols, dtype=np.float32) + 0.5)).reshape(1, cols)
        y = (self.y0 + dy * (np.arange(rows, dtype=np.float32) + 0.5)).reshape(rows, 1)
        self.x = np.broadcast_to(x, (rows, cols))
        self.y = np.broadcast_to(y, (rows, cols))
        self.rho = np.hypot(self.x, self.y).astype(np.float32)
        self.theta = np.arctan2(self.y, self.x).astype(np.float32)
        self.r0 = np.sqrt((self.x / _HEAD_A) ** 2 + (self.y / _HEAD_B) ** 2).astype(np.float32)
        self.texture = (
            1.3 * np.sin(self.x / 6.3) * np.cos(self.y / 7.9)
            + 0.7 * np.sin((self.x + self.y) / 4.1)
        ).astype(np.float32)
        self.sulcus_dist = (self.rho * np.abs(np.sin(18.0 * self.theta)) / 18.0).astype(np.float32)
        self.gyral = (0.72 + 0.05 * np.sin(9.0 * self.theta)).astype(np.float32)


def _render(
    plan: _Plan, index: int, n: int, grid: _Grid, seed: int
) -> tuple[FloatArray, dict[str, BoolArray], dict[str, BoolArray]]:
    t = _t(index, n)
    z = index * SLICE_MM
    s = _scale(t)
    r = grid.r0 / np.float32(s)
    k = 1.0 - _SKULL_MM / (min(_HEAD_A, _HEAD_B) * s)
    head = r < 1.0
    brain = r < k
    skull = head & ~brain
    rb = r / np.float32(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(r > 0, grid.rho * (k / np.maximum(r, 1e-6) - 1.0), 1e3)  # to table
    hu = np.full(r.shape, -1000.0, dtype=np.float32)
    u = np.clip((r - k) / (1.0 - k), 0.0, 1.0)
    hu[skull] = (800.0 + 550.0 * np.abs(2.0 * u - 1.0))[skull]
    white = brain & (rb < grid.gyral)
    hu[brain] = (37.0 + grid.texture)[brain]
    hu[white] = (32.0 + grid.texture)[white]
    v = _ventricle_size(t)
    ventricle = np.zeros(r.shape, dtype=np.bool_)
    if v > 0.15:
        for side in (-1.0, 1.0):
            ventricle |= ((grid.x - side * 8.0 * s) / (6.0 * v)) ** 2 + (
                (grid.y + 5.0) / (24.0 * v)
            ) ** 2 < 1.0
        ventricle &= brain
    sulci = brain & (
        ((rb > 0.8) & (grid.sulcus_dist < 0.7))
        | ((np.abs(grid.x) < 0.8) & (rb > 0.3))
        | (depth < 1.2)
    )
    sulci &= ~ventricle
    hu[ventricle] = 8.0
    hu[sulci] = 6.0
    parenchyma = brain & ~ventricle & ~sulci
    lesions: dict[str, BoolArray] = {}
    for lesion in plan.lesions:
        dz = (z - lesion.z0) / lesion.half_z
        if abs(dz) >= 1.0:
            continue
        mask = _lesion_mask(lesion, dz, grid, s, brain, ventricle, sulci, depth, rb)
        if mask.any():
            hu[mask] = lesion.hu + 0.5 * grid.texture[mask]
            prev = lesions.get(lesion.subtype)
            lesions[lesion.subtype] = mask if prev is None else prev | mask
    noise = np.random.default_rng([seed, 2, index]).standard_normal(r.shape, dtype=np.float32)
    hu += np.float32(_NOISE_SD) * noise
    tissue = {
        "air": ~head,
        "skull": skull,
        "parenchyma": parenchyma,
        "csf": ventricle | sulci,
        "ventricle": ventricle,
    }
    return hu, tissue, lesions


def _lesion_mask(
    lesion: Lesion,
    dz: float,
    grid: _Grid,
    s: float,
    brain: BoolArray,
    ventricle: BoolArray,
    sulci: BoolArray,
    depth: FloatArray,
    rb: FloatArray,
) -> BoolArray:
    p = lesion.params
    if lesion.subtype in ("epidural", "subdural"):
        dmax, width, theta0 = p
        dtheta = np.abs(np.angle(np.exp(1j * (grid.theta - theta0))))
        a = dtheta / width
        if lesion.subtype == "epidural":  # biconvex: thickness falls off quadratically
            thick = dmax * (1.0 - a**2 - dz**2)
        else:  # crescent: flat plateau, tapered tips
            thick = dmax * np.sqrt(np.clip(1.0 - a**6, 0.0, None)) * math.sqrt(1.0 - dz**4)
        return np.asarray(brain & (a < 1.0) & (depth < thick))
    if lesion.subtype == "intraparenchymal":
        rb0, theta0, rx, ry = p
        cx = rb0 * _HEAD_A * s * math.cos(theta0)
        cy = rb0 * _HEAD_B * s * math.sin(theta0)
        scale = math.sqrt(1.0 - dz**2)
        inside = ((grid.x - cx) / (rx * scale)) ** 2 + ((grid.y - cy) / (ry * scale)) ** 2 < 1.0
        return np.asarray(inside & brain & (rb < 0.9) & ~ventricle)
    if lesion.subtype == "intraventricular":
        side, cy, radius = p
        rad = radius * math.sqrt(1.0 - dz**2)
        inside = (grid.x - side * 8.0 * s) ** 2 + (grid.y - cy) ** 2 < rad**2
        return np.asarray(inside & ventricle)
    radius, theta0, midline = p  # subarachnoid
    if midline:
        cx, cy = 0.0, 0.6 * _HEAD_B * s * math.copysign(1.0, math.sin(theta0))
    else:
        cx = 0.85 * _HEAD_A * s * math.cos(theta0)
        cy = 0.85 * _HEAD_B * s * math.sin(theta0)
    rad = radius * math.sqrt(1.0 - dz**2)
    return np.asarray(sulci & ((grid.x - cx) ** 2 + (grid.y - cy) ** 2 < rad**2))


def render_study(
    *,
    seed: int,
    n_slices: int = 32,
    positive: bool | None = None,
    rows: int = 512,
    cols: int = 512,
    quirks: bool = True,
) -> Iterator[RenderedSlice]:
    """Yield the HU images and masks :func:`generate_study` writes for the same arguments.

    Parameters
    ----------
    seed, n_slices, positive, rows, cols, quirks
        As for :func:`generate_study`.

    Yields
    ------
    RenderedSlice
        Float HU (noise included, before rounding and encoding), tissue masks
        (``air``, ``skull``, ``parenchyma``, ``csf``, ``ventricle``) and one mask per
        subtype present on the slice.
    """
    _check(seed, n_slices, rows, cols)
    plan = _plan(seed, n_slices, positive, rows, cols, quirks)
    grids: dict[tuple[float, float], _Grid] = {}
    for i in range(n_slices):
        spacing = plan.spacings[i]
        grid = grids.get(spacing)
        if grid is None:
            grid = grids[spacing] = _Grid(rows, cols, spacing)
        hu, tissue, lesions = _render(plan, i, n_slices, grid, seed)
        yield RenderedSlice(i, hu, tissue, lesions, plan.quirks[i], spacing)


def _uid(seed: int, *parts: str) -> str:
    return str(generate_uid(UID_PREFIX, entropy_srcs=["triage-node-phantom", str(seed), *parts]))


def _encode(hu: FloatArray, quirk: str | None) -> tuple[NDArray[np.generic], dict[str, object]]:
    """Stored pixel values and the pixel-module attributes for ``quirk``."""
    h = np.rint(hu)
    if quirk == "unsigned_12bit":
        raw = np.mod(np.clip(h, -1000, 3095), 4096).astype(np.uint16)
        return raw, {
            "BitsStored": 12,
            "HighBit": 11,
            "PixelRepresentation": 0,
            "RescaleIntercept": "0",
            "RescaleSlope": "1",
            "PhotometricInterpretation": "MONOCHROME2",
        }
    if quirk == "monochrome1":
        stored = (3071 - np.clip(h, -1024, 3071)).astype(np.int16)
        return stored, {
            "BitsStored": 16,
            "HighBit": 15,
            "PixelRepresentation": 1,
            "RescaleIntercept": "3071",
            "RescaleSlope": "-1",
            "PhotometricInterpretation": "MONOCHROME1",
        }
    stored = (np.clip(h, -1024, 3071) + 1024).astype(np.int16)
    return stored, {
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "RescaleIntercept": "-1024",
        "RescaleSlope": "1",
        "PhotometricInterpretation": "MONOCHROME2",
    }


def _dataset(
    *,
    seed: int,
    index: int,
    rows: int,
    cols: int,
    uids: Mapping[str, str],
    sop_uid: str,
    spacing: tuple[float, float],
    grid_origin: tuple[float, float],
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = _DATE
    ds.InstanceCreationTime = _TIME
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _DATE
    ds.StudyTime = _TIME
    ds.SeriesTime = ds.AcquisitionTime = "120100"
    ds.ContentTime = f"1201{index % 60:02d}"
    ds.AccessionNumber = f"PH{seed % 10**14:014d}"
    ds.Modality = "CT"
    ds.Manufacturer = "TRIAGE-NODE PHANTOM"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = "HEAD 5mm"
    ds.ManufacturerModelName = "Phantom"
    ds.PatientName = f"PHANTOM^{seed}"
    ds.PatientID = f"PHANTOM-{seed}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.BodyPartExamined = "HEAD"
    ds.ScanOptions = "AXIAL MODE"
    ds.SliceThickness = f"{SLICE_MM:.1f}"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    z = index * SLICE_MM
    dy, dx = spacing
    ds.ImagePositionPatient = [
        f"{grid_origin[0] + dx / 2:.4f}",
        f"{grid_origin[1] + dy / 2:.4f}",
        f"{z:.2f}",
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.2f}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
    ds.BitsAllocated = 16
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    return ds


def _write(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TRIAGE_PHANTOM"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)


def generate_study(
    out_dir: Path,
    *,
    seed: int,
    n_slices: int = 32,
    positive: bool | None = None,
    rows: int = 512,
    cols: int = 512,
    quirks: bool = True,
) -> StudyTruth:
    """Write one synthetic head-CT study and return its truth.

    Parameters
    ----------
    out_dir : Path
        Root folder; files go to ``out_dir/<study_uid>/<series_uid>/<NNNN>.dcm``
        (NNNN = InstanceNumber, 1-based, in z order).
    seed : int
        Seed (>= 0) of everything: anatomy noise, lesions, quirks, UIDs.
    n_slices : int
        Number of 5 mm axial slices (skull base to vertex).
    positive : bool, optional
        Place hemorrhages (``True``), none (``False``) or decide from the seed (``None``).
    rows, cols : int
        Matrix size (>= 32); the field of view is 230 mm.
    quirks : bool
        Emit the RSNA quirks described in the module docstring on a few slices of some
        studies (deterministic per seed).

    Returns
    -------
    StudyTruth
        UIDs, per-slice labels (1 exactly where the slice holds a voxel of that subtype;
        ``any`` is their OR), per-slice quirk and series labels (OR over slices).

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check(seed, n_slices, rows, cols)
    plan = _plan(seed, n_slices, positive, rows, cols, quirks)
    uids = {part: _uid(seed, part) for part in ("study", "series", "frame")}
    series_dir = out_dir / uids["study"] / uids["series"]
    series_dir.mkdir(parents=True, exist_ok=True)
    slices: list[SliceTruth] = []
    grids: dict[tuple[float, float], _Grid] = {}
    for i in range(n_slices):
        spacing = plan.spacings[i]
        grid = grids.get(spacing)
        if grid is None:
            grid = grids[spacing] = _Grid(rows, cols, spacing)
        hu, _, lesion_masks = _render(plan, i, n_slices, grid, seed)
        sop_uid = _uid(seed, "sop", str(i))
        ds = _dataset(
            seed=seed,
            index=i,
            rows=rows,
            cols=cols,
            uids=uids,
            sop_uid=sop_uid,
            spacing=spacing,
            grid_origin=(grid.x0, grid.y0),
        )
        pixels, attrs = _encode(hu, plan.quirks[i])
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.PixelData = pixels.tobytes()
        path = series_dir / f"{i + 1:04d}.dcm"
        _write(ds, path)
        labels = {sub: int(sub in lesion_masks) for sub in SUBTYPES}
        labels["any"] = int(any(labels.values()))
        slices.append(
            SliceTruth(
                i, sop_uid, path, {lab: labels[lab] for lab in LABELS}, plan.quirks[i], spacing
            )
        )
    series_labels = {lab: max(sl.labels[lab] for sl in slices) for lab in LABELS}
    used = {q for q in plan.quirks if q is not None}
    return StudyTruth(
        seed=seed,
        patient_id=f"PHANTOM-{seed}",
        study_uid=uids["study"],
        series_uid=uids["series"],
        positive=plan.positive,
        lesions=plan.lesions,
        slices=tuple(slices),
        series_labels=series_labels,
        quirk_descriptions={q: QUIRK_DESCRIPTIONS[q] for q in sorted(used)},
    )


def generate(
    out_dir: Path,
    *,
    studies: int,
    seed: int,
    positive_rate: float = 0.5,
    n_slices: int = 32,
    rows: int = 512,
    cols: int = 512,
    quirks: bool = True,
) -> list[StudyTruth]:
    """Write ``studies`` studies plus ``stage_2_train.csv`` and ``series_labels.csv``.

    Parameters
    ----------
    out_dir : Path
        Root folder (created if missing).
    studies : int
        Number of studies (>= 1).
    seed : int
        Master seed (>= 0); study ``k`` uses a seed derived from ``(seed, k)``.
    positive_rate : float
        Probability in [0, 1] that a study has hemorrhages.
    n_slices, rows, cols, quirks
        As for :func:`generate_study`.

    Returns
    -------
    list of StudyTruth
        One per study, in order. ``stage_2_train.csv`` has the RSNA layout (``ID,Label``
        with ``ID_<SOPInstanceUID>_<label>``, six rows per slice in ``LABELS`` order);
        ``series_labels.csv`` has ``StudyInstanceUID,SeriesInstanceUID`` and the six labels.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    if not 0.0 <= positive_rate <= 1.0:
        raise ValueError(f"positive_rate must be in [0, 1], got {positive_rate}")
    _check(seed, n_slices, rows, cols)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    truths: list[StudyTruth] = []
    for k in range(studies):
        study_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        positive = bool(rng.random() < positive_rate)
        truths.append(
            generate_study(
                out_dir,
                seed=study_seed,
                n_slices=n_slices,
                positive=positive,
                rows=rows,
                cols=cols,
                quirks=quirks,
            )
        )
    with (out_dir / "stage_2_train.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ID", "Label"])
        for truth in truths:
            for sl in truth.slices:
                for lab in LABELS:
                    writer.writerow([f"ID_{sl.sop_uid}_{lab}", sl.labels[lab]])
    with (out_dir / "series_labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "SeriesInstanceUID", *LABELS])
        for truth in truths:
            writer.writerow(
                [truth.study_uid, truth.series_uid, *(truth.series_labels[lab] for lab in LABELS)]
            )
    return truths
