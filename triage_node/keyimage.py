"""Key images of a classified series: the key slice in brain window, and where the model looked.

The worker calls :func:`render_key_images` after classification; the PNGs go to the database
(:func:`triage_node.store.worklist.save_key_images`) so that the worklist API can show them
without importing torch.

Both images show the key slice exactly as the model saw it: the same field of view and
size as the model input (:func:`triage_node.preprocess.preprocess_slice` with the series'
field of view), in the brain window (40/80 HU). The heatmap is MONAI's Grad-CAM
(:class:`monai.visualize.GradCAM`) of the ``any`` output on the network's last
convolution, computed on the model's real input (all windows, 2.5D context included) - or,
when Grad-CAM's map is flat (untrained or saturated networks), MONAI's occlusion
sensitivity (:class:`monai.visualize.OcclusionSensitivity`). The map is scaled to [0, 1] and
blended over the slice in a blue-to-red colour map where it exceeds 0.2 (weaker evidence is
left transparent, so the anatomy stays readable).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.domain import LABELS, SeriesResult
from triage_node.errors import InvalidDatasetError
from triage_node.pipeline import Predictor
from triage_node.preprocess import Window, context_indices, preprocess_slice, series_fov

__all__ = [
    "BRAIN_WINDOW",
    "HEATMAP_METHOD",
    "OCCLUSION_METHOD",
    "heatmap",
    "render_key_images",
    "store_key_images",
    "to_png",
]

log = logging.getLogger(__name__)

#: The window radiologists read head CT for blood in.
BRAIN_WINDOW = Window(40, 80)

#: What the heatmap is, as stored with the images.
HEATMAP_METHOD = "gradcam"
#: The fallback when Grad-CAM gives a flat map.
OCCLUSION_METHOD = "occlusion"

#: Heatmap values below this are not drawn.
_HEATMAP_FLOOR = 0.2
#: Opacity of the strongest heatmap value.
_HEATMAP_ALPHA = 0.55


def _last_conv(network: torch.nn.Module) -> str:
    """Name of the last 2-D convolution of a network (Grad-CAM's target layer)."""
    names = [name for name, module in network.named_modules()
             if isinstance(module, torch.nn.Conv2d)]
    if not names:
        raise ValueError("the network has no 2-D convolution for Grad-CAM")
    return str(names[-1])


def _normalise(arr: NDArray[np.float32]) -> NDArray[np.float32]:
    """Scale to [0, 1]; a flat map becomes zeros."""
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(arr)
    return np.asarray((arr - lo) / (hi - lo), np.float32)


def _gradcam(network: torch.nn.Module, t: torch.Tensor, index: int) -> NDArray[np.float32]:
    """Raw (non-negative) Grad-CAM of output ``index`` on the last convolution."""
    from monai.visualize.class_activation_maps import GradCAM

    # Raw maps: MONAI's default post-processing flips them (1 = least evidence).
    cam = GradCAM(nn_module=network, target_layers=_last_conv(network),
                  postprocessing=lambda m: m)
    t = t.clone().requires_grad_(True)  # so the backward hooks see real input gradients
    with torch.enable_grad():
        out = cam(t, class_idx=index)
    arr: NDArray[np.float32] = np.asarray(out.detach().cpu().numpy(), np.float32)[0, 0]
    return arr


def _occlusion(network: torch.nn.Module, t: torch.Tensor, index: int) -> NDArray[np.float32]:
    """How much hiding each region lowers output ``index`` (MONAI occlusion sensitivity)."""
    from monai.visualize.occlusion_sensitivity import OcclusionSensitivity

    size = int(t.shape[-1])
    # A 4 x 4 grid of masks: 16 forward passes. This is the fallback for a blank Grad-CAM
    # (an untrained network); finer grids cost seconds of worker time per series on a CPU.
    occlusion = OcclusionSensitivity(network, mask_size=max(4, size // 4), n_batch=16,
                                     verbose=False, mode="mean_img", overlap=0.0,
                                     activate=torch.sigmoid)
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI indexes with lists, which newer torch warns about (still correct here).
        warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)
        maps, _ = occlusion(t)
        base = torch.sigmoid(network(t))[0, index]
    drop = (base - maps[0, index]).clamp(min=0)  # maps: (batch, outputs, H, W)
    return np.asarray(drop.detach().cpu().numpy(), np.float32)


def heatmap(
    predictor: Predictor, x: NDArray[np.float32], label: str = "any"
) -> tuple[NDArray[np.float32], str]:
    """Where the evidence for one output lies in one preprocessed input.

    Grad-CAM on the network's last convolution; when that map is flat (all zero after
    Grad-CAM's ReLU, as with untrained or saturated networks) occlusion sensitivity instead,
    which works for any network at the cost of one forward pass per occluded region.

    Parameters
    ----------
    predictor : Predictor
        The loaded model.
    x : numpy.ndarray
        ``(C, H, W)`` model input of one slice (as :meth:`Predictor.predict` takes).
    label : str, optional
        The output explained, one of :data:`~triage_node.domain.LABELS`.

    Returns
    -------
    tuple
        ``(map, method)``: ``(H, W)`` float32 in [0, 1], and ``"gradcam"`` or
        ``"occlusion"``.

    Raises
    ------
    ValueError
        If ``x`` is not 3-D or ``label`` unknown.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (C, H, W), got shape {x.shape}")
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    # A copy: GradCAM leaves its hooks on the module and fills the weights' gradients, and
    # the predictor's network must stay exactly as inference uses it.
    network = copy.deepcopy(predictor.model.network).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    t = torch.from_numpy(np.ascontiguousarray(x[None])).to(predictor.model.device)
    index = LABELS.index(label)
    cam = _normalise(_gradcam(network, t, index))
    if cam.any():
        return cam, HEATMAP_METHOD
    return _normalise(_occlusion(network, t, index)), OCCLUSION_METHOD


def _colormap(values: NDArray[np.float32]) -> NDArray[np.float32]:
    """Blue-cyan-yellow-red colours (H, W, 3) in [0, 1] for values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.33, 0.66, 1.0], np.float32)
    colours = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
    out = np.empty((*values.shape, 3), np.float32)
    for c in range(3):
        out[..., c] = np.interp(v[..., 0], stops, colours[:, c])
    return out


