"""Tests of train/: labels, the header index, the patient split, and real training runs.

The training runs use phantoms written into tmp_path and the real command line as a
subprocess: a short run must separate held-out phantom series (AUC of ``any`` >= 0.95), and
a run killed after two epochs and continued with ``--resume`` must end with exactly the
weights of the run that was never interrupted.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import (
    SliceCache,
    SliceRecord,
    build_index,
    cached_records,
    load_records,
    read_rsna_labels,
    series_groups,
    split_patients,
)
from train.loop import SliceDataset, TrainConfig, augment_batch, weighted_bce
from train.metrics import weighted_log_loss
from triage_node.domain import LABELS
from triage_node.model import ARCHITECTURES, build_network, load_artifact, random_artifact
from triage_node.phantom import generate
from triage_node.preprocess import PreprocessSpec

CLI = [sys.executable, "-m", "triage_node.cli"]
ROWS = 96
SLICES = 12


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A training set (40 studies) and a held-out set (24 studies, another seed)."""
    root = tmp_path_factory.mktemp("phantoms")
    generate(root / "train", studies=40, seed=11, n_slices=SLICES, rows=ROWS, cols=ROWS)
    generate(root / "heldout", studies=24, seed=12, n_slices=SLICES, rows=ROWS, cols=ROWS)
    return root / "train", root / "heldout"


def train_args(data: Path, work: Path, cache: Path, epochs: int = 6) -> list[str]:
    """The short CPU run of the CI test (small network, 64 px, six epochs)."""
    return [
        "train", "--data", str(data), "--labels", str(data / "stage_2_train.csv"),
        "--work-dir", str(work), "--cache-dir", str(cache), "--architecture", "small-cnn",
        "--size", "64", "--epochs", str(epochs), "--lr", "3e-3", "--warmup-epochs", "0.5",
        "--val-fraction", "0.25", "--oversample", "2", "--seed", "3", "--workers", "0",
        "--device", "cpu", "--no-progress", "--note", "phantom-trained, not for clinical use",
    ]


