"""The one preprocessing of triage-node: DICOM slice -> windowed, resized model input.

Training and inference both call :func:`preprocess_series` (or :func:`preprocess_slice`)
with the :class:`PreprocessSpec` stored in the model artifact, so the two never drift.

Steps for one slice:

1. :func:`to_hu` - stored values to Hounsfield units with the Modality LUT
   (``RescaleSlope`` / ``RescaleIntercept``), the RSNA 12-bit fix, clipped to [-1024, 3071].
2. :func:`window` - one channel per :class:`Window`, scaled to [0, 1] with MONAI's
   ``ScaleIntensityRange`` (clipped). Windowing happens at full resolution, before resizing,
   so partial-volume pixels at the skull edge keep their in-window contrast after averaging.
3. :func:`resize` - to ``size x size`` square pixels: the slice's physical extent
   (``Rows x PixelSpacing[0]`` by ``Columns x PixelSpacing[1]``) is mapped onto the output
   with one interpolation, aspect ratio kept, centred, zero padded (0 is air in every
   window). Non-square ``PixelSpacing`` is therefore corrected without a separate isotropic
   resampling step. :func:`preprocess_series` additionally maps every slice to the same
   field of view (the series' median), so a slice written with a different pixel spacing
   shows the anatomy at the same scale as its neighbours.

2.5D context (``PreprocessSpec.context = k``): slice ``i`` gets the windows of slices
``i-k .. i+k`` stacked as channels in that order, indices clamped at the ends (the edge slice
is replicated).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms.intensity.array import ScaleIntensityRange
from monai.transforms.spatial.array import Resize
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from triage_node.domain import position_along_normal
from triage_node.errors import InvalidDatasetError

__all__ = [
    "DEFAULT_WINDOWS",
    "HU_MAX",
    "HU_MIN",
    "PreprocessSpec",
    "Window",
    "context_indices",
    "order_slices",
    "preprocess_series",
    "preprocess_slice",
    "resize",
    "series_fov",
    "slice_position",
    "to_hu",
    "window",
]

#: HU range kept by :func:`to_hu` (the 12-bit CT range).
HU_MIN = -1024.0
HU_MAX = 3071.0

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Window:
    """An intensity window in HU: ``[center - width / 2, center + width / 2]`` maps to [0, 1].

    Parameters
    ----------
    center : float
        Window level (HU).
    width : float
        Window width (HU), > 0.
    """

    center: float
    width: float

    def __post_init__(self) -> None:
        for name in ("center", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Window.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Window.{name} must be finite, got {value!r}")
        if self.width <= 0:
            raise ValueError(f"Window.width must be > 0, got {self.width!r}")

    @property
    def low(self) -> float:
        """Lowest HU of the window (maps to 0)."""
        return float(self.center) - float(self.width) / 2.0

    @property
    def high(self) -> float:
        """Highest HU of the window (maps to 1)."""
        return float(self.center) + float(self.width) / 2.0


#: Brain (40/80), subdural (80/200), soft tissue (40/380).
DEFAULT_WINDOWS: tuple[Window, ...] = (Window(40, 80), Window(80, 200), Window(40, 380))

_SPEC_KEYS = ("windows", "size", "context")


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """What the model expects as input; travels inside the model artifact.

    Parameters
    ----------
    windows : tuple of Window
        One output channel per window, in this order.
    size : int
        Output is ``size x size`` pixels (>= 8).
    context : int
        2.5D context: neighbouring slices on each side stacked as extra channels (>= 0).
    """

    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    size: int = 256
    context: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.windows, tuple) or not self.windows:
            raise ValueError(f"windows must be a non-empty tuple of Window, got {self.windows!r}")
        for w in self.windows:
            if not isinstance(w, Window):
                raise TypeError(f"windows must hold Window objects, got {w!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an int >= 8, got {self.size!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"context must be an int >= 0, got {self.context!r}")

    @property
    def channels(self) -> int:
        """Number of input channels: ``len(windows) * (2 * context + 1)``."""
        return len(self.windows) * (2 * self.context + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, read back by :meth:`from_dict`.

        Returns
        -------
        dict
            ``{"windows": [{"center": c, "width": w}, ...], "size": n, "context": k}``.
        """
        return {
            "windows": [{"center": float(w.center), "width": float(w.width)} for w in self.windows],
            "size": self.size,
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        """Build a spec from :meth:`to_dict` output, validating every key.

        Parameters
        ----------
        d : Mapping
            Keys ``windows`` (list of ``{"center", "width"}`` mappings), ``size``, ``context``.

        Returns
        -------
        PreprocessSpec

        Raises
        ------
        ValueError
            If a key is missing, unknown or holds a bad value; the message names the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocess spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"preprocess spec: unknown key(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in _SPEC_KEYS if k not in d]
        if missing:
            raise ValueError(f"preprocess spec: missing key(s) {', '.join(map(repr, missing))}")
        raw = d["windows"]
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence) or not raw:
            raise ValueError(
                f"preprocess spec key 'windows': expected a non-empty list, got {raw!r}"
            )
        windows: list[Window] = []
        for i, item in enumerate(raw):
            key = f"windows[{i}]"
            if not isinstance(item, Mapping) or set(item) != {"center", "width"}:
                raise ValueError(
                    f"preprocess spec key {key!r}: expected {{'center', 'width'}}, got {item!r}"
                )
            try:
                windows.append(Window(item["center"], item["width"]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"preprocess spec key {key!r}: {exc}") from exc
        for key in ("size", "context"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"preprocess spec key {key!r}: expected an int, got {v!r}")
        try:
            return cls(tuple(windows), d["size"], d["context"])
        except (TypeError, ValueError) as exc:
            key = "size" if "size" in str(exc) else "context"
            raise ValueError(f"preprocess spec key {key!r}: {exc}") from exc


def _rescale(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept, defaulting to identity."""
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise InvalidDatasetError(f"bad RescaleSlope/RescaleIntercept: {exc}") from exc
    return slope, intercept


def to_hu(ds: Dataset) -> FloatArray:
    """Hounsfield units of a single-frame CT slice.

    ``HU = RescaleSlope * stored + RescaleIntercept``, then clipped to [-1024, 3071].

    * **RSNA 12-bit fix** (J. Howard, Kaggle 2019): when ``BitsStored == 12``,
      ``PixelRepresentation == 0`` and a ``RescaleIntercept`` is present and > -100, the
      stored values are HU wrapped modulo 4096 with the intercept lost. They are unwrapped
      as ``x = stored + 1000; x[x >= 4096] -= 4096`` and rescaled with intercept -1000
      (``HU = slope * x - 1000``). Files without a RescaleIntercept are left alone.
    * **MONOCHROME1**: the photometric interpretation is a *display* attribute applied
      after the Modality LUT, so HU come from slope/intercept alone and are never inverted.
      That is right for both variants: the phantom's (stored ``3071 - HU`` with slope -1,
      intercept 3071) and the tag-only one (MONOCHROME1 on otherwise ordinary data, slope
      +1). A non-conformant file whose stored values are inverted but whose slope is
      positive cannot be told apart from the tag-only variant by its header; guessing from
      the pixel histogram is not safe, so such files are not "fixed".
    * A ``ModalityLUTSequence`` (rare in CT) is applied with pydicom's
      ``apply_modality_lut`` instead of slope/intercept.

    Compressed transfer syntaxes are decoded by pydicom's pixel handlers (pylibjpeg, gdcm).

    Parameters
    ----------
    ds : pydicom.Dataset
        A CT image with pixel data, one frame, one sample per pixel.

    Returns
    -------
    numpy.ndarray
        ``(Rows, Columns)`` float32 HU.

    Raises
    ------
    InvalidDatasetError
        If the pixel data is missing, cannot be decoded, or is not one grey-scale frame.
    """
    if "PixelData" not in ds:
        raise InvalidDatasetError("dataset has no PixelData")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types (NotImplementedError, ValueError...)
        raise InvalidDatasetError(f"cannot decode pixel data: {exc}") from exc
    if raw.ndim != 2:
        raise InvalidDatasetError(
            f"expected one grey-scale frame, got pixel array of shape {raw.shape}"
        )
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels.processing import apply_modality_lut

        hu = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    else:
        slope, intercept = _rescale(ds)
        if (
            ds.get("BitsStored") == 12
            and ds.get("PixelRepresentation") == 0
            and "RescaleIntercept" in ds
            and intercept > -100
        ):
            x = raw.astype(np.int32) + 1000
            x[x >= 4096] -= 4096
            raw, intercept = x, -1000.0
        hu = raw.astype(np.float32)
        if slope != 1.0:
            hu *= np.float32(slope)
        if intercept != 0.0:
            hu += np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu


def _to_numpy(x: Any) -> FloatArray:
    """A MONAI/torch output as a float32 numpy array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return np.asarray(x.detach().cpu().numpy(), dtype=np.float32)
    return np.asarray(x, dtype=np.float32)


def window(hu: NDArray[Any], windows: Sequence[Window]) -> FloatArray:
    """Window HU into one [0, 1] channel per window.

    Each channel is MONAI ``ScaleIntensityRange(a_min=c - w/2, a_max=c + w/2, b_min=0,
    b_max=1, clip=True)``: ``(hu - a_min) / w``, clipped to [0, 1].

    Parameters
    ----------
    hu : numpy.ndarray
        ``(H, W)`` HU.
    windows : sequence of Window
        Windows in channel order.

    Returns
    -------
    numpy.ndarray
        ``(len(windows), H, W)`` float32 in [0, 1].

    Raises
    ------
    ValueError
        If ``hu`` is not 2-D or ``windows`` is empty.
    """
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"hu must be 2-D (H, W), got shape {arr.shape}")
    if len(windows) == 0:
        raise ValueError("windows must not be empty")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    out = np.empty((len(windows), *arr.shape), dtype=np.float32)
    for i, w in enumerate(windows):
        out[i] = _to_numpy(_window_transform(w)(t))
    return out


@functools.lru_cache(maxsize=64)
def _window_transform(w: Window) -> ScaleIntensityRange:
    """The (cached) MONAI transform of one window."""
    return ScaleIntensityRange(
        a_min=w.low, a_max=w.high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
    )


def _target_shape(
    shape: tuple[int, int], size: int, spacing: tuple[float, float], fov_mm: float | None
) -> tuple[int, int]:
    """Resampled (rows, cols) so that the output pixel is ``fov / size`` mm square."""
    rows, cols = shape
    dy, dx = spacing
    extent_y, extent_x = rows * dy, cols * dx
    fov = max(extent_y, extent_x) if fov_mm is None else fov_mm
    return (
        max(1, round(extent_y * size / fov)),
        max(1, round(extent_x * size / fov)),
    )


def _pad_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre (C, h, w) on a zero (air) canvas of (C, size, size), cropping any overhang."""
    c, h, w = x.shape
    if h == size and w == size:
        return x
    out = torch.zeros((c, size, size), dtype=x.dtype)
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    oy, ox = max(0, (size - h) // 2), max(0, (size - w) // 2)
    hh, ww = min(h, size), min(w, size)
    out[:, oy : oy + hh, ox : ox + ww] = x[:, sy : sy + hh, sx : sx + ww]
    return out


def resize(
    x: NDArray[Any],
    size: int,
    *,
    spacing: tuple[float, float] = (1.0, 1.0),
    fov_mm: float | None = None,
) -> FloatArray:
    """Resample windowed channels to ``size x size`` square pixels.

    The physical extent ``(H * spacing[0], W * spacing[1])`` is mapped so that ``fov_mm``
    (default: the larger extent) spans ``size`` pixels, aspect ratio kept, in one MONAI
    ``Resize``; the result is centred and zero padded (or centre cropped) to ``size``.
    With square pixels and a square matrix this is a plain resize. Mode ``"area"`` (exact
    block mean, anti-aliased - the usual 512 -> 256 case) when no axis grows, else
    ``"bilinear"`` (``align_corners=False``), since area upsampling is blocky.

    Parameters
    ----------
    x : numpy.ndarray
        ``(C, H, W)`` windowed data where 0 is background (air).
    size : int
        Output side in pixels (>= 1).
    spacing : tuple of float
        ``PixelSpacing`` (row spacing, column spacing) in mm.
    fov_mm : float, optional
        Field of view (mm) the output spans; a series passes one value for all slices.

    Returns
    -------
    numpy.ndarray
        ``(C, size, size)`` float32.

    Raises
    ------
    ValueError
        If ``x`` is not 3-D or an argument is not positive.
    """
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"x must be 3-D (C, H, W), got shape {arr.shape}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be two positive numbers, got {spacing!r}")
    if fov_mm is not None and not (math.isfinite(fov_mm) and fov_mm > 0):
        raise ValueError(f"fov_mm must be positive, got {fov_mm!r}")
    h, w = arr.shape[1:]
    th, tw = _target_shape((h, w), size, (float(spacing[0]), float(spacing[1])), fov_mm)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if (th, tw) != (h, w):
        if th <= h and tw <= w:
            resizer = Resize(spatial_size=(th, tw), mode="area", dtype=np.float32)
        else:
            resizer = Resize(
                spatial_size=(th, tw), mode="bilinear", align_corners=False, dtype=np.float32
            )
        out = resizer(t)
        t = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    return _to_numpy(_pad_crop(t, size))


def _floats(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    """``n`` floats from a multi-valued attribute, or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _spacing(ds: Dataset) -> tuple[float, float]:
    """PixelSpacing (row, column) in mm; (1, 1) when absent or invalid."""
    values = _floats(ds, "PixelSpacing", 2)
    if values is None or values[0] <= 0 or values[1] <= 0:
        return (1.0, 1.0)
    return (values[0], values[1])


def slice_position(ds: Dataset) -> float:
    """Position of a slice along its normal, in mm.

    ``dot(ImagePositionPatient, row x column)`` with the direction cosines of
    ``ImageOrientationPatient``; without a usable orientation ``ImagePositionPatient[2]``;
    without a position ``InstanceNumber``.

    Parameters
    ----------
    ds : pydicom.Dataset
        An image dataset.

    Returns
    -------
    float
        The sort key.

    Raises
    ------
    InvalidDatasetError
        If none of the three attributes is usable.
    """
    ipp = _floats(ds, "ImagePositionPatient", 3)
    position = position_along_normal(ipp, _floats(ds, "ImageOrientationPatient", 6))
    if position is not None:
        return position
    number = ds.get("InstanceNumber")
    if number is not None and str(number).strip() != "":
        try:
            return float(number)
        except (TypeError, ValueError):
            pass
    raise InvalidDatasetError(
        "cannot order slice: no usable ImagePositionPatient or InstanceNumber"
    )


def order_slices(datasets: Sequence[Dataset]) -> list[int]:
    """Indices of ``datasets`` sorted by :func:`slice_position` (stable for duplicates).

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        Slices of one series.

    Returns
    -------
    list of int
        ``datasets[i] for i in order_slices(datasets)`` runs along the slice normal.

    Raises
    ------
    InvalidDatasetError
        If a slice has no usable position.
    """
    positions = [slice_position(ds) for ds in datasets]
    return sorted(range(len(positions)), key=positions.__getitem__)


def _slice_fov(ds: Dataset, shape: tuple[int, int]) -> float:
    """Larger physical extent (mm) of a slice."""
    dy, dx = _spacing(ds)
    return max(shape[0] * dy, shape[1] * dx)


def preprocess_slice(
    ds: Dataset, spec: PreprocessSpec, *, fov_mm: float | None = None
) -> FloatArray:
    """One slice as model input: :func:`to_hu`, :func:`window`, :func:`resize`.

    Parameters
    ----------
    ds : pydicom.Dataset
        A single-frame CT slice.
    spec : PreprocessSpec
        Windows and size.
    fov_mm : float, optional
        Field of view to map onto the output; default the slice's own larger extent.

    Returns
    -------
    numpy.ndarray
        ``(len(spec.windows), spec.size, spec.size)`` float32 in [0, 1].

    Raises
    ------
    InvalidDatasetError
        If the pixel data cannot be used.
    """
    hu = to_hu(ds)
    return resize(window(hu, spec.windows), spec.size, spacing=_spacing(ds), fov_mm=fov_mm)


def series_fov(datasets: Sequence[Dataset]) -> float:
    """The field of view (mm) every slice of a series is mapped to: the median extent.

    Reads only header fields (Rows, Columns, PixelSpacing), so headers read with
    ``stop_before_pixels`` do.

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    InvalidDatasetError
        If a slice has no Rows or Columns.
    """
    if not datasets:
        raise ValueError("datasets must not be empty")
    extents = []
    for ds in datasets:
        rows, cols = ds.get("Rows"), ds.get("Columns")
        if not rows or not cols:
            raise InvalidDatasetError("a slice without Rows/Columns has no field of view")
        extents.append(_slice_fov(ds, (int(rows), int(cols))))
    return float(np.median(extents))


def context_indices(n: int, i: int, context: int) -> list[int]:
    """Indices of the slices stacked as 2.5D input for slice ``i`` of ``n``.

    ``[i - context, ..., i + context]`` clamped to the series, so edge slices are
    replicated - the layout :func:`preprocess_series` produces.
    """
    if not 0 <= i < n:
        raise ValueError(f"slice index {i} outside a series of {n}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return [min(max(j, 0), n - 1) for j in range(i - context, i + context + 1)]


def preprocess_series(
    datasets: Sequence[Dataset], spec: PreprocessSpec, *, fov_mm: float | None = None
) -> FloatArray:
    """A series as a batch of model inputs, in the given order.

    Every slice is mapped to the series' median field of view (:func:`series_fov`, or
    ``fov_mm`` when the caller holds only part of the series), so slices with a deviating
    PixelSpacing show anatomy at the same scale. With ``spec.context = k`` slice ``i`` gets
    channels ``[windows(i-k), ..., windows(i), ..., windows(i+k)]``, indices clamped to the
    series (edge slices replicated). Order the datasets first (:func:`order_slices`).

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        Slices of one series, already ordered.
    spec : PreprocessSpec
        Windows, size and context.
    fov_mm : float, optional
        Field of view to map every slice onto; default the median over ``datasets``.

    Returns
    -------
    numpy.ndarray
        ``(N, spec.channels, spec.size, spec.size)`` float32 in [0, 1].

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    InvalidDatasetError
        If a slice's pixel data cannot be used.
    """
    n = len(datasets)
    if n == 0:
        raise ValueError("datasets must not be empty")
    hus = [to_hu(ds) for ds in datasets]
    fov = fov_mm if fov_mm is not None else float(
        np.median([_slice_fov(ds, hu.shape) for ds, hu in zip(datasets, hus, strict=True)]))
    base = np.stack(
        [
            resize(window(hu, spec.windows), spec.size, spacing=_spacing(ds), fov_mm=fov)
            for ds, hu in zip(datasets, hus, strict=True)
        ]
    )
    k = spec.context
    if k == 0:
        return base
    offsets = np.arange(-k, k + 1)
    idx = np.clip(np.arange(n)[:, None] + offsets[None, :], 0, n - 1)  # (N, 2k+1)
    stacked = base[idx]  # (N, 2k+1, W, S, S)
    return np.ascontiguousarray(stacked.reshape(n, spec.channels, spec.size, spec.size))