def to_png(rgb_or_grey: NDArray[np.float32]) -> bytes:
    """Encode an image in [0, 1], ``(H, W)`` grey or ``(H, W, 3)`` RGB, as PNG bytes."""
    arr = np.clip(np.asarray(rgb_or_grey, np.float32), 0.0, 1.0)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3), got shape {arr.shape}")
    image = Image.fromarray(np.round(arr * 255).astype(np.uint8), "L" if arr.ndim == 2 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def render_key_images(
    predictor: Predictor, datasets_in_order: Sequence[Dataset], key_index: int
) -> tuple[bytes, bytes]:
    """The key slice in brain window, plain and with the model's Grad-CAM heatmap, as PNGs.

    Parameters
    ----------
    predictor : Predictor
        The model that classified the series.
    datasets_in_order : sequence of pydicom.Dataset
        The series' slices in the order the series was classified in (anatomical order).
        Only the key slice and its 2.5D neighbours
        (``context_indices(n, key_index, predictor.spec.context)``) need pixel data; the
        others may be headers read with ``stop_before_pixels`` (their Rows, Columns and
        PixelSpacing give the series' field of view).
    key_index : int
        Index of the key slice in ``datasets_in_order`` (the highest ``any``).

    Returns
    -------
    tuple of bytes
        ``(plain_png, heatmap_png)``: both ``size x size`` of the model input, greyscale and
        RGB.

    Raises
    ------
    ValueError
        If ``key_index`` is outside the series.
    InvalidDatasetError
        If a slice's pixel data cannot be used.
    """
    plain, overlay, _ = _render(predictor, datasets_in_order, key_index)
    return plain, overlay


def _render(predictor: Predictor, datasets_in_order: Sequence[Dataset],
            key_index: int) -> tuple[bytes, bytes, str]:
    """:func:`render_key_images`, and the heatmap's method."""
    n = len(datasets_in_order)
    if isinstance(key_index, bool) or not isinstance(key_index, int):
        raise TypeError(f"key_index must be an int, not {type(key_index).__name__}")
    if not 0 <= key_index < n:
        raise ValueError(f"key_index {key_index} outside a series of {n} slices")
    spec = predictor.spec
    fov = series_fov(datasets_in_order)
    window = context_indices(n, key_index, spec.context)
    try:
        x = np.concatenate([preprocess_slice(datasets_in_order[j], spec, fov_mm=fov)
                            for j in window])
        brain = preprocess_slice(datasets_in_order[key_index],
                                 replace(spec, windows=(BRAIN_WINDOW,), context=0),
                                 fov_mm=fov)[0]
    except InvalidDatasetError as exc:
        uid = datasets_in_order[key_index].get("SOPInstanceUID", "?")
        raise InvalidDatasetError(f"key slice {uid}: {exc}") from exc
    cam, method = heatmap(predictor, x.astype(np.float32))
    grey = np.repeat(brain[..., None], 3, axis=2)
    alpha = np.where(cam >= _HEATMAP_FLOOR, _HEATMAP_ALPHA * cam, 0.0)[..., None]
    blended = (1.0 - alpha) * grey + alpha * _colormap(cam)
    return to_png(brain), to_png(blended.astype(np.float32)), method


def store_key_images(
    session_factory: sessionmaker[Session],
    predictor: Predictor,
    result: SeriesResult,
    datasets_in_order: Sequence[Dataset],
    *,
    load: Callable[[int], Dataset] | None = None,
) -> bool:
    """Render the key images of a stored result and save them with the series.

    Key images only illustrate a result: a failure is logged and ``False`` returned, the
    classification stands.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        The worker's session factory.
    predictor : Predictor
        The model that produced ``result``.
    result : SeriesResult
        The result as stored; its ``key_sop_instance_uid`` names the key slice.
    datasets_in_order : sequence of pydicom.Dataset
        As for :func:`render_key_images`, in the order of ``result.slices``.
    load : callable, optional
        ``load(i)`` returns slice ``i`` with pixel data; when given, it is called for the key
        slice and its 2.5D neighbours only, so ``datasets_in_order`` may be headers alone
        (read with ``stop_before_pixels``). Its failures are handled like the rendering's.

    Returns
    -------
    bool
        True when the images were saved.
    """
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets_in_order]
    try:
        key_index = uids.index(result.key_sop_instance_uid)
        if load is not None:
            datasets = list(datasets_in_order)
            for j in context_indices(len(datasets), key_index, predictor.spec.context):
                datasets[j] = load(j)
            datasets_in_order = datasets
        plain, overlay, method = _render(predictor, datasets_in_order, key_index)
        store.save_key_images(
            session_factory, result.series_instance_uid,
            sop_instance_uid=result.key_sop_instance_uid, plain_png=plain,
            heatmap_png=overlay, method=method, model_sha256=result.model_sha256)
    except Exception as exc:  # illustration only: never fail the classification for it
        log.warning("series %s: key images not stored: %s", result.series_instance_uid, exc)
        return False
    return True
