"""Tests of train/metrics.py against hand-computed figures, and of ``triage-node evaluate``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.evaluate import PLOTS, compute_metrics, format_summary
from train.metrics import (
    LABEL_WEIGHTS,
    confusion,
    log_loss,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    weighted_log_loss,
)
from triage_node.domain import LABELS
from triage_node.model import random_artifact
from triage_node.phantom import generate
from triage_node.preprocess import PreprocessSpec

CLI = [sys.executable, "-m", "triage_node.cli"]


def test_weights_are_two_for_any_one_for_subtypes() -> None:
    assert LABELS[0] == "any"
    assert LABEL_WEIGHTS == (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_weighted_log_loss_hand_computed() -> None:
    # Image 1: any and subdural present. Image 2: nothing.
    y = [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    p = [[0.9, 0.1, 0.2, 0.1, 0.1, 0.8], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]
    # Image 1 row losses: any -ln .9 (weight 2), epidural -ln .9, iph -ln .8, ivh -ln .9,
    # sah -ln .9, sdh -ln .8.  Image 2: any -ln .5 (weight 2), five times -ln .9.
    ln9, ln8, ln5 = -math.log(0.9), -math.log(0.8), -math.log(0.5)
    image1 = 2 * ln9 + ln9 + ln8 + ln9 + ln9 + ln8  # = 5 ln(1/.9) + 2 ln(1/.8)
    image2 = 2 * ln5 + 5 * ln9
    expected = (image1 + image2) / 14  # weights sum to 7 per image
    assert expected == pytest.approx(0.206156, abs=1e-6)  # (0.973090 + 1.913097) / 14
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    # Unweighted, it would differ: the any column counts double.
    assert weighted_log_loss(y, p, weights=[1] * 6) != pytest.approx(expected)


def test_weighted_log_loss_clips_like_kaggle() -> None:
    y = np.zeros((1, 6))
    p = np.array([[1.0, 0, 0, 0, 0, 0]])  # a certain, wrong 'any'
    # Clipped to 1 - 1e-15 (in float64 1 - 9.992e-16): a finite loss of about -ln 1e-15.
    assert weighted_log_loss(y, p) == pytest.approx(2 * -math.log(1e-15) / 7, rel=1e-4)


def test_metric_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="shape"):
        weighted_log_loss(np.zeros((2, 6)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="0 and 1"):
        log_loss([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([0, 1], [0.1, 1.2])


def test_roc_auc_hand_computed_with_ties() -> None:
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4]
    # Pairs (pos, neg): 3 x 3 = 9. pos .35 beats .1 only (1); pos .8 beats all (3);
    # pos .4 beats .1 (1) and ties the two .4 (2 x 0.5). Total 6 of 9.
    assert roc_auc(y, s) == pytest.approx(6 / 9)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    fpr, tpr, thresholds = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(6 / 9)
    assert thresholds[1] == 0.8


def test_threshold_for_sensitivity_and_confusion() -> None:
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.7, 0.6, 0.2, 0.65, 0.3, 0.1, 0.05, 0.5]
    # 75 %: three of four positives must be called -> threshold 0.6.
    t, c = threshold_for_sensitivity(y, p, 0.75)
    assert t == 0.6
    assert (c.tp, c.fn, c.fp, c.tn) == (3, 1, 1, 4)
    assert c.sensitivity == 0.75 and c.specificity == 0.8
    # 95 % of four needs all four -> the lowest positive.
    t, c = threshold_for_sensitivity(y, p, 0.95)
    assert t == 0.2 and c.sensitivity == 1.0 and c.specificity == 0.4  # .65 .3 .5 called
    assert confusion(y, p, 0.5) == confusion(y, p, 0.5)
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity(y, p, 0.0)
    with pytest.raises(ValueError, match="positive"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)


def test_compute_metrics_keys() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((30, 6)) < 0.3).astype(np.float32)
    p = rng.random((30, 6)).astype(np.float32)
    m = compute_metrics({"slice": p, "series": p[:10]}, {"slice": y, "series": y[:10]},
                        dict.fromkeys(LABELS, 0.5))
    for level in ("slice", "series"):
        assert m[f"{level}.weighted_log_loss"] == pytest.approx(
            weighted_log_loss(y if level == "slice" else y[:10], p if level == "slice" else p[:10])
        )
        for label in LABELS:
            for metric in ("auc", "log_loss", "threshold", "sensitivity", "specificity", "tp",
                           "fp", "tn", "fn", "positives"):
                assert f"{level}.{label}.{metric}" in m
    assert m["slice.count"] == 30 and m["series.count"] == 10
    assert "subdural" in format_summary(m)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six phantom studies and an untrained small-cnn artifact at 48 px."""
    root = tmp_path_factory.mktemp("evaluate")
    generate(root / "data", studies=6, seed=4, n_slices=6, rows=64, cols=64, positive_rate=0.5)
    spec = PreprocessSpec(size=48)
    random_artifact(root / "m.tnm", architecture="small-cnn", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=2)
    return root / "data", root / "m.tnm"


def test_evaluate_writes_report_plots_and_metrics(
    small_set: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = small_set
    out_dir = tmp_path / "report"
    out = subprocess.run(
        [*CLI, "evaluate", "--model", str(model), "--data", str(data), "--labels",
         str(data / "stage_2_train.csv"), "--out", str(out_dir), "--workers", "0",
         "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "weighted log loss" in out.stdout and "report.html" in out.stdout
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["slice.count"] == 36 and metrics["series.count"] == 6
    assert 0 < metrics["slice.weighted_log_loss"] < 10
    assert metrics["series.any.threshold"] == 0.5  # the random artifact's
    assert metrics["series.any.tp"] + metrics["series.any.fn"] == metrics["series.any.positives"]
    for name in PLOTS:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "series.any" not in page and "Series level" in page


def test_evaluate_names_a_missing_labels_file(small_set: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    data, model = small_set
    out = subprocess.run(
        [*CLI, "evaluate", "--model", str(model), "--data", str(data), "--labels",
         str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2 and "nope.csv" in out.stderr
