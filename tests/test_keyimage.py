"""Key images: the key slice in brain window and the Grad-CAM heatmap, rendered and stored."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from triage_node import phantom, store
from triage_node.domain import (
    LABELS,
    InstanceRecord,
    InstanceState,
    SeriesResult,
    utcnow,
)
from triage_node.keyimage import (
    BRAIN_WINDOW,
    HEATMAP_METHOD,
    OCCLUSION_METHOD,
    heatmap,
    render_key_images,
    store_key_images,
    to_png,
)
from triage_node.model import load_artifact, random_artifact
from triage_node.pipeline import Predictor
from triage_node.preprocess import PreprocessSpec, context_indices, preprocess_slice, series_fov

SIZE = 64


def _decode(data: bytes) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(data))
    return image.mode, np.asarray(image)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> phantom.StudyTruth:
    out = tmp_path_factory.mktemp("phantom")
    return phantom.generate_study(out, seed=11, n_slices=6, positive=True, rows=96, cols=96)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    path = tmp_path_factory.mktemp("model") / "m.tnm"
    spec = PreprocessSpec(size=SIZE, context=1)
    random_artifact(path, architecture="small-cnn", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=3)
    return Predictor(load_artifact(path), batch_size=4)


def _ordered(study: phantom.StudyTruth) -> list[Dataset]:
    return Predictor.read_ordered([s.path for s in study.slices])


class _Brightness(torch.nn.Module):
    """Every output is the mean brightness of the centre channel: Grad-CAM = brightness."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, channels // 2] = 1.0
        self.head = torch.nn.Linear(1, len(LABELS))
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_heatmap_shows_where_the_evidence_is(predictor: Predictor) -> None:
    c = predictor.spec.channels
    probe = Predictor(dataclasses.replace(predictor.model, network=_Brightness(c).eval()))
    x = np.zeros((c, SIZE, SIZE), np.float32)
    x[c // 2, 40:56, 8:24] = 1.0  # bright square, lower left
    x[c // 2, 0:4, 60:64] = 0.25  # faint corner
    cam, method = heatmap(probe, x)
    assert method == HEATMAP_METHOD
    assert cam.shape == (SIZE, SIZE) and cam.dtype == np.float32
    assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    assert cam[48, 16] > 0.9 and cam[2, 62] < 0.5 and cam[10, 40] < 0.1
    with pytest.raises(ValueError, match="label"):
        heatmap(probe, x, "bogus")
    with pytest.raises(ValueError, match="C, H, W"):
        heatmap(probe, x[0])


def test_occlusion_when_gradcam_is_flat(predictor: Predictor) -> None:
    """A network whose Grad-CAM is all zero (ReLU of negative evidence) still gets a map."""
    c = predictor.spec.channels
    network = _Brightness(c)
    with torch.no_grad():
        network.head.weight.fill_(-1.0)  # brighter = less likely: Grad-CAM's ReLU gives 0
    probe = Predictor(dataclasses.replace(predictor.model, network=network.eval()))
    x = np.full((c, SIZE, SIZE), 0.5, np.float32)
    x[c // 2, 40:56, 8:24] = 0.0  # a dark square: hiding it (mean fill) lowers the output
    cam, method = heatmap(probe, x)
    assert method == OCCLUSION_METHOD
    assert cam.max() == pytest.approx(1.0) and cam[48, 16] > 0.5 and cam[10, 50] < 0.2


def test_render_key_images(predictor: Predictor, study: phantom.StudyTruth) -> None:
    ordered = _ordered(study)
    before = predictor.predict_series(ordered)
    key = before.key_slice
    plain, overlay = render_key_images(predictor, ordered, key)

    mode, grey = _decode(plain)
    assert mode == "L" and grey.shape == (SIZE, SIZE)
    # The key slice exactly as the model saw it (same field of view), in the brain window.
    spec = dataclasses.replace(predictor.spec, windows=(BRAIN_WINDOW,), context=0)
    brain = preprocess_slice(ordered[key], spec, fov_mm=series_fov(ordered))[0]
    assert np.abs(grey.astype(int) - np.round(brain * 255).astype(int)).max() <= 1
    assert grey.std() > 10  # a head, not a blank

    mode, rgb = _decode(overlay)
    assert mode == "RGB" and rgb.shape == (SIZE, SIZE, 3)
    coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    assert coloured.any()  # the heatmap is drawn...
    assert (~coloured).any() or not np.array_equal(rgb[..., 0], grey)  # ...over the slice

    # The predictor is untouched: no hooks left, same predictions.
    assert all(not m._forward_hooks and not m._backward_hooks
               for m in predictor.model.network.modules())
    assert all(p.grad is None for p in predictor.model.network.parameters())
    assert predictor.predict_series(ordered).probabilities == before.probabilities

    # Only the key slice and its 2.5D neighbours need pixels.
    headers = [dcmread(s.path, stop_before_pixels=True) for s in study.slices]
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    mixed = [by_uid[str(ds.SOPInstanceUID)] for ds in ordered]
    for j in context_indices(len(ordered), key, predictor.spec.context):
        mixed[j] = ordered[j]
    assert render_key_images(predictor, mixed, key) == (plain, overlay)

    with pytest.raises(ValueError, match="outside"):
        render_key_images(predictor, ordered, len(ordered))


def test_to_png_checks_shape() -> None:
    assert to_png(np.zeros((4, 4), np.float32)).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="expected"):
        to_png(np.zeros((4, 4, 2), np.float32))


def _record(study: phantom.StudyTruth, factory: sessionmaker[Session]) -> list[Dataset]:
    ordered = _ordered(study)
    now = utcnow()
    store.record_batch(factory, [
        InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=study.study_uid, series_instance_uid=study.series_uid,
            patient_id=study.patient_id, transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_path=f"{i}.dcm", file_size=1, received_at=now, calling_ae="T",
            state=InstanceState.STORED)
        for i, ds in enumerate(ordered)])
    return ordered


def test_store_key_images_round_trip(
    predictor: Predictor, study: phantom.StudyTruth, session_factory: sessionmaker[Session]
) -> None:
    ordered = _record(study, session_factory)
    prediction = predictor.predict_series(ordered)
    now = utcnow()
    result = SeriesResult(
        series_instance_uid=study.series_uid, probabilities=prediction.probabilities,
        slices=tuple((s.sop_instance_uid, s.position,
                      tuple(s.probabilities[lab] for lab in LABELS))
                     for s in prediction.slices),
        key_sop_instance_uid=prediction.key_sop_instance_uid, flagged=prediction.flagged,
        threshold=prediction.threshold, model_name=prediction.model_name,
        model_version=prediction.model_version, model_sha256=prediction.model_sha256,
        inference_started_at=now - dt.timedelta(seconds=1), inference_done_at=now)
    assert store.get_key_images(session_factory, study.series_uid) is None
    assert store_key_images(session_factory, predictor, result, ordered)
    images = store.get_key_images(session_factory, study.series_uid)
    assert images is not None
    assert (images.plain_png, images.heatmap_png) == render_key_images(
        predictor, ordered, prediction.key_slice)
    assert images.sop_instance_uid == prediction.key_sop_instance_uid
    assert images.method in (HEATMAP_METHOD, OCCLUSION_METHOD)
    assert images.model_sha256 == result.model_sha256
    # Stored again (recomputed result): replaced, not doubled.
    assert store_key_images(session_factory, predictor, result, ordered)
    assert store.get_key_images(session_factory, study.series_uid) is not None

    # As the worker calls it: headers of the series, pixels loaded for the key window only.
    headers = [dcmread(s.path, stop_before_pixels=True) for s in study.slices]
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    ordered_headers = [by_uid[str(ds.SOPInstanceUID)] for ds in ordered]
    loaded: list[int] = []

    def load(i: int) -> Dataset:
        loaded.append(i)
        return ordered[i]

    store.save_key_images(session_factory, study.series_uid, sop_instance_uid="1.2.3",
                          plain_png=to_png(np.zeros((2, 2), np.float32)),
                          heatmap_png=to_png(np.zeros((2, 2), np.float32)), method="x",
                          model_sha256="0" * 64)
    assert store_key_images(session_factory, predictor, result, ordered_headers, load=load)
    window = context_indices(len(ordered), prediction.key_slice, 1)
    assert sorted(set(loaded)) == sorted(set(window))
    again = store.get_key_images(session_factory, study.series_uid)
    assert again is not None and again.plain_png == images.plain_png

    def broken(i: int) -> Dataset:
        raise OSError("spool gone")

    assert not store_key_images(session_factory, predictor, result, ordered_headers,
                                load=broken)

    # A key slice missing from the datasets: logged, not raised.
    assert not store_key_images(session_factory, predictor, result, ordered[:1]
                                if prediction.key_slice else ordered[1:])


def test_save_key_images_validates(session_factory: sessionmaker[Session],
                                   study: phantom.StudyTruth) -> None:
    _record(study, session_factory)
    good = to_png(np.zeros((2, 2), np.float32))
    kwargs = {"sop_instance_uid": "1.2.3", "method": "gradcam", "model_sha256": "0" * 64}
    with pytest.raises(ValueError, match="PNG"):
        store.save_key_images(session_factory, study.series_uid, plain_png=b"GIF89a",
                              heatmap_png=good, **kwargs)
    with pytest.raises(TypeError, match="bytes"):
        store.save_key_images(session_factory, study.series_uid, plain_png=good,
                              heatmap_png="x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="unknown series"):
        store.save_key_images(session_factory, "1.2.404", plain_png=good, heatmap_png=good,
                              **kwargs)
    store.save_key_images(session_factory, study.series_uid, plain_png=good,
                          heatmap_png=good, **kwargs)
    assert store.get_key_images(session_factory, study.series_uid) is not None
