"""Training: data to a model artifact the worker can load.

:func:`train` runs the whole thing:

1. labels + header index (:func:`train.data.load_records`), split by patient,
   multilabel-stratified (:func:`train.data.split_patients`);
2. every series preprocessed once into the persistent slice cache with the one
   preprocessing (:class:`train.data.SliceCache`);
3. epochs of AdamW with a linear warm-up and a cosine decay (stepped per batch), the RSNA
   weighted BCE as the loss (``any`` weighted 2), optional oversampling of slices positive
   for ``any``, augmentations applied to each batch on the device (left-right flip, small
   rotation / scale / shift, mild intensity jitter: :func:`augment_batch`), AMP on CUDA;
4. the patients of each side are written to ``split.json``; after every epoch: validation
   (slice weighted log loss, series AUC of ``any``), a line in ``metrics.jsonl``,
   ``checkpoint.pt`` (everything ``--resume`` needs) and, when the validation loss
   improved, ``best.pt``; early stopping after ``patience`` epochs without improvement;
5. the best epoch's weights, the operating threshold of ``any`` chosen on the validation
   series for the target sensitivity, and the validation figures go into the artifact.

Reproducibility: every random draw is derived from ``seed`` and the epoch (the sampler's
generator, the augmentation generator, torch's RNG for dropout), so a run resumed from a
checkpoint takes the same steps as one that never stopped, and the same command with the
same seed gives the same model on the same hardware.
"""

from __future__ import annotations

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
    split_patients,
)
from train.metrics import LABEL_WEIGHTS, roc_auc, threshold_for_sensitivity, weighted_log_loss
from triage_node.domain import LABELS
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
    "SliceDataset",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
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
_RESUME_FIXED = (
    "data", "labels", "label_format", "architecture", "size", "context", "windows",
    "val_fraction", "seed", "batch_size", "lr", "weight_decay", "warmup_epochs", "oversample",
    "augment",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on construction.

    Attributes
    ----------
    data : Path
        Folder of the DICOM files.
    labels : Path
        ``stage_2_train.csv`` or a generic CSV.
    work_dir : Path
        Checkpoints, ``metrics.jsonl`` and (by default) the index and slice cache.
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

    data: Path
    labels: Path
    work_dir: Path
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
        for name in ("data", "labels", "work_dir"):
            if not isinstance(getattr(self, name), Path):
                raise TypeError(f"{name} must be a Path, got {getattr(self, name)!r}")
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


def _validation_metrics(
    dataset: SliceDataset, probs: NDArray[np.float32]
) -> dict[str, float | None]:
    y = dataset.labels()
    _, sp, sy = series_scores(dataset.items, probs, y)
    auc = roc_auc(sy[:, 0], sp[:, 0])
    slice_auc = roc_auc(y[:, 0], probs[:, 0])
    return {
        "val_weighted_log_loss": weighted_log_loss(y, probs),
        "val_series_weighted_log_loss": weighted_log_loss(sy, sp),
        "val_slice_any_auc": None if math.isnan(slice_auc) else slice_auc,
        "val_series_any_auc": None if math.isnan(auc) else auc,
    }


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
    differing = [k for k in _RESUME_FIXED if now.get(k) != saved.get(k)]
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

    records = load_records(config.data, config.labels, config.index_path,
                           label_format=config.label_format, workers=config.workers,
                           progress=config.progress)
    train_records, val_records = split_patients(records, config.val_fraction, config.seed)
    cache = SliceCache(config.cache_path, spec)
    train_groups = series_groups(train_records)
    val_groups = series_groups(val_records)
    cache.build({**train_groups, **val_groups}, workers=config.workers, progress=config.progress)
    train_ds = SliceDataset(cache, cached_records(cache, train_groups))
    val_ds = SliceDataset(cache, cached_records(cache, val_groups))
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError("no usable slice on one side of the split")
    split = {"seed": config.seed, "val_fraction": config.val_fraction,
             "train": sorted({r.patient_id for r in train_records}),
             "validation": sorted({r.patient_id for r in val_records})}
    (work / SPLIT).write_text(json.dumps(split, indent=1) + "\n")
    log.info("training on %d slices (%d series), validating on %d slices (%d series); %s",
             len(train_ds), len(train_ds.groups), len(val_ds), len(val_ds.groups), device)

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
        loader = DataLoader(
            train_ds, batch_size=config.batch_size,
            sampler=_sampler(train_ds, config.oversample, generator),
            num_workers=config.workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        )
        network.train()
        t0 = time.perf_counter()
        seen = 0
        loss_sum = 0.0
        bar = _progress(total=steps_per_epoch * config.batch_size,
                        desc=f"epoch {epoch + 1}/{config.epochs}", unit="slice",
                        enabled=config.progress)
        try:
            for x, y in loader:
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
                loss = weighted_bce(logits.float(), y)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                seen += len(x)
                loss_sum += float(loss.detach()) * len(x)
                bar.update(len(x))
                bar.set_postfix_str(f"loss {loss_sum / seen:.4f}")
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t0
        probs = predict(network, val_ds, device=device, batch_size=config.batch_size * 2,
                        workers=config.workers, amp=config.amp, progress=config.progress,
                        desc="validate")
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "lr": float(scheduler.get_last_lr()[0]),
            "train_seconds": round(train_seconds, 3),
            "slices_per_second": round(seen / train_seconds, 2) if train_seconds else None,
            **_validation_metrics(val_ds, probs),
        }
        improved = row["val_weighted_log_loss"] < best_loss
        if improved:
            best_loss = float(row["val_weighted_log_loss"])
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
            "epoch %d/%d: train loss %.4f, val weighted log loss %.4f, val series AUC(any) %s, "
            "%.1f slices/s%s", epoch + 1, config.epochs, row["train_loss"],
            row["val_weighted_log_loss"],
            "n/a" if row["val_series_any_auc"] is None else f"{row['val_series_any_auc']:.4f}",
            row["slices_per_second"] or 0.0, " (best)" if improved else "",
        )

    if not best_path.is_file():
        raise ValueError(f"no trained epoch to export: {best_path} is missing")
    network.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    probs = predict(network, val_ds, device=device, batch_size=config.batch_size * 2,
                    workers=config.workers, amp=config.amp, progress=config.progress,
                    desc="validate")
    return _export(config, network, spec, train_ds, val_ds, probs, history, best_epoch,
                   stopped_early, device, command)


def _export(
    config: TrainConfig,
    network: torch.nn.Module,
    spec: PreprocessSpec,
    train_ds: SliceDataset,
    val_ds: SliceDataset,
    probs: NDArray[np.float32],
    history: list[dict[str, Any]],
    best_epoch: int,
    stopped_early: bool,
    device: torch.device,
    command: str,
) -> TrainResult:
    y = val_ds.labels()
    _, sp, sy = series_scores(val_ds.items, probs, y)
    if not sy[:, 0].any():
        raise ValueError(
            "the validation split has no series positive for 'any'; cannot choose the "
            "operating threshold (use more data or a larger val_fraction)"
        )
    threshold, conf = threshold_for_sensitivity(sy[:, 0], sp[:, 0], config.target_sensitivity)
    metrics = {
        "split": "validation",
        "slice.weighted_log_loss": weighted_log_loss(y, probs),
        "series.weighted_log_loss": weighted_log_loss(sy, sp),
        "slice.any.auc": _none_if_nan(roc_auc(y[:, 0], probs[:, 0])),
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
        "validation_data": describe_records(val_ds.items),
        "slices_per_second_median": float(np.median(speeds)) if speeds else None,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "history": history,
    }
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


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x

