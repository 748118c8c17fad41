"""Training: data to a model artifact the worker can load.

:func:`train` runs the whole thing:

1. labels + header index (:func:`train.data.load_records`) and/or the radiologists'
   verdicts in the node's database (:mod:`train.feedback`: refuted series give strong
   negative slices, confirmed ones weak series-level *bags*); every series preprocessed
   once into the persistent slice cache with the one preprocessing
   (:class:`train.data.SliceCache`); the split by patient over all of it,
   multilabel-stratified (:func:`train.data.split_patients`);
2. epochs of AdamW with a linear warm-up and a cosine decay (stepped per batch), the RSNA
   weighted BCE as the loss (``any`` weighted 2), optional oversampling of slices positive
   for ``any``, augmentations applied to each batch on the device (left-right flip, small
   rotation / scale / shift, mild intensity jitter: :func:`augment_batch`), AMP on CUDA;
   bags ride along with the slice batches (see *Bags* below);
3. the patients of each side are written to ``split.json``; after every epoch: validation
   (slice weighted log loss over strongly labelled slices, series AUC of ``any`` over every
   validation series, bags included), a line in ``metrics.jsonl``, ``checkpoint.pt``
   (everything ``--resume`` needs) and, when the validation loss improved, ``best.pt``;
   early stopping after ``patience`` epochs without improvement;
4. the best epoch's weights, the operating threshold of ``any`` chosen on the validation
   series for the target sensitivity, and the validation figures go into the artifact.

Bags (multiple-instance learning)
    A confirmed series says "some slice bleeds". Its loss is :func:`mil_bce`: the series
    logit of each label is the **maximum** over the slice logits, scored with the same
    weighted BCE against the series labels. The maximum, not a smooth maximum such as
    log-sum-exp, because it is exactly how the worker scores a series (the maximum of the
    slice probabilities, ``pipeline.Predictor.post_process``; sigmoid is monotone): the bag
    loss is the log loss of the very score the node reports and thresholds. A log-sum-exp
    with temperature ``T`` lies up to ``T log K`` above the maximum (its mean-normalised
    form as far below) and would train series scores the worker never computes, dependent
    on the series length ``K``; on the phantom runs it learned no better.

    A bag goes into a step whole: its slices are appended to the step's slice batch and go
    through the network (batch norm, augmentation) with it; the maximum is taken over them.
    Scoring the bag first without gradients and back-propagating through its arg-max slices
    alone would be cheaper, but on the phantom runs that variant did not learn (held-out
    series AUC 0.45-0.74 after 6-30 epochs) where the whole-bag form reached 1.0. A bag of
    more than ``bag_max_slices`` slices (default 64: a 5 mm head CT has 25-40) is thinned
    to an even stride from a random offset (:func:`bag_slices`): the whole head at a
    coarser spacing, never a window that could miss the bleed; memory per step stays
    bounded.

    Schedule and weight: the bags are shuffled every epoch (seeded) and dealt round-robin to
    the epoch's slice batches, at most ``ceil(bags / steps)`` to a step and, beyond its
    first bag, at most ``max(batch_size, bag_max_slices)`` bag rows; bags that do not fit
    wait for a later epoch's draw (logged). A bag weighs as much as one slice: the step's
    loss is the mean over its slices and bags, exactly :func:`weighted_bce` without bags.
    That keeps the slice holding a bag's maximum on a par with any negative slice.
    Weighting a bag by its slice count (so a confirmed series would weigh as much as a
    refuted one) puts ``K`` times a slice's weight on that one slice; in the arg-max
    variant the network then scored a slice position instead of blood (every series,
    negatives too, 0.93 at the vertex: 21 bags x 12 against 19 negatives, the equilibrium
    of that imbalance), and counting each bag twice per epoch hurt as well.

    Validation: the slice weighted log loss over strongly labelled slices, and every
    validation series - strong ones and bags - scored by the maximum. With validation bags,
    early stopping and ``best.pt`` follow ``val_objective``, the series-level weighted log
    loss (each series once; labels a verdict left open are left out), because the confirmed
    series have no slice labels and the slice loss alone would reward calling everything
    negative.

Reproducibility: every random draw is derived from ``seed`` and the epoch (the sampler's
generator, the augmentation generator, torch's RNG for dropout), so a run resumed from a
checkpoint takes the same steps as one that never stopped, and the same command with the
same seed gives the same model on the same hardware.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from train.data import (
    SliceCache,
    SliceRecord,
    _progress,
    cached_records,
    describe_records,
    load_records,
    series_groups,
)
from train.feedback import (
    SNAPSHOT,
    Bag,
    StoreData,
    bag_records,
    cached_store,
    describe_bags,
    load_store_data,
    public_summary,
    read_snapshot,
    split_sources,
    without_series,
    write_snapshot,
)
from train.metrics import (
    EPS,
    LABEL_WEIGHTS,
    roc_auc,
    threshold_for_sensitivity,
    weighted_log_loss,
)
from triage_node.domain import LABELS
from triage_node.logs import redact_url
from triage_node.model import (
    ARCHITECTURES,
    ModelMeta,
    build_network,
    resolve_device,
    save_artifact,
    utc_now,
)
from triage_node.preprocess import DEFAULT_WINDOWS, PreprocessSpec, Window

__all__ = [
    "LabelledData",
    "Scores",
    "SliceDataset",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
    "bag_slices",
    "mil_bce",
    "predict",
    "series_scores",
    "train",
    "weighted_bce",
]

log = logging.getLogger("triage_node.train")

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS_LOG = "metrics.jsonl"
SPLIT = "split.json"

# Settings a resumed run must share with its checkpoint (the rest may change, e.g. epochs).
# The store's labels are frozen in WORK_DIR/store_labels.json, so from_store_since is free.
_RESUME_FIXED = (
    "data", "labels", "label_format", "architecture", "size", "context", "windows",
    "val_fraction", "seed", "batch_size", "lr", "weight_decay", "warmup_epochs", "oversample",
    "augment", "from_store", "spool", "bag_max_slices",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on construction.

    Attributes
    ----------
    work_dir : Path
        Checkpoints, ``metrics.jsonl`` and (by default) the index and slice cache.
    data : Path or None
        Folder of the DICOM files (with ``labels``; optional when ``from_store`` is set).
    labels : Path or None
        ``stage_2_train.csv`` or a generic CSV.
    from_store : str or None
        Database URL of a node whose radiologist verdicts are added to the data
        (:mod:`train.feedback`); never shown with its password (``to_json``, ``repr``).
    spool : Path or None
        That node's spool (``[storage] path``); required with ``from_store``.
    from_store_since : datetime or None
        Only series whose newest verdict is at least this recent (timezone-aware).
    bag_max_slices : int
        Slices of a confirmed series a training step uses; a longer series is thinned to
        an even stride (:func:`bag_slices`).
    out : Path or None
        The artifact to write; default ``work_dir / "model.tnm"``.
    label_format : str
        ``auto``, ``rsna`` or ``generic``.
    cache_dir : Path or None
        Slice cache; default ``work_dir / "cache"``.
    index : Path or None
        Header index; default ``cache_dir / "index.csv"``.
    architecture : str
        One of :data:`triage_node.model.ARCHITECTURES`.
    size, context : int
        Preprocessing: output side in pixels, 2.5D context slices each side.
    windows : tuple of (center, width)
        Windows in HU, one channel each.
    epochs : int
        Maximum number of epochs.
    batch_size : int
        Slices per step.
    lr, weight_decay : float
        AdamW peak learning rate and weight decay.
    warmup_epochs : float
        Linear warm-up length, in epochs; a cosine decay to 0 follows.
    val_fraction : float
        Fraction of patients held out for validation.
    seed : int
        Seed of the split, the initialisation, the sampling and the augmentations.
    patience : int
        Early stopping: stop after this many epochs without a better validation weighted
        log loss (0 = never stop early).
    oversample : float
        Sampling weight of slices positive for ``any`` relative to negative ones (1 = off).
    augment : bool
        Apply the augmentations.
    target_sensitivity : float
        Series-level sensitivity of ``any`` the operating threshold is chosen for.
    workers : int
        DataLoader, header-reading and preprocessing worker processes (0 = in process).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    amp : bool
        Mixed precision on CUDA (ignored on the CPU).
    name, version, note : str
        Recorded in the artifact (``note``: e.g. "phantom-trained, not for clinical use").
    progress : bool
        Progress bars on stderr.
    """

    work_dir: Path
    data: Path | None = None
    labels: Path | None = None
    from_store: str | None = field(default=None, repr=False)
    spool: Path | None = None
    from_store_since: dt.datetime | None = None
    bag_max_slices: int = 64
    out: Path | None = None
    label_format: str = "auto"
    cache_dir: Path | None = None
    index: Path | None = None
    architecture: str = "efficientnet-b0"
    size: int = 256
    context: int = 0
    windows: tuple[tuple[float, float], ...] = tuple((w.center, w.width) for w in DEFAULT_WINDOWS)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 5
    oversample: float = 1.0
    augment: bool = True
    target_sensitivity: float = 0.95
    workers: int = 0
    device: str = "auto"
    amp: bool = True
    name: str = "triage-node-ich"
    version: str = ""
    note: str = ""
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.work_dir, Path):
            raise TypeError(f"work_dir must be a Path, got {self.work_dir!r}")
        for name in ("data", "labels", "spool"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                raise TypeError(f"{name} must be a Path or None, got {value!r}")
        if (self.data is None) != (self.labels is None):
            raise ValueError("data and labels go together: give both or neither")
        if self.from_store is not None:
            if not isinstance(self.from_store, str) or not self.from_store:
                raise ValueError("from_store must be a database URL")
            if self.spool is None:
                raise ValueError("from_store needs spool (the node's [storage] path)")
        elif self.data is None:
            raise ValueError("no training data: give data and labels, or from_store")
        since = self.from_store_since
        if since is not None and (not isinstance(since, dt.datetime) or since.tzinfo is None):
            raise ValueError(f"from_store_since must be a timezone-aware datetime, got {since!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is unknown; known: {', '.join(ARCHITECTURES)}"
            )
        if self.label_format not in ("auto", "rsna", "generic"):
            raise ValueError(
                f"label_format must be auto, rsna or generic, got {self.label_format!r}"
            )
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size}
        for key, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if (isinstance(self.bag_max_slices, bool) or not isinstance(self.bag_max_slices, int)
                or self.bag_max_slices < 1):
            raise ValueError(f"bag_max_slices must be an int >= 1, got {self.bag_max_slices!r}")
        for key, value in {"patience": self.patience, "workers": self.workers,
                           "seed": self.seed}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not (math.isfinite(self.oversample) and self.oversample >= 1.0):
            raise ValueError(f"oversample must be >= 1, got {self.oversample!r}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(
                f"target_sensitivity must be in (0, 1], got {self.target_sensitivity!r}"
            )
        self.spec()  # validates size, context and windows

    def spec(self) -> PreprocessSpec:
        """The preprocessing these settings describe."""
        try:
            windows = tuple(Window(float(c), float(w)) for c, w in self.windows)
            return PreprocessSpec(windows=windows, size=self.size, context=self.context)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preprocessing settings (size/context/windows): {exc}") from exc

    @property
    def cache_path(self) -> Path:
        """Where the slice cache lives."""
        return self.cache_dir or self.work_dir / "cache"

    @property
    def index_path(self) -> Path:
        """Where the header index lives."""
        return self.index or self.cache_path / "index.csv"

    @property
    def store_index_path(self) -> Path:
        """Where the header index of the store's spool files lives."""
        return self.cache_path / "store-index.csv"

    @property
    def out_path(self) -> Path:
        """Where the artifact is written."""
        return self.out or self.work_dir / "model.tnm"

    def to_json(self) -> dict[str, Any]:
        """JSON-able settings (paths as strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        out["windows"] = [list(w) for w in self.windows]
        out["from_store"] = redact_url(self.from_store) if self.from_store else None
        since = self.from_store_since
        out["from_store_since"] = since.isoformat() if since else None
        return out


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    artifact: Path
    meta: ModelMeta
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


# -- data -----------------------------------------------------------------------------------


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, small affine changes and mild intensity jitter, per sample, on a batch.

    Each sample gets: a left-right flip with probability 0.5; a rotation of up to +-10
    degrees, a scale of 0.9-1.1 and a shift of up to 5 % of the side (one ``affine_grid`` /
    ``grid_sample``, bilinear, zero padding - 0 is air in every window); then intensity
    ``x * (1 + a) + b`` with ``a`` in +-0.1 and ``b`` in +-0.05. All channels of a sample
    (windows and 2.5D neighbours) move together. Done on the batch, on the training device:
    per-sample CPU transforms were the bottleneck (about 10 ms a slice for MONAI's
    ``RandAffine`` against well under 1 ms here).

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` inputs.
    generator : torch.Generator
        CPU generator all parameters are drawn from (so results do not depend on device).

    Returns
    -------
    torch.Tensor
        Augmented batch, same shape, dtype and device.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    angle = uniform(-math.radians(10.0), math.radians(10.0))
    scale = uniform(0.9, 1.1)
    shift_x, shift_y = uniform(-0.1, 0.1), uniform(-0.1, 0.1)  # 5 % of the side, in [-1, 1]
    gain, offset = uniform(-0.1, 0.1), uniform(-0.05, 0.05)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)],
        1,
    ).to(device=x.device, dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    g = (1.0 + gain).to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)
    b = offset.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)
    return out * g + b


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Slices from the cache as ``(x, y)`` tensors (augmentation happens per batch).

    Parameters
    ----------
    cache : SliceCache
        Where the preprocessed series are.
    groups : mapping of str to sequence of SliceRecord
        Series UID to the series' slices (those present in the cache).
    """

    def __init__(self, cache: SliceCache, groups: Mapping[str, Sequence[SliceRecord]]) -> None:
        self.cache = cache
        self.groups = {uid: list(rs) for uid, rs in groups.items()}
        self.items: list[SliceRecord] = [r for uid in sorted(self.groups) for r in self.groups[uid]]

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> NDArray[np.float32]:
        """``(N, 6)`` labels in item order."""
        return np.array([r.labels for r in self.items], dtype=np.float32).reshape(-1, len(LABELS))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.items[i]
        x = torch.from_numpy(self.cache.slice(self.groups[r.series_uid], r.image_id))
        return x, torch.tensor(r.labels, dtype=torch.float32)


