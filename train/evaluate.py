"""Evaluation of a model artifact on labelled data: figures, plots and a report.

:func:`evaluate` preprocesses the data with the artifact's own preprocessing (through the
same slice cache as training), predicts every slice, scores series as the worker does
(maximum over slices) and writes to ``out_dir``. The data are a CSV data set, the
radiologists' verdicts in a node's database (``from_store``: refuted series are slice-level
negatives, confirmed ones count at the series level only, see :mod:`train.feedback`), or
both; slice-level figures use strongly labelled slices only.

``metrics.json``
    One flat object, every figure keyed ``<level>.<label>.<metric>`` or
    ``<level>.<metric>``: levels ``slice`` and ``series``; per label ``auc``,
    ``log_loss``, ``threshold``, ``sensitivity``, ``specificity``, ``tp``, ``fp``, ``tn``,
    ``fn``, ``positives``; per level ``weighted_log_loss`` (the RSNA metric) and ``count``.
    Undefined figures (an AUC without positives) are ``null``.
``roc_slice.png``, ``roc_series.png``, ``calibration_slice.png``, ``calibration_series.png``
    ROC curves and reliability diagrams, one line per label.
``report.html``
    A self-contained page (plots embedded) with the model, the data and every figure.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from train.data import (
    SliceCache,
    SliceRecord,
    describe_records,
    load_records,
    series_groups,
)
from train.feedback import (
    Bag,
    bag_records,
    cached_store,
    describe_bags,
    load_store_data,
    public_summary,
    without_series,
)
from train.loop import LabelledData
from train.metrics import confusion, log_loss, roc_auc, roc_curve, weighted_log_loss
from triage_node.domain import LABELS
from triage_node.errors import ArtifactError
from triage_node.model import ModelMeta, load_artifact, read_meta, resolve_device
from triage_node.preprocess import PreprocessSpec

__all__ = ["LEVELS", "PLOTS", "compute_metrics", "evaluate", "format_summary", "write_report"]

log = logging.getLogger("triage_node.train")

LEVELS: tuple[str, ...] = ("slice", "series")
#: Plot files :func:`write_report` writes.
PLOTS: tuple[str, ...] = (
    "roc_slice.png", "roc_series.png", "calibration_slice.png", "calibration_series.png",
)


def _clean(x: float) -> float | None:
    """A float for JSON: NaN becomes None."""
    return None if math.isnan(x) else float(x)


def compute_metrics(
    probs: Mapping[str, NDArray[np.float32]],
    labels: Mapping[str, NDArray[np.float32]],
    thresholds: Mapping[str, float],
) -> dict[str, Any]:
    """Every figure, keyed ``<level>.<label>.<metric>`` / ``<level>.<metric>``.

    Parameters
    ----------
    probs, labels : mapping of level to ``(N, 6)`` arrays
        Probabilities and 0/1 labels per level (``slice``, ``series``).
    thresholds : mapping of label to float
        The operating thresholds (from the artifact).

    Returns
    -------
    dict
        Flat; ``None`` where a figure is undefined.
    """
    out: dict[str, Any] = {}
    for level in probs:
        p, y = probs[level], labels[level]
        out[f"{level}.count"] = len(p)
        out[f"{level}.weighted_log_loss"] = weighted_log_loss(y, p)
        for j, label in enumerate(LABELS):
            threshold = float(thresholds.get(label, 0.5))
            c = confusion(y[:, j], p[:, j], threshold)
            key = f"{level}.{label}"
            out[f"{key}.positives"] = int(y[:, j].sum())
            out[f"{key}.auc"] = _clean(roc_auc(y[:, j], p[:, j]))
            out[f"{key}.log_loss"] = log_loss(y[:, j], p[:, j])
            out[f"{key}.threshold"] = threshold
            out[f"{key}.sensitivity"] = _clean(c.sensitivity)
            out[f"{key}.specificity"] = _clean(c.specificity)
            out[f"{key}.tp"], out[f"{key}.fp"] = c.tp, c.fp
            out[f"{key}.tn"], out[f"{key}.fn"] = c.tn, c.fn
    return out


# -- plots ----------------------------------------------------------------------------------


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_roc(path: Path, p: NDArray[np.float32], y: NDArray[np.float32], level: str,
              metrics: Mapping[str, Any]) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for j, label in enumerate(LABELS):
        if not 0 < y[:, j].sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
        auc = metrics[f"{level}.{label}.auc"]
        ax.plot(fpr, tpr, lw=2.0 if label == "any" else 1.0, label=f"{label} (AUC {auc:.3f})")
    sens, spec = metrics[f"{level}.any.sensitivity"], metrics[f"{level}.any.specificity"]
    if sens is not None and spec is not None:
        ax.plot([1 - spec], [sens], "ko", label="any at operating threshold")
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=f"ROC, {level} level")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, format="png")


def _plot_calibration(path: Path, p: NDArray[np.float32], y: NDArray[np.float32],
                      level: str, bins: int = 10) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for j, label in enumerate(LABELS):
        which = np.clip(np.digitize(p[:, j], edges[1:-1]), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            sel = which == b
            if sel.any():
                xs.append(float(p[sel, j].mean()))
                ys.append(float(y[sel, j].mean()))
        ax.plot(xs, ys, marker="o", ms=3, lw=2.0 if label == "any" else 1.0, label=label)
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8, label="perfect")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability",
           ylabel="observed fraction positive", title=f"Calibration, {level} level ({bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, format="png")


# -- report ---------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_summary(metrics: Mapping[str, Any]) -> str:
    """The figures as a plain-text table (what ``triage-node evaluate`` prints)."""
    lines = []
    for level in LEVELS:
        if f"{level}.count" not in metrics:
            continue
        noun = "slices" if level == "slice" else "series"
        lines.append(f"{level} level: {metrics[f'{level}.count']} {noun}, weighted log loss "
                     f"{_fmt(metrics[f'{level}.weighted_log_loss'])}")
        lines.append(f"  {'label':<17} {'pos':>6} {'AUC':>7} {'logloss':>8} {'thresh':>7} "
                     f"{'sens':>7} {'spec':>7} {'TP':>6} {'FP':>6} {'TN':>6} {'FN':>6}")
        for label in LABELS:
            k = f"{level}.{label}"
            lines.append(
                f"  {label:<17} {metrics[k + '.positives']:>6} {_fmt(metrics[k + '.auc']):>7} "
                f"{_fmt(metrics[k + '.log_loss']):>8} {_fmt(metrics[k + '.threshold']):>7} "
                f"{_fmt(metrics[k + '.sensitivity']):>7} {_fmt(metrics[k + '.specificity']):>7} "
                f"{metrics[k + '.tp']:>6} {metrics[k + '.fp']:>6} {metrics[k + '.tn']:>6} "
                f"{metrics[k + '.fn']:>6}"
            )
    return "\n".join(lines)


def _html_table(metrics: Mapping[str, Any], level: str) -> str:
    head = ("<tr><th>label</th><th>positives</th><th>AUC</th><th>log loss</th>"
            "<th>threshold</th><th>sensitivity</th><th>specificity</th><th>TP</th><th>FP</th>"
            "<th>TN</th><th>FN</th></tr>")
    rows = []
    for label in LABELS:
        k = f"{level}.{label}"
        cells = [label] + [_fmt(metrics[f"{k}.{m}"]) for m in (
            "positives", "auc", "log_loss", "threshold", "sensitivity", "specificity",
            "tp", "fp", "tn", "fn")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(
    out_dir: Path,
    metrics: Mapping[str, Any],
    probs: Mapping[str, NDArray[np.float32]],
    labels: Mapping[str, NDArray[np.float32]],
    *,
    meta: ModelMeta,
    model_path: Path,
    data_summary: Mapping[str, Any],
) -> Path:
    """Write ``metrics.json``, the PNG plots and ``report.html`` to ``out_dir``.

    Returns
    -------
    Path
        The HTML report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(
        json.dumps(dict(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    images: dict[str, Path] = {}
    for level in LEVELS:
        if level not in probs:
            continue
        images[f"roc_{level}"] = out_dir / f"roc_{level}.png"
        _plot_roc(images[f"roc_{level}"], probs[level], labels[level], level, metrics)
        images[f"calibration_{level}"] = out_dir / f"calibration_{level}.png"
        _plot_calibration(images[f"calibration_{level}"], probs[level], labels[level], level)

    def img(key: str) -> str:
        data = base64.b64encode(images[key].read_bytes()).decode("ascii")
        return f'<img alt="{key}" src="data:image/png;base64,{data}">'

    note = str(meta.training.get("note", "") or "")
    model_rows = [
        ("file", str(model_path)), ("name", meta.name), ("version", meta.version),
        ("architecture", meta.architecture), ("weights sha256", meta.weights_sha256),
        ("note", note or "(none)"),
        ("operating threshold (any)", _fmt(float(meta.thresholds.get("any", 0.5)))),
    ]
    sections = []
    for level in LEVELS:
        if f"{level}.count" not in metrics:
            continue
        sections.append(
            f"<h2>{level.capitalize()} level</h2>"
            f"<p>{metrics[f'{level}.count']} {'slices' if level == 'slice' else 'series'}; "
            f"RSNA weighted log loss "
            f"<b>{_fmt(metrics[f'{level}.weighted_log_loss'])}</b></p>"
            f"{_html_table(metrics, level)}"
            f'<div class="plots">{img(f"roc_{level}")}{img(f"calibration_{level}")}</div>'
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>triage-node evaluation: {html.escape(meta.name)} {html.escape(meta.version)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.plots img {{ width: 45%; margin-right: 2%; }}
.warn {{ color: #a00; font-weight: bold; }}
</style></head><body>
<h1>Evaluation of {html.escape(meta.name)} {html.escape(meta.version)}</h1>
{'<p class="warn">' + html.escape(note) + '</p>' if note else ''}
<h2>Model</h2>
<table>{''.join(f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>'
                 for k, v in model_rows)}</table>
<h2>Data</h2>
<pre>{html.escape(json.dumps(dict(data_summary), indent=2, sort_keys=True))}</pre>
<p>Series probabilities are the maximum over the series' slices, as the worker computes them.
Positive means probability &ge; threshold.</p>
{''.join(sections)}
</body></html>
"""
    report = out_dir / "report.html"
    report.write_text(page)
    return report


# -- the command ----------------------------------------------------------------------------


def evaluate(
    model: Path,
    data: Path | None,
    labels: Path | None,
    out_dir: Path,
    *,
    from_store: str | None = None,
    spool: Path | None = None,
    since: dt.datetime | None = None,
    label_format: str = "auto",
    cache_dir: Path | None = None,
    index: Path | None = None,
    workers: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate an artifact on labelled data and write the report (see module docstring).

    Parameters
    ----------
    model : Path
        The artifact.
    data, labels, label_format
        As for :func:`train.data.load_records`; both None to evaluate on the store only.
    out_dir : Path
        Where ``metrics.json``, the plots and ``report.html`` go.
    from_store : str, optional
        Database URL of a node whose radiologist verdicts are evaluated too
        (:mod:`train.feedback`).
    spool : Path, optional
        That node's spool; required with ``from_store``.
    since : datetime, optional
        Only series whose newest verdict is at least this recent.
    cache_dir : Path, optional
        Slice cache (default ``out_dir / "cache"``); shareable with training's when the
        preprocessing is the same.
    index : Path, optional
        Header index (default ``cache_dir / "index.csv"``).
    workers : int, optional
        Worker processes for reading and preprocessing.
    batch_size : int, optional
        Slices per forward pass.
    device : str, optional
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    progress : bool, optional
        Progress bars on stderr.

    Returns
    -------
    dict
        The figures, as written to ``metrics.json``.

    Raises
    ------
    ArtifactError
        If the artifact cannot be loaded.
    ValueError
        If the data hold no labelled slice or a setting is invalid.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (data is None) != (labels is None):
        raise ValueError("data and labels go together: give both or neither")
    if data is None and from_store is None:
        raise ValueError("nothing to evaluate: give data and labels, or from_store")
    if from_store is not None and spool is None:
        raise ValueError("from_store needs spool (the node's [storage] path)")
    target = resolve_device(device)
    meta = read_meta(Path(model))  # the preprocessing, without loading the network yet
    try:
        spec = PreprocessSpec.from_dict(meta.preprocess)
    except ValueError as exc:
        raise ArtifactError(f"{model}: preprocessing settings unusable: {exc}") from exc
    cache_path = cache_dir or out_dir / "cache"
    records: list[SliceRecord] = []
    if data is not None and labels is not None:
        records = load_records(data, labels, index or cache_path / "index.csv",
                               label_format=label_format, workers=workers, progress=progress)
    cache = SliceCache(cache_path, spec)
    store = None
    bags: list[Bag] = []
    if from_store is not None:
        assert spool is not None
        store = without_series(
            load_store_data(from_store, spool, cache_path / "store-index.csv", since=since,
                            workers=workers, progress=progress), records)
    groups = series_groups(records)
    if store is not None:
        groups.update(series_groups([*store.negatives, *bag_records(store.bags)]))
    cache.build(groups, workers=workers, progress=progress)
    if store is not None:
        store = cached_store(cache, store)
        records = [*records, *store.negatives]
        bags = store.bags
    if not records and not bags:
        raise ValueError("no labelled series to evaluate (every slice missing or unreadable)")
    loaded = load_artifact(Path(model), target)
    labelled = LabelledData.build(cache, records, bags)
    scores = labelled.score(loaded.network, device=loaded.device, batch_size=batch_size,
                            workers=workers, progress=progress, desc="evaluate")
    probs = {"series": scores.series_probs}
    truth = {"series": scores.series_labels}
    if scores.has_slices:
        probs = {"slice": scores.slice_probs, **probs}
        truth = {"slice": scores.slice_labels, **truth}
    metrics = compute_metrics(probs, truth, loaded.meta.thresholds)
    summary: dict[str, Any] = {"data": str(data) if data else None,
                               "labels": str(labels) if labels else None,
                               **describe_records(labelled.slices.items)}
    if store is not None:
        summary["store"] = public_summary(store)
        summary["store_bags"] = describe_bags(bags)
        metrics["series.bags"] = len(bags)
    write_report(out_dir, metrics, probs, truth, meta=loaded.meta, model_path=Path(model),
                 data_summary=summary)
    return metrics
