"""Series inference in three steps (MONAI Deploy style): pre_process, predict, post_process.

:func:`predict_series` is what the worker calls: DICOM files (or datasets) of one series in,
a :class:`SeriesPrediction` out - per-slice probabilities in anatomical order, series
probabilities (max over slices), the key slice (highest ``any``), the flag at the model's
operating threshold, and timings.

Reading and preprocessing of the next batch overlap the model's forward pass on the current
one (a worker thread; pydicom decoders, numpy and torch release the GIL for their heavy
parts), so the pipeline runs close to the raw speed of the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage_node.domain import LABELS
from triage_node.errors import ArtifactError, InvalidDatasetError
from triage_node.model import LoadedModel, load_artifact
from triage_node.preprocess import (
    PreprocessSpec,
    context_indices,
    order_slices,
    preprocess_series,
    preprocess_slice,
    slice_position,
)

SeriesInput = Sequence[Path | str | Dataset]


@dataclass(frozen=True, slots=True)
class SlicePrediction:
    """One slice's probabilities, in LABELS order as a mapping."""

    sop_instance_uid: str
    position: float
    probabilities: dict[str, float]


@dataclass(frozen=True, slots=True)
class SeriesPrediction:
    """The result of one series."""

    slices: tuple[SlicePrediction, ...]
    probabilities: dict[str, float]
    key_slice: int
    flagged: bool
    threshold: float
    model_name: str
    model_version: str
    model_sha256: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def key_sop_instance_uid(self) -> str:
        """SOP Instance UID of the key slice (highest ``any``)."""
        return self.slices[self.key_slice].sop_instance_uid


def _read(item: Path | str | Dataset) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return dcmread(item)
    except Exception as exc:
        raise InvalidDatasetError(f"cannot read {item}: {exc}") from exc