# -- loss, prediction -----------------------------------------------------------------------


def weighted_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The RSNA weighted log loss on logits: BCE per label, ``any`` weighted 2, mean.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, 6)`` network outputs.
    target : torch.Tensor
        ``(N, 6)`` 0/1 labels.

    Returns
    -------
    torch.Tensor
        Scalar ``sum(w * bce) / (sum(w) * N)``, the quantity
        :func:`train.metrics.weighted_log_loss` reports.
    """
    w = torch.tensor(LABEL_WEIGHTS, dtype=logits.dtype, device=logits.device)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target.to(logits.dtype), reduction="none"
    )
    return (bce * w).sum() / (w.sum() * logits.shape[0])


def mil_bce(
    slice_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The weighted BCE of one bag: series logit = maximum over its slices, per label.

    Why the maximum (and not log-sum-exp): see the module docstring; it is the worker's
    series score.

    Parameters
    ----------
    slice_logits : torch.Tensor
        ``(K, 6)`` network outputs of the bag's slices.
    target : torch.Tensor
        ``(6,)`` 0/1 series labels.
    mask : torch.Tensor, optional
        ``(6,)`` 1 for labels the verdict speaks to, 0 for the others (left out of the
        loss); default all.

    Returns
    -------
    torch.Tensor
        Scalar ``sum(w * m * bce(max_k z_k, y)) / sum(w * m)`` with ``w`` 2 for ``any``;
        with all of ``mask`` 1 this equals ``weighted_bce`` of the max logits as one row.

    Raises
    ------
    ValueError
        If the shapes do not fit or the bag is empty.
    """
    if slice_logits.ndim != 2 or slice_logits.shape[0] == 0:
        raise ValueError(f"slice_logits must be (K >= 1, 6), got {tuple(slice_logits.shape)}")
    if target.shape != slice_logits.shape[1:]:
        raise ValueError(f"target must have shape {tuple(slice_logits.shape[1:])}, got "
                         f"{tuple(target.shape)}")
    w = torch.tensor(LABEL_WEIGHTS, dtype=slice_logits.dtype, device=slice_logits.device)
    if mask is not None:
        w = w * mask.to(device=w.device, dtype=w.dtype)
    series_logit = slice_logits.max(dim=0).values
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        series_logit, target.to(device=w.device, dtype=w.dtype), reduction="none"
    )
    return (bce * w).sum() / w.sum()