@pytest.fixture(scope="module")
def trained(phantoms: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Work dir of one uninterrupted training run on the training phantoms."""
    work = tmp_path_factory.mktemp("run")
    out = run(*train_args(phantoms[0], work, work.parent / "cache"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote" in out.stdout
    return work


# -- labels, index, split -------------------------------------------------------------------


def test_rsna_labels_drop_duplicates_and_strip_prefix(tmp_path: Path) -> None:
    path = tmp_path / "stage_2_train.csv"
    rows = ["ID,Label"]
    for image, positive in (("ID_abc123", {"any", "subdural"}), ("ID_def456", set())):
        rows += [f"{image}_{label},{int(label in positive)}" for label in LABELS]
    rows.append("ID_abc123_subdural,1")  # the real file repeats rows
    path.write_text("\n".join(rows) + "\n")
    table = read_rsna_labels(path)
    assert table.labels == {"abc123": (1, 0, 0, 0, 0, 1), "def456": (0,) * 6}
    assert table.duplicates == 1 and table.conflicts == 0


def test_rsna_labels_name_the_incomplete_image(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("ID,Label\nID_x1_any,1\nID_x1_epidural,0\n")
    with pytest.raises(ValueError, match=r"'x1' has no intraparenchymal"):
        read_rsna_labels(path)
    path.write_text("ID,Label\nID_x1_bleed,1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_rsna_labels(path)


def test_index_is_read_once_and_updated_incrementally(
    phantoms: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantoms[1], data)
    index = tmp_path / "index.csv"
    caplog.set_level(logging.INFO, logger="triage_node.train")
    first = build_index(data, index)
    assert len(first) == 24 * SLICES
    assert f"indexing {24 * SLICES} DICOM header(s)" in caplog.text
    caplog.clear()
    assert build_index(data, index) == first
    assert "indexing" not in caplog.text  # nothing re-read
    # A new file is read alone; a removed one is dropped.
    generate(tmp_path / "more", studies=1, seed=99, n_slices=1, rows=64, cols=64)
    shutil.copy(next((tmp_path / "more").rglob("*.dcm")), data / "new.dcm")
    (data / first[0].path).unlink()
    caplog.clear()
    updated = build_index(data, index)
    assert "indexing 1 DICOM header(s)" in caplog.text
    assert {e.path for e in updated} == {e.path for e in first[1:]} | {"new.dcm"}


def test_generic_csv_gives_the_same_records_as_the_rsna_layout(
    phantoms: tuple[Path, Path], tmp_path: Path
) -> None:
    data = phantoms[1]
    rsna = load_records(data, data / "stage_2_train.csv", tmp_path / "a.csv")
    generic = tmp_path / "labels.csv"
    with generic.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *LABELS])
        for r in rsna:
            writer.writerow([os.path.relpath(r.path, tmp_path), *r.labels])
    records = load_records(data, generic, tmp_path / "b.csv")
    key = sorted((r.image_id, r.series_uid, r.patient_id, r.labels) for r in rsna)
    assert sorted((r.image_id, r.series_uid, r.patient_id, r.labels) for r in records) == key
    assert sum(r.labels[0] for r in rsna) > 0


def test_a_damaged_slice_is_dropped_not_its_series(
    phantoms: tuple[Path, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantoms[1], data)
    records = load_records(data, data / "stage_2_train.csv", tmp_path / "index.csv")
    groups = series_groups(records)
    uid = sorted(groups)[0]
    victim = groups[uid][5]
    victim.path.write_bytes(victim.path.read_bytes()[:-4000])  # pixel data cut short
    cache = SliceCache(tmp_path / "cache", PreprocessSpec(size=32, context=1))
    cache.build(groups)
    kept = cached_records(cache, groups)
    assert len(kept[uid]) == SLICES - 1 and victim not in kept[uid]
    dataset = SliceDataset(cache, kept)
    assert len(dataset) == len(records) - 1
    x, y = dataset[0]
    assert x.shape == (9, 32, 32) and y.shape == (len(LABELS),)
    # Context neighbours are the series' own slices in position order, edges replicated.
    first = groups[sorted(groups)[1]][0]
    stacked = cache.slice(groups[first.series_uid], first.image_id)
    assert np.array_equal(stacked[0:3], stacked[3:6])


def _records(n_patients: int, seed: int) -> list[SliceRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, 4))):  # several series per patient
            positive = rng.random(len(LABELS)) < [0.4, 0.05, 0.15, 0.1, 0.15, 0.15]
            for i in range(5):
                labels = tuple(int(v and i == 2) for v in positive)
                labels = (int(any(labels[1:]) or labels[0]), *labels[1:])
                out.append(SliceRecord(Path(f"/x/{p}/{s}/{i}.dcm"), f"{p}.{s}.{i}", f"st{p}",
                                       f"se{p}.{s}", f"P{p}", float(i), "", labels))
    return out


def test_split_never_puts_a_patient_on_both_sides() -> None:
    records = _records(200, seed=0)
    train, val = split_patients(records, 0.2, seed=5)
    train_p, val_p = {r.patient_id for r in train}, {r.patient_id for r in val}
    assert not train_p & val_p
    assert len(train) + len(val) == len(records)
    assert len(val_p) == 40
    # Stratified: each label's patient prevalence is close on both sides.
    for j in range(len(LABELS)):
        pos = {r.patient_id for r in records if r.labels[j]}
        assert abs(len(pos & val_p) / 40 - len(pos & train_p) / 160) < 0.06
    again, _ = split_patients(records, 0.2, seed=5)
    assert again == train
    other, _ = split_patients(records, 0.2, seed=6)
    assert {r.patient_id for r in other} != train_p


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_patients(_records(10, 0), 1.0, 0)


# -- pieces of the loop ---------------------------------------------------------------------


def test_loss_is_the_rsna_metric() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, len(LABELS))
    target = (torch.rand(7, len(LABELS)) < 0.3).float()
    expected = weighted_log_loss(target.numpy(), torch.sigmoid(logits).double().numpy())
    assert float(weighted_bce(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_augment_batch_is_seeded_and_flip_only_mirrors() -> None:
    x = torch.rand(4, 3, 16, 16)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.allclose(a, x)


def test_small_cnn_is_registered_and_small(tmp_path: Path) -> None:
    assert "small-cnn" in ARCHITECTURES
    net = build_network("small-cnn", in_channels=9).eval()
    with torch.inference_mode():
        assert net(torch.rand(2, 9, 48, 48)).shape == (2, len(LABELS))
        assert net(torch.rand(1, 9, 256, 256)).shape == (1, len(LABELS))  # any size
    spec = PreprocessSpec(size=64, context=1)
    path = tmp_path / "m.tnm"
    random_artifact(path, architecture="small-cnn", preprocess=spec.to_dict(),
                    in_channels=spec.channels)
    assert path.stat().st_size < 3_000_000
    assert load_artifact(path).meta.architecture == "small-cnn"


@pytest.mark.parametrize(
    ("change", "name"),
    [({"epochs": 0}, "epochs"), ({"val_fraction": 0.0}, "val_fraction"),
     ({"architecture": "vgg"}, "architecture"), ({"oversample": 0.5}, "oversample"),
     ({"size": 4}, "size"), ({"target_sensitivity": 1.5}, "target_sensitivity")],
)
def test_config_names_the_bad_setting(change: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TrainConfig(data=Path("d"), labels=Path("l"), work_dir=Path("w"), **change)  # type: ignore[arg-type]


def test_cli_resume_without_checkpoint_exits_2(tmp_path: Path) -> None:
    out = run("train", "--data", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
              "--work-dir", str(tmp_path / "w"), "--resume", "--device", "cpu")
    assert out.returncode == 2 and "checkpoint" in out.stderr


def test_cli_refuses_to_overwrite_a_run(trained: Path, phantoms: tuple[Path, Path]) -> None:
    out = run(*train_args(phantoms[0], trained, trained.parent / "cache"))
    assert out.returncode == 2 and "--resume" in out.stderr


def test_train_help_documents_options() -> None:
    out = run("train", "--help")
    for option in ("--data", "--labels", "--resume", "--seed", "--val-fraction", "--patience",
                   "--oversample", "--target-sensitivity", "--workers", "--architecture"):
        assert option in out.stdout


# -- real runs ------------------------------------------------------------------------------


def test_short_run_separates_held_out_phantoms(
    trained: Path, phantoms: tuple[Path, Path], tmp_path: Path
) -> None:
    artifact = trained / "model.tnm"
    model = load_artifact(artifact)
    meta = model.meta
    assert meta.architecture == "small-cnn" and meta.preprocess["size"] == 64
    assert meta.training["note"] == "phantom-trained, not for clinical use"
    assert set(meta.training["train_data"]["manufacturers"]) == {"TRIAGE-NODE PHANTOM"}
    # The operating threshold: chosen on the validation series for 95 % sensitivity.
    assert meta.thresholds["any"] == meta.metrics["series.any.threshold"]
    assert meta.metrics["series.any.sensitivity"] >= 0.95
    assert meta.metrics["series.any.specificity"] is not None
    # The split is written down, by patient, and never puts one on both sides.
    split = json.loads((trained / "split.json").read_text())
    assert not set(split["train"]) & set(split["validation"])
    assert len(split["train"]) + len(split["validation"]) == 40
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == list(range(1, len(lines) + 1))
    assert {"train_loss", "val_weighted_log_loss", "val_series_any_auc", "lr",
            "slices_per_second"} <= set(lines[0])
    assert (trained / "checkpoint.pt").is_file() and (trained / "best.pt").is_file()

    heldout = phantoms[1]
    out = run("evaluate", "--model", str(artifact), "--data", str(heldout), "--labels",
              str(heldout / "stage_2_train.csv"), "--out", str(tmp_path / "eval"),
              "--workers", "0", "--device", "cpu", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["series.count"] == 24
    assert metrics["series.any.auc"] >= 0.95, out.stdout


def _wait_for_epochs(proc: subprocess.Popen[str], log: Path, epochs: int) -> None:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= epochs:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {epochs}: {proc.stderr}")
        time.sleep(0.05)
    pytest.fail(f"no epoch {epochs} within the time limit")


@pytest.fixture
def killed_run(phantoms: tuple[Path, Path], trained: Path,
               tmp_path: Path) -> Iterator[Path]:
    work = tmp_path / "run"
    proc = subprocess.Popen([*CLI, *train_args(phantoms[0], work, trained.parent / "cache")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_for_epochs(proc, work / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGKILL)  # as a crash or a pre-empted GPU box would
        proc.wait(timeout=30)
        yield work
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_resume_continues_from_the_checkpoint(killed_run: Path, trained: Path,
                                              phantoms: tuple[Path, Path]) -> None:
    work = killed_run
    done = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= done < 5, "the run should have been killed mid-way"
    assert not (work / "model.tnm").exists()
    out = run(*train_args(phantoms[0], work, trained.parent / "cache"), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming after epoch {done + 1}" in out.stderr
    epochs = [json.loads(x)["epoch"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    # Seeded per epoch: the interrupted run ends exactly where the uninterrupted one did.
    resumed = load_artifact(work / "model.tnm").meta
    reference = load_artifact(trained / "model.tnm").meta
    assert resumed.weights_sha256 == reference.weights_sha256
    assert resumed.thresholds == reference.thresholds



# -- the shipped demo model -----------------------------------------------------------------

DEMO = Path(__file__).resolve().parent.parent / "triage_node" / "data" / "demo-model.tnm"


def test_demo_model_is_shipped_small_and_labelled_as_not_clinical() -> None:
    assert DEMO.stat().st_size < 10 * 2**20
    meta = load_artifact(DEMO).meta
    assert meta.architecture == "small-cnn"
    assert "phantom" in meta.training["note"] and "NOT FOR CLINICAL USE" in meta.training["note"]
    assert meta.training["command"].startswith("triage-node train ")
    assert "--seed 2026" in meta.training["command"]
    assert 0 < meta.thresholds["any"] < 1


def test_demo_model_triages_phantoms_through_the_worker_pipeline(tmp_path: Path) -> None:
    from triage_node.phantom import generate_study
    from triage_node.pipeline import Predictor

    predictor = Predictor.from_path(DEMO, device="cpu")
    try:
        for seed, positive in ((501, True), (502, False)):
            truth = generate_study(tmp_path, seed=seed, n_slices=24, positive=positive)
            result = predictor.predict_series([s.path for s in truth.slices])
            assert result.flagged is positive, (seed, result.probabilities)
    finally:
        predictor.close()