class Predictor:
    """A loaded model plus its preprocessing, ready to classify series.

    Parameters
    ----------
    model : LoadedModel
        From :func:`triage_node.model.load_artifact`.
    batch_size : int, optional
        Slices per forward pass; default 32 on a GPU, 16 on the CPU.
    """

    def __init__(self, model: LoadedModel, *, batch_size: int | None = None) -> None:
        self.model = model
        try:
            self.spec = PreprocessSpec.from_dict(model.meta.preprocess)
        except ValueError as exc:
            raise ArtifactError(f"{model.path}: preprocessing settings unusable: {exc}") from exc
        if self.spec.channels != model.meta.in_channels:
            raise ArtifactError(
                f"{model.path}: preprocessing gives {self.spec.channels} channels, the network "
                f"expects {model.meta.in_channels}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or (32 if model.device.type == "cuda" else 16)
        self.threshold = float(model.meta.thresholds.get("any", 0.5))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")

    @classmethod
    def from_path(cls, path: Path | str, *, device: str = "auto",
                  batch_size: int | None = None) -> Predictor:
        """Load an artifact and wrap it."""
        from triage_node.model import resolve_device

        return cls(load_artifact(Path(path), resolve_device(device)), batch_size=batch_size)

    # -- the three steps ------------------------------------------------------------------

    @staticmethod
    def read_ordered(items: SeriesInput) -> list[Dataset]:
        """Read the slices and order them along the slice normal."""
        datasets = [_read(i) for i in items]
        if not datasets:
            raise InvalidDatasetError("a series needs at least one slice")
        return [datasets[i] for i in order_slices(datasets)]

    def pre_process(self, items: SeriesInput) -> tuple[list[Dataset], NDArray[np.float32]]:
        """Read, order along the slice normal, and preprocess a whole series."""
        ordered = self.read_ordered(items)
        return ordered, preprocess_series(ordered, self.spec)

    def predict(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Probabilities (N, 6) for preprocessed slices (N, C, H, W), in batches."""
        out = [self._forward(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)

    def post_process(self, datasets: Sequence[Dataset], probs: NDArray[np.float32],
                     timings: dict[str, float] | None = None) -> SeriesPrediction:
        """Series probabilities (max over slices), key slice and flag."""
        if len(datasets) != len(probs):
            raise ValueError(f"{len(datasets)} slices but {len(probs)} predictions")
        return self.summarise([str(ds.get("SOPInstanceUID", "")) for ds in datasets],
                              [slice_position(ds) for ds in datasets], probs, timings)

    def summarise(self, sop_instance_uids: Sequence[str], positions: Sequence[float],
                  probs: NDArray[np.float32],
                  timings: dict[str, float] | None = None) -> SeriesPrediction:
        """:meth:`post_process` for slices known by UID and position (ordered)."""
        if not len(sop_instance_uids) == len(positions) == len(probs):
            raise ValueError(f"{len(sop_instance_uids)} UIDs, {len(positions)} positions and "
                             f"{len(probs)} predictions")
        if len(probs) == 0:
            raise ValueError("a series needs at least one slice")
        slices = tuple(
            SlicePrediction(
                sop_instance_uid=uid,
                position=float(pos),
                probabilities={lab: float(p[j]) for j, lab in enumerate(LABELS)},
            )
            for uid, pos, p in zip(sop_instance_uids, positions, probs, strict=True)
        )
        series = probs.max(axis=0)
        key = int(np.argmax(probs[:, 0]))
        meta = self.model.meta
        return SeriesPrediction(
            slices=slices,
            probabilities={lab: float(series[j]) for j, lab in enumerate(LABELS)},
            key_slice=key,
            flagged=bool(series[0] >= self.threshold),
            threshold=self.threshold,
            model_name=meta.name,
            model_version=meta.version,
            model_sha256=meta.weights_sha256,
            timings=dict(timings or {}),
        )

    # -- part of a series, for inference while it arrives -----------------------------------

    def predict_slices(self, read: Callable[[int], Dataset], n: int, targets: Sequence[int],
                       fov_mm: float) -> NDArray[np.float32]:
        """Probabilities (len(targets), 6) for some slices of an ordered series of ``n``.

        Gives exactly what :meth:`predict_series` gives those slices when ``fov_mm`` is the
        series' :func:`~triage_node.preprocess.series_fov` and ``read(i)`` returns slice
        ``i`` of the same order: each target gets its 2.5D neighbours
        (:func:`~triage_node.preprocess.context_indices`), read once each.
        """
        k = self.spec.context
        base: dict[int, NDArray[np.float32]] = {}

        def prepare(chunk: Sequence[int]) -> NDArray[np.float32]:
            rows = []
            for i in chunk:
                window = context_indices(n, i, k)
                for j in window:
                    if j not in base:
                        ds = read(j)
                        try:
                            base[j] = preprocess_slice(ds, self.spec, fov_mm=fov_mm)
                        except InvalidDatasetError as exc:
                            uid = ds.get("SOPInstanceUID", "?")
                            raise InvalidDatasetError(f"slice {uid}: {exc}") from exc
                rows.append(np.stack([base[j] for j in window]).reshape(
                    self.spec.channels, self.spec.size, self.spec.size))
            # Keep only what later chunks can still need (targets come in order, mostly).
            if chunk:
                for j in [j for j in base if j < chunk[-1] - 2 * k]:
                    del base[j]
            return np.ascontiguousarray(np.stack(rows))

        chunks = [list(targets[i:i + self.batch_size])
                  for i in range(0, len(targets), self.batch_size)]
        if not chunks:
            return np.zeros((0, len(LABELS)), np.float32)
        out = []
        pending = self._pool.submit(prepare, chunks[0])
        for c in range(len(chunks)):
            x = pending.result()
            if c + 1 < len(chunks):
                pending = self._pool.submit(prepare, chunks[c + 1])
            out.append(self._forward(x))
        return np.concatenate(out)

    # -- the whole thing, overlapped --------------------------------------------------------

    def predict_series(self, items: SeriesInput) -> SeriesPrediction:
        """Classify one series: files or datasets in, :class:`SeriesPrediction` out."""
        t0 = time.perf_counter()
        ordered = self.read_ordered(items)
        t_read = time.perf_counter()
        probs: list[NDArray[np.float32]] = []
        t_pre = 0.0
        t_fwd = 0.0
        for batch_x, pre_seconds in self._batches(ordered):
            t_pre += pre_seconds
            t = time.perf_counter()
            probs.append(self._forward(batch_x))
            t_fwd += time.perf_counter() - t
        t_end = time.perf_counter()
        timings = {
            "read": t_read - t0,
            "preprocess": t_pre,
            "forward": t_fwd,
            "total": t_end - t0,
            "slices": float(len(ordered)),
        }
        return self.post_process(ordered, np.concatenate(probs), timings)

    def _batches(self, ordered: list[Dataset]) -> Iterator[tuple[NDArray[np.float32], float]]:
        """Preprocessed batches, the next one prepared while the caller runs the current."""
        ctx = self.spec.context
        n = len(ordered)

        def prepare(start: int) -> tuple[NDArray[np.float32], float]:
            t = time.perf_counter()
            stop = min(n, start + self.batch_size)
            # Neighbours outside the batch are needed for 2.5D context.
            lo, hi = max(0, start - ctx), min(n, stop + ctx)
            # Give 2.5D context its real neighbours across batch borders, then keep the
            # batch's own slices (edge replication then happens only at the series' ends).
            x = preprocess_series(ordered[lo:hi], self.spec)[start - lo:stop - lo]
            return x, time.perf_counter() - t

        starts = list(range(0, n, self.batch_size))
        pending = self._pool.submit(prepare, starts[0])
        for k in range(len(starts)):
            current = pending.result()
            if k + 1 < len(starts):
                pending = self._pool.submit(prepare, starts[k + 1])
            yield current

    def _forward(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        device = self.model.device
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.model.network(t)
            else:
                logits = self.model.network(t)
            return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32)

    def close(self) -> None:
        """Stop the preprocessing thread."""
        self._pool.shutdown(wait=True)


def predict_series(items: SeriesInput, predictor: Predictor) -> SeriesPrediction:
    """Classify one series with ``predictor`` (see :meth:`Predictor.predict_series`)."""
    return predictor.predict_series(items)