def bag_slices(n: int, cap: int, generator: torch.Generator) -> list[int]:
    """Which slices of an ``n``-slice bag a training step uses: all, or a stride of them.

    A bag of up to ``cap`` slices is used whole. A longer one (a thin-slice series) is
    thinned to every ``ceil(n / cap)``-th slice from a random offset: the whole head at a
    coarser spacing, as a thick-slice series shows it, so a bleed extending over the stride
    is never missed, and each epoch sees another offset.

    Parameters
    ----------
    n : int
        Slices in the bag (>= 1).
    cap : int
        Most slices used (>= 1).
    generator : torch.Generator
        Source of the offset.

    Returns
    -------
    list of int
        Ascending slice indices, at most ``cap``.
    """
    if n <= cap:
        return list(range(n))
    stride = math.ceil(n / cap)
    offset = int(torch.randint(stride, (1,), generator=generator))
    return list(range(offset, n, stride))[:cap]


def _bag_inputs(cache: SliceCache, bag: Bag, indices: Sequence[int]) -> torch.Tensor:
    """Model inputs of the given slices of ``bag``."""
    rs = bag.records
    return torch.from_numpy(np.stack([cache.slice(rs, rs[i].image_id) for i in indices]))


def _bag_plan(sizes: Sequence[int], steps: int, budget: int,
              generator: torch.Generator) -> tuple[list[list[int]], int]:
    """Bag indices for each step, and how many bags did not fit this epoch.

    Bags are shuffled and dealt round-robin to the steps, at most ``ceil(n / steps)`` to a
    step and, beyond its first bag, no more slice rows than ``budget``.
    """
    n = len(sizes)
    plan: list[list[int]] = [[] for _ in range(steps)]
    if not n:
        return plan, 0
    per = math.ceil(n / steps)
    rows = [0] * steps
    at = skipped = 0
    for i in torch.randperm(n, generator=generator).tolist():
        for _ in range(steps):
            s = at
            at = (at + 1) % steps
            if len(plan[s]) < per and (not plan[s] or rows[s] + sizes[i] <= budget):
                plan[s].append(i)
                rows[s] += sizes[i]
                break
        else:
            skipped += 1
    return plan, skipped


