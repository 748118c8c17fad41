"""Write synthetic DICOM files for tests.

Everything here is made up: a head-shaped phantom (air, skull ring, brain, a few noise
blobs) in CT Image Storage instances that pass ``dciodvfy``. Other tests import
:func:`make_ct_series` for whole series and :func:`make_instance` for one-off files (a
localizer, a Secondary Capture, an MR image, hostile UIDs).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "UID_PREFIX",
    "make_ct_series",
    "make_instance",
]

#: Root of every UID we generate (pydicom's own root; good enough for synthetic data).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

Kind = Literal["ct", "localizer", "sc", "mr"]

_SLICE_SPACING_MM = 5.0
_PIXEL_SPACING_MM = 0.45
_INTERCEPT = -1024  # stored value = HU + 1024


def make_ct_series(
    out_dir: Path,
    n: int,
    *,
    rows: int = 512,
    cols: int = 512,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM-1",
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    **overrides: Any,
) -> list[Path]:
    """Write an axial head CT series of ``n`` slices and return their paths in slice order.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created if missing); files are named ``CT_0001.dcm``...
    n : int
        Number of slices (>= 1). Slice ``i`` (0-based) sits at z = 5 * i mm and has
        InstanceNumber ``i + 1``.
    rows, cols : int
        Matrix size.
    study_uid, series_uid : str, optional
        UIDs to use; fresh ones are generated when omitted.
    patient_id : str
        PatientID of every slice.
    transfer_syntax : str
        Transfer syntax of the files: implicit/explicit VR little endian, explicit VR big
        endian, deflated, or any syntax ``Dataset.compress`` can encode (RLE Lossless,
        JPEG 2000 / JPEG-LS with the pylibjpeg encoders).
    seed : int
        Seed of the per-slice noise; the same seed gives the same pixels.
    **overrides : Any
        DICOM keywords set on every slice after the defaults (``None`` deletes).

    Returns
    -------
    list of Path
        The written files, ordered by InstanceNumber.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(UID_PREFIX)
    series_uid = series_uid or generate_uid(UID_PREFIX)
    frame_uid = generate_uid(UID_PREFIX)
    rng = np.random.default_rng(seed)
    phantom = _Phantom(rows, cols)
    paths: list[Path] = []
    for index in range(n):
        pixels = phantom.slice(index / max(n - 1, 1), rng)
        ds = _ct_dataset(
            pixels,
            index=index,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            patient_id=patient_id,
        )
        _apply_overrides(ds, overrides)
        path = out_dir / f"CT_{index + 1:04d}.dcm"
        _write(ds, path, UID(transfer_syntax), pixels)
        paths.append(path)
    return paths