def _step_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    bag_rows: Sequence[tuple[int, int]],
    bags: Sequence[Bag],
) -> tuple[torch.Tensor, float]:
    """The step's loss and its total weight (a slice 1, a bag 1).

    ``logits`` holds the slice batch (``len(y)`` rows) followed by each bag's rows,
    ``bag_rows[i] = (start, stop)`` for ``bags[i]``.
    """
    n = len(y)
    if not bags:
        return weighted_bce(logits, y), float(n)
    total = weighted_bce(logits[:n], y) * n if n else logits.new_zeros(())
    for (start, stop), bag in zip(bag_rows, bags, strict=True):
        target = torch.tensor(bag.labels, dtype=logits.dtype, device=logits.device)
        mask = torch.tensor(bag.mask, dtype=logits.dtype, device=logits.device)
        total = total + mil_bce(logits[start:stop], target, mask)
    weight = float(n + len(bags))
    return total / weight, weight


def predict(
    network: torch.nn.Module,
    dataset: SliceDataset,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = True,
    progress: bool = False,
    desc: str = "predict",
) -> NDArray[np.float32]:
    """Sigmoid probabilities ``(N, 6)`` of every item of ``dataset``, in item order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    network.eval()
    out: list[NDArray[np.float32]] = []
    bar = _progress(total=len(dataset), desc=desc, unit="slice", enabled=progress)
    try:
        with torch.inference_mode():
            for x, _ in loader:
                x = x.to(device, non_blocking=True)
                if device.type == "cuda" and amp:
                    with torch.autocast("cuda", dtype=torch.float16):
                        logits = network(x)
                else:
                    logits = network(x)
                out.append(torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32))
                bar.update(len(x))
    finally:
        bar.close()
    if not out:
        return np.zeros((0, len(LABELS)), dtype=np.float32)
    return np.concatenate(out)


def series_scores(
    items: Sequence[SliceRecord], probs: NDArray[np.float32], labels: NDArray[np.float32]
) -> tuple[list[str], NDArray[np.float32], NDArray[np.float32]]:
    """Series-level probabilities and labels: the maximum over each series' slices.

    This is how the worker scores a series (``pipeline.Predictor.post_process``).

    Returns
    -------
    (series_uids, probs, labels) : list of str and two ``(S, 6)`` arrays
    """
    index: dict[str, list[int]] = {}
    for i, r in enumerate(items):
        index.setdefault(r.series_uid, []).append(i)
    uids = sorted(index)
    p = np.stack([probs[index[u]].max(axis=0) for u in uids]).astype(np.float32)
    y = np.stack([labels[index[u]].max(axis=0) for u in uids]).astype(np.float32)
    return uids, p, y


@dataclass(frozen=True)
class Scores:
    """Predictions on :class:`LabelledData`: strong slices, and series (strong, then bags).

    ``series_probs`` / ``series_labels`` hold the series of the strong slices (sorted by
    UID) followed by the bags (in bag order); a series' probability is the maximum over its
    slices, as the worker computes it. A bag confirmed without subtype has subtype labels
    0 here (unknown, scored as absent at the series level).
    """

    slice_probs: NDArray[np.float32]
    slice_labels: NDArray[np.float32]
    series_probs: NDArray[np.float32]
    series_labels: NDArray[np.float32]
    bag_probs: NDArray[np.float32]  # the bags' rows of series_probs, in bag order

    @property
    def has_slices(self) -> bool:
        """Whether there are strongly labelled slices to score."""
        return len(self.slice_labels) > 0


@dataclass(frozen=True)
class LabelledData:
    """Labelled data to score: strong slices, bags, and every bag slice for prediction.

    The validation side of a run, or what ``triage-node evaluate`` evaluates.
    """

    slices: SliceDataset
    bags: list[Bag]
    bag_slices: SliceDataset

    @classmethod
    def build(cls, cache: SliceCache, records: Sequence[SliceRecord],
              bags: Sequence[Bag]) -> LabelledData:
        """From strong slices and bags (the cache already built for their series)."""
        return cls(SliceDataset(cache, cached_records(cache, series_groups(records))),
                   list(bags), SliceDataset(cache, {b.series_uid: list(b.records) for b in bags}))

    def score(self, network: torch.nn.Module, *, device: torch.device, batch_size: int,
              workers: int = 0, amp: bool = True, progress: bool = False,
              desc: str = "validate") -> Scores:
        """Predict every slice; series are the maximum over their slices (the worker's)."""
        probs = predict(network, self.slices, device=device, batch_size=batch_size,
                        workers=workers, amp=amp, progress=progress, desc=desc)
        y = self.slices.labels()
        empty = np.zeros((0, len(LABELS)), dtype=np.float32)
        sp, sy = empty, empty
        if len(self.slices):
            _, sp, sy = series_scores(self.slices.items, probs, y)
        bag_p = empty
        if self.bags:
            pb = predict(network, self.bag_slices, device=device, batch_size=batch_size,
                         workers=workers, amp=amp, progress=progress, desc=f"{desc} bags")
            uids, bp, _ = series_scores(self.bag_slices.items, pb, self.bag_slices.labels())
            row = {u: i for i, u in enumerate(uids)}
            bag_p = np.stack([bp[row[b.series_uid]] for b in self.bags]).astype(np.float32)
            by = np.array([b.labels for b in self.bags], dtype=np.float32)
            sp, sy = np.concatenate([sp, bag_p]), np.concatenate([sy, by])
        return Scores(probs, y, sp, sy, bag_p)

    def objective(self, scored: Scores) -> float:
        """The series-level weighted log loss, each series once, a bag's unknown labels out."""
        w = np.asarray(LABEL_WEIGHTS, dtype=np.float64)
        masks = np.ones_like(scored.series_labels, dtype=np.float64)
        if self.bags:
            masks[len(masks) - len(self.bags):] = [b.mask for b in self.bags]
        q = np.clip(scored.series_probs.astype(np.float64), EPS, 1.0 - EPS)
        y = scored.series_labels.astype(np.float64)
        loss = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
        m = masks * w[None, :]
        return float(((loss * m).sum(axis=1) / m.sum(axis=1)).mean())


def _validation_metrics(validation: LabelledData, scored: Scores) -> dict[str, Any]:
    sp, sy = scored.series_probs, scored.series_labels
    auc = roc_auc(sy[:, 0], sp[:, 0])
    row: dict[str, Any] = {
        "val_weighted_log_loss": None,
        "val_series_weighted_log_loss": weighted_log_loss(sy, sp),
        "val_slice_any_auc": None,
        "val_series_any_auc": None if math.isnan(auc) else auc,
    }
    if scored.has_slices:
        y, probs = scored.slice_labels, scored.slice_probs
        slice_auc = roc_auc(y[:, 0], probs[:, 0])
        row["val_weighted_log_loss"] = weighted_log_loss(y, probs)
        row["val_slice_any_auc"] = None if math.isnan(slice_auc) else slice_auc
    if validation.bags:
        row["val_bags"] = len(validation.bags)
        row["val_objective"] = validation.objective(scored)
    return row


def _criterion(row: Mapping[str, Any]) -> float:
    """What early stopping and ``best.pt`` minimise: the objective when bags validate."""
    value = row.get("val_objective", row["val_weighted_log_loss"])
    return float(value)


# -- schedule, seeding ----------------------------------------------------------------------


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1, then cosine decay to 0 (factor of the peak lr)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _sampler(
    dataset: SliceDataset, oversample: float, generator: torch.Generator
) -> Sampler[int]:
    if oversample == 1.0:
        return RandomSampler(dataset, generator=generator)
    positive = dataset.labels()[:, 0] > 0
    weights = np.where(positive, oversample, 1.0)
    return WeightedRandomSampler(
        weights.tolist(), num_samples=len(dataset),
        replacement=True, generator=generator,
    )


# -- the run --------------------------------------------------------------------------------


def _check_resume(config: TrainConfig, saved: Mapping[str, Any]) -> None:
    now = config.to_json()
    # A checkpoint from before a setting existed ran with its default.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    differing = [k for k in _RESUME_FIXED if now.get(k) != saved.get(k, defaults.get(k))]
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
                            for k in differing)
        raise ValueError(f"--resume: settings differ from the checkpoint's ({details})")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    config: TrainConfig, *, resume: bool = False, command: str = ""
) -> TrainResult:
    """Train a model and write its artifact (see the module docstring for the steps).

    Parameters
    ----------
    config : TrainConfig
        The settings.
    resume : bool, optional
        Continue from ``work_dir / "checkpoint.pt"``; its data and training settings must
        match ``config`` (``epochs`` and ``patience`` may change).
    command : str, optional
        The command line, recorded in the artifact.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        If the data give no usable split, the validation set has no series positive for
        ``any``, ``resume`` is set but there is no compatible checkpoint, or it is not set
        and ``work_dir`` already holds a checkpoint.
    """
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path, log_path = work / CHECKPOINT, work / BEST, work / METRICS_LOG
    checkpoint: dict[str, Any] | None = None
    if resume:
        if not checkpoint_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        _check_resume(config, checkpoint["config"])
    elif checkpoint_path.exists():
        raise ValueError(
            f"work_dir {work} already holds a run ({checkpoint_path.name}); continue it with "
            f"--resume or choose another --work-dir"
        )
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    spec = config.spec()

    records: list[SliceRecord] = []
    if config.data is not None and config.labels is not None:
        records = load_records(config.data, config.labels, config.index_path,
                               label_format=config.label_format, workers=config.workers,
                               progress=config.progress)
    cache = SliceCache(config.cache_path, spec)
    store = _store_data(config, records, resume) if config.from_store is not None else None
    groups = series_groups(records)
    if store is not None:
        groups.update(series_groups([*store.negatives, *bag_records(store.bags)]))
    cache.build(groups, workers=config.workers, progress=config.progress)
    bags: list[Bag] = []
    if store is not None:
        store = cached_store(cache, store)
        records = [*records, *store.negatives]
        bags = store.bags
    train_records, val_records, train_bags, val_bags = split_sources(
        records, bags, config.val_fraction, config.seed)
    train_ds = SliceDataset(cache, cached_records(cache, series_groups(train_records)))
    validation = LabelledData.build(cache, val_records, val_bags)
    val_ds = validation.slices
    if len(train_ds) == 0:
        raise ValueError("no strongly labelled training slice (CSV data or refuted series): "
                         "confirmed series alone cannot train a classifier")
    if len(val_ds) == 0 and not val_bags:
        raise ValueError("no usable slice on one side of the split")
    patients = {"train": {r.patient_id for r in train_records}
                | {b.patient_id for b in train_bags},
                "validation": {r.patient_id for r in val_records}
                | {b.patient_id for b in val_bags}}
    split = {"seed": config.seed, "val_fraction": config.val_fraction,
             "train": sorted(patients["train"]), "validation": sorted(patients["validation"])}
    if store is not None:
        split["bags"] = {"train": len(train_bags), "validation": len(val_bags)}
    (work / SPLIT).write_text(json.dumps(split, indent=1) + "\n")
    log.info("training on %d slices (%d series), validating on %d slices (%d series); %s",
             len(train_ds), len(train_ds.groups), len(val_ds), len(val_ds.groups), device)
    if store is not None:
        log.info("store bags (confirmed series): %d training, %d validation",
                 len(train_bags), len(val_bags))

    _seed_everything(config.seed)
    network = build_network(config.architecture, spec.channels).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    drop_last = len(train_ds) > config.batch_size
    steps_per_epoch = (len(train_ds) // config.batch_size if drop_last
                       else math.ceil(len(train_ds) / config.batch_size))
    warmup = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup, steps_per_epoch * config.epochs)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    bag_sizes = [min(len(b.records), config.bag_max_slices) for b in train_bags]
    bag_budget = max(config.batch_size, config.bag_max_slices)

    start_epoch = 0
    best_loss = math.inf
    best_epoch = -1
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        network.load_state_dict(checkpoint["network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_loss = float(checkpoint["best_loss"])
        best_epoch = int(checkpoint["best_epoch"])
        history = list(checkpoint["history"])
        log.info("resuming after epoch %d (best so far: epoch %d, loss %.4f)",
                 start_epoch, best_epoch + 1, best_loss)
    with log_path.open("w") as fh:  # the checkpoint's history is the truth on resume
        fh.writelines(json.dumps(h) + "\n" for h in history)

    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if config.patience and best_epoch >= 0 and epoch - 1 - best_epoch >= config.patience:
            stopped_early = True
            break
        torch.manual_seed(_epoch_seed(config.seed, epoch, 0))
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1))
        aug_generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 2))
        bag_generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 3))
        plan, skipped = _bag_plan(bag_sizes, steps_per_epoch, bag_budget, bag_generator)
        if skipped:
            log.info("epoch %d: %d of %d training bags do not fit into its %d steps (at most "
                     "%d bag slices a step); a fresh random subset each epoch", epoch + 1,
                     skipped, len(train_bags), steps_per_epoch, bag_budget)
        loader = DataLoader(
            train_ds, batch_size=config.batch_size,
            sampler=_sampler(train_ds, config.oversample, generator),
            num_workers=config.workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        )
        network.train()
        t0 = time.perf_counter()
        seen = 0
        bags_seen = 0
        weight_sum = 0.0
        loss_sum = 0.0
        bar = _progress(total=steps_per_epoch * config.batch_size,
                        desc=f"epoch {epoch + 1}/{config.epochs}", unit="slice",
                        enabled=config.progress)
        try:
            for step, (x, y) in enumerate(loader):
                step_bags = [train_bags[i] for i in plan[step]] if step < len(plan) else []
                x, rows = _with_bags(cache, x, step_bags, config.bag_max_slices,
                                     bag_generator)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if config.augment:
                    x = augment_batch(x, aug_generator)
                optimizer.zero_grad(set_to_none=True)
                if use_amp:
                    with torch.autocast("cuda", dtype=torch.float16):
                        logits = network(x)
                else:
                    logits = network(x)
                loss, weight = _step_loss(logits.float(), y, rows, step_bags)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                seen += len(y)
                bags_seen += len(step_bags)
                weight_sum += weight
                loss_sum += float(loss.detach()) * weight
                bar.update(len(y))
                bar.set_postfix_str(f"loss {loss_sum / weight_sum:.4f}")
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t0
        scored = validation.score(network, device=device, batch_size=config.batch_size * 2,
                                  workers=config.workers, amp=config.amp,
                                  progress=config.progress)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1.0, weight_sum),
            "lr": float(scheduler.get_last_lr()[0]),
            "train_seconds": round(train_seconds, 3),
            "slices_per_second": round(seen / train_seconds, 2) if train_seconds else None,
            **({"train_bags": bags_seen} if train_bags else {}),
            **_validation_metrics(validation, scored),
        }
        improved = _criterion(row) < best_loss
        if improved:
            best_loss = _criterion(row)
            best_epoch = epoch
            _atomic_torch_save({k: v.detach().cpu() for k, v in network.state_dict().items()},
                               best_path)
        row["best"] = improved
        history.append(row)
        _atomic_torch_save(
            {
                "epoch": epoch,
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "history": history,
                "config": config.to_json(),
            },
            checkpoint_path,
        )
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info(
            "epoch %d/%d: train loss %.4f, val weighted log loss %s%s, val series AUC(any) %s, "
            "%.1f slices/s%s", epoch + 1, config.epochs, row["train_loss"],
            _fmt4(row["val_weighted_log_loss"]),
            f" (objective {row['val_objective']:.4f})" if "val_objective" in row else "",
            _fmt4(row["val_series_any_auc"]),
            row["slices_per_second"] or 0.0, " (best)" if improved else "",
        )

    if not best_path.is_file():
        raise ValueError(f"no trained epoch to export: {best_path} is missing")
    network.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    scored = validation.score(network, device=device, batch_size=config.batch_size * 2,
                              workers=config.workers, amp=config.amp, progress=config.progress)
    return _export(config, network, spec, train_ds, train_bags, validation, scored, store,
                   history, best_epoch, stopped_early, device, command)