def make_instance(
    path: Path,
    *,
    kind: Kind = "ct",
    rows: int = 64,
    cols: int = 64,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write one small image of ``kind``, changed by ``overrides``, and return ``path``.

    The file meta (Media Storage SOP Class / Instance UID) follows the final dataset, so
    overriding ``SOPClassUID`` or ``SOPInstanceUID`` is enough. Values are written as given,
    valid or not (UIDs such as ``"../../x"`` or ``"1.2/3"`` are allowed on purpose).

    Parameters
    ----------
    path : Path
        File to write (parent folders are created).
    kind : {"ct", "localizer", "sc", "mr"}
        Starting point: an axial CT slice, a CT localizer (ImageType ``...\\LOCALIZER``,
        lateral), a Secondary Capture (modality OT) or an MR image, each valid for
        ``dciodvfy``.
    rows, cols : int
        Matrix size.
    transfer_syntax : str
        As for :func:`make_ct_series`.
    seed : int
        Seed of the noise.
    **overrides : Any
        DICOM keywords and values applied after ``kind``, ``None`` to delete an element,
        e.g. ``SOPInstanceUID="../../x"`` or ``StudyInstanceUID=study_uid``.

    Returns
    -------
    Path
        ``path``.
    """
    pixels = _Phantom(rows, cols).slice(0.5, np.random.default_rng(seed))
    ds = _ct_dataset(
        pixels,
        index=0,
        study_uid=generate_uid(UID_PREFIX),
        series_uid=generate_uid(UID_PREFIX),
        frame_uid=generate_uid(UID_PREFIX),
        patient_id="PHANTOM-1",
    )
    _apply_overrides(ds, _KINDS[kind])
    _apply_overrides(ds, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(ds, path, UID(transfer_syntax), pixels)
    return path


_CT_ONLY: dict[str, Any] = dict.fromkeys(
    [
        "ScanOptions",
        "KVP",
        "DataCollectionDiameter",
        "ReconstructionDiameter",
        "GantryDetectorTilt",
        "TableHeight",
        "RotationDirection",
        "ExposureTime",
        "XRayTubeCurrent",
        "Exposure",
        "ConvolutionKernel",
        "RescaleType",
    ]
)
_IMAGE_PLANE: dict[str, Any] = dict.fromkeys(
    [
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SliceLocation",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "PatientPosition",
        "AcquisitionDate",
        "AcquisitionTime",
        "AcquisitionNumber",
    ]
)
_KINDS: dict[str, dict[str, Any]] = {
    "ct": {},
    "localizer": {
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "SeriesDescription": "Scout",
        "SeriesNumber": 1,
        "ImageOrientationPatient": ["0", "1", "0", "0", "0", "-1"],
        "RescaleType": None,
    },
    "sc": {
        **_CT_ONLY,
        **_IMAGE_PLANE,
        "SOPClassUID": SECONDARY_CAPTURE_IMAGE_STORAGE,
        "Modality": "OT",
        "ImageType": ["DERIVED", "SECONDARY"],
        "ConversionType": "WSD",
        "PatientOrientation": ["L", "P"],
        "SeriesDescription": "Exam Summary",
        "SeriesNumber": 999,
        "RescaleType": "US",
    },
    "mr": {
        **_CT_ONLY,
        "RescaleIntercept": None,
        "RescaleSlope": None,
        "SOPClassUID": MR_IMAGE_STORAGE,
        "Modality": "MR",
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
        "ScanOptions": "",
        "ScanningSequence": "SE",
        "SequenceVariant": "NONE",
        "MRAcquisitionType": "2D",
        "RepetitionTime": "500",
        "EchoTime": "15",
        "EchoTrainLength": "1",
        "MagneticFieldStrength": "1.5",
        "StudyDescription": "MR HEAD",
        "SeriesDescription": "T1 AX",
    },
}


class _Phantom:
    """Precomputed geometry of an elliptical head; one cheap numpy pass per slice."""

    def __init__(self, rows: int, cols: int) -> None:
        if rows < 8 or cols < 8:
            raise ValueError(f"rows and cols must be >= 8, got {rows}x{cols}")
        y, x = np.ogrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
        self.rows, self.cols = rows, cols
        self.radius2 = (x / 0.80) ** 2 + (y / 0.92) ** 2  # normalised elliptic radius^2

    def slice(self, t: float, rng: np.random.Generator) -> NDArray[np.int16]:
        """Stored values for relative height ``t`` in [0, 1] (skull shrinks near the top)."""
        scale = 1.0 - 0.55 * t**2
        r2 = self.radius2 / (scale * scale)
        hu = np.full((self.rows, self.cols), -1000.0, dtype=np.float32)
        hu[r2 < 1.0] = 1000.0  # skull
        hu[r2 < 0.82] = 35.0  # brain
        hu += 8.0 * rng.standard_normal(hu.shape, dtype=np.float32)
        # A couple of small blobs whose place depends on the slice: content differs per slice.
        for _ in range(2):
            cy, cx = (
                rng.integers(self.rows // 4, 3 * self.rows // 4),
                rng.integers(self.cols // 4, 3 * self.cols // 4),
            )
            radius = max(self.rows // 32, 1)
            y0, y1 = max(cy - radius, 0), min(cy + radius, self.rows)
            x0, x1 = max(cx - radius, 0), min(cx + radius, self.cols)
            hu[y0:y1, x0:x1] += 30.0
        return np.clip(hu - _INTERCEPT, -(2**15), 2**15 - 1).astype(np.int16)


def _ct_dataset(
    pixels: NDArray[np.int16],
    *,
    index: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    patient_id: str,
) -> Dataset:
    """A complete CT Image Storage dataset (no file meta yet) for one slice."""
    rows, cols = pixels.shape
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid(UID_PREFIX)
    ds.InstanceCreationDate = "20240101"
    ds.InstanceCreationTime = "120000"
    # General Study / Patient
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.AcquisitionDate = "20240101"
    ds.ContentDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesTime = "120100"
    ds.AcquisitionTime = "120100"
    ds.ContentTime = f"1201{index % 60:02d}"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "TRIAGE-NODE TESTS"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "HEAD 5mm"
    ds.ManufacturerModelName = "Phantom"
    ds.PatientName = "PHANTOM^HEAD"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.BodyPartExamined = "HEAD"
    # CT acquisition
    ds.ScanOptions = "AXIAL MODE"
    ds.SliceThickness = f"{_SLICE_SPACING_MM:.1f}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "250"
    ds.ReconstructionDiameter = f"{_PIXEL_SPACING_MM * cols:.1f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "300"
    ds.Exposure = "300"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [
        f"{-_PIXEL_SPACING_MM * cols / 2:.2f}",
        f"{-_PIXEL_SPACING_MM * rows / 2:.2f}",
        f"{index * _SLICE_SPACING_MM:.2f}",
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{index * _SLICE_SPACING_MM:.2f}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{_PIXEL_SPACING_MM:.2f}", f"{_PIXEL_SPACING_MM:.2f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()  # little endian int16; big endian is swapped in _write
    return ds


def _apply_overrides(ds: Dataset, overrides: Mapping[str, Any]) -> None:
    """Set (or with ``None`` delete) keyword elements; invalid values are kept on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about hostile UIDs we want to write
        for keyword, value in overrides.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)


def _write(ds: Dataset, path: Path, transfer_syntax: UID, pixels: NDArray[np.int16]) -> None:
    """Add a File Meta and write ``ds`` in ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TRIAGE_TESTS"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid(UID_PREFIX))
        ds.file_meta = meta
        if transfer_syntax.is_compressed:
            if "PixelData" in ds:
                ds.compress(
                    transfer_syntax,
                    pixels.reshape(ds.Rows, ds.Columns),
                    generate_instance_uid=False,
                )
        elif transfer_syntax == ExplicitVRBigEndian and "PixelData" in ds:
            ds.PixelData = pixels.astype(">i2").tobytes()
        dcmwrite(path, ds, enforce_file_format=True)