def _fmt4(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _store_data(config: TrainConfig, records: Sequence[SliceRecord], resume: bool) -> StoreData:
    """The store's labels: read and frozen in the work dir, or (resume) the frozen ones.

    Series that the CSV data label slice by slice keep those labels (stronger than a
    series-level verdict); their store copy is left out and counted.
    """
    assert config.from_store is not None and config.spool is not None
    snapshot = config.work_dir / SNAPSHOT
    if resume:
        data = read_snapshot(snapshot)
        log.info("store labels from %s (frozen when the run started)", snapshot)
        return data
    data = load_store_data(config.from_store, config.spool, config.store_index_path,
                           since=config.from_store_since, workers=config.workers,
                           progress=config.progress)
    data = without_series(data, records)
    write_snapshot(snapshot, data)
    return data


def _with_bags(
    cache: SliceCache,
    x: torch.Tensor,
    bags: Sequence[Bag],
    cap: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The slice batch with each bag's slices (:func:`bag_slices`) appended; their rows."""
    if not bags:
        return x, []
    parts = [x]
    rows: list[tuple[int, int]] = []
    at = len(x)
    for bag in bags:
        picked = bag_slices(len(bag.records), cap, generator)
        parts.append(_bag_inputs(cache, bag, picked))
        rows.append((at, at + len(picked)))
        at += len(picked)
    return torch.cat(parts), rows


def _export(
    config: TrainConfig,
    network: torch.nn.Module,
    spec: PreprocessSpec,
    train_ds: SliceDataset,
    train_bags: Sequence[Bag],
    validation: LabelledData,
    scored: Scores,
    store: StoreData | None,
    history: list[dict[str, Any]],
    best_epoch: int,
    stopped_early: bool,
    device: torch.device,
    command: str,
) -> TrainResult:
    sp, sy = scored.series_probs, scored.series_labels
    if not sy[:, 0].any():
        raise ValueError(
            "the validation split has no series positive for 'any'; cannot choose the "
            "operating threshold (use more data or a larger val_fraction)"
        )
    threshold, conf = threshold_for_sensitivity(sy[:, 0], sp[:, 0], config.target_sensitivity)
    y, probs = scored.slice_labels, scored.slice_probs
    metrics: dict[str, Any] = {
        "split": "validation",
        "slice.weighted_log_loss": weighted_log_loss(y, probs) if scored.has_slices else None,
        "series.weighted_log_loss": weighted_log_loss(sy, sp),
        "slice.any.auc": _none_if_nan(roc_auc(y[:, 0], probs[:, 0]))
        if scored.has_slices else None,
        "series.any.auc": _none_if_nan(roc_auc(sy[:, 0], sp[:, 0])),
        "series.any.threshold": threshold,
        "series.any.target_sensitivity": config.target_sensitivity,
        "series.any.sensitivity": conf.sensitivity,
        "series.any.specificity": _none_if_nan(conf.specificity),
        "series.any.tp": conf.tp,
        "series.any.fp": conf.fp,
        "series.any.tn": conf.tn,
        "series.any.fn": conf.fn,
    }
    if validation.bags:
        metrics["series.count"] = len(sy)
        metrics["series.bags"] = len(validation.bags)
        metrics["objective"] = validation.objective(scored)
    speeds = [h["slices_per_second"] for h in history if h.get("slices_per_second")]
    training = {
        "note": config.note,
        "command": command,
        "seed": config.seed,
        "config": config.to_json(),
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "train_data": describe_records(train_ds.items),
        "validation_data": describe_records(validation.slices.items),
        "slices_per_second_median": float(np.median(speeds)) if speeds else None,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "history": history,
    }
    if store is not None:
        training["train_bags"] = describe_bags(train_bags)
        training["validation_bags"] = describe_bags(validation.bags)
        training["sources"] = _sources(config, store)
    thresholds = dict.fromkeys(LABELS, 0.5)
    thresholds["any"] = threshold
    meta = ModelMeta(
        architecture=config.architecture,
        in_channels=spec.channels,
        labels=LABELS,
        preprocess=spec.to_dict(),
        thresholds=thresholds,
        version=config.version or f"trained-{utc_now()[:10]}-seed{config.seed}",
        created=utc_now(),
        training=training,
        metrics=metrics,
        name=config.name,
    )
    out = config.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = save_artifact(out, network.cpu(), meta)
    log.info("wrote %s: series AUC(any) %s, threshold %.4f -> sensitivity %.3f, specificity %s",
             out, metrics["series.any.auc"], threshold, conf.sensitivity,
             metrics["series.any.specificity"])
    return TrainResult(out, saved, len(history), best_epoch + 1, stopped_early, history)


def _sources(config: TrainConfig, store: StoreData) -> dict[str, Any]:
    """Where the data came from, for the artifact: counts only, no UID or patient id."""
    summary = public_summary(store)
    summary["source"] = redact_url(config.from_store or "")
    summary["spool"] = str(config.spool)
    csv = ({"data": str(config.data), "labels": str(config.labels)}
           if config.data is not None else None)
    return {"csv": csv, "store": summary}


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x

