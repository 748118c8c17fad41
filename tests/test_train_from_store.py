"""Tests of ``triage-node train --from-store``: labels the node collected itself.

Phantom series are written into a spool and recorded through the real store functions
(``record_batch`` from the real headers, ``record_feedback`` for the verdicts), on SQLite
and PostgreSQL; then the loader must give strong negative slices for refuted series and
bags for confirmed ones, skipping (and counting) files retention removed; the MIL loss must
be the maximum-over-slices loss computed by hand; a short CPU run through the command line
must separate held-out phantoms; the split must keep a patient's series on one side.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from train.data import SliceCache, SliceRecord
from train.feedback import (
    SNAPSHOT,
    Bag,
    bag_records,
    cached_store,
    load_store_data,
    read_feedback,
    split_sources,
)
from train.loop import TrainConfig, bag_slices, mil_bce, weighted_bce
from triage_node import store
from triage_node.domain import LABELS, utcnow
from triage_node.ingest import instance_record
from triage_node.model import load_artifact, random_artifact
from triage_node.phantom import StudyTruth, generate
from triage_node.preprocess import PreprocessSpec
from triage_node.spool import Spool

CLI = [sys.executable, "-m", "triage_node.cli"]
ROWS = 96
SLICES = 8
STUDIES = 64
PASSWORD = "s3cret-Pw"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


# -- a node's store, filled through the real functions ---------------------------------------


def ingest(spool_root: Path, factory: sessionmaker[Session], truths: Sequence[StudyTruth],
           patient_ids: dict[str, str] | None = None) -> None:
    """Write the studies' files into the spool and record them as the SCP would."""
    spool = Spool(spool_root, fsync=False)
    spool.prepare()
    for truth in truths:
        records = []
        for s in truth.slices:
            ds = dcmread(s.path, stop_before_pixels=True)
            if patient_ids and truth.series_uid in patient_ids:
                ds.PatientID = patient_ids[truth.series_uid]
            rel = spool.relpath_for(truth.study_uid, truth.series_uid, s.sop_uid)
            spool.write(rel, s.path.read_bytes())
            records.append(instance_record(
                ds, sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), file_path=rel,
                file_size=s.path.stat().st_size, calling_ae="CT1", received_at=utcnow()))
        assert all(store.record_batch(factory, records))


def verdict(factory: sessionmaker[Session], truth: StudyTruth, *, ich: bool | None = None,
            subtypes: bool = True, at: dt.datetime | None = None) -> None:
    """A radiologist's verdict; by default the phantom's truth."""
    positive = truth.positive if ich is None else ich
    flags = {k: bool(truth.series_labels[k]) for k in LABELS[1:]} if positive and subtypes else {}
    store.record_feedback(factory, truth.series_uid, user="dr_a", ich=positive,
                          subtypes=flags, at=at)


def spool_file(spool_root: Path, truth: StudyTruth, index: int) -> Path:
    s = truth.slices[index]
    return spool_root / Spool(spool_root).relpath_for(truth.study_uid, truth.series_uid,
                                                      s.sop_uid)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[StudyTruth]:
    """Eight small phantom studies, four of them with hemorrhage."""
    root = tmp_path_factory.mktemp("studies")
    truths = generate(root, studies=8, seed=31, n_slices=6, rows=64, cols=64,
                      positive_rate=0.5)
    assert 3 <= sum(t.positive for t in truths) <= 5, "the loader test needs 3 of each"
    return truths


# -- (a) the loader -------------------------------------------------------------------------


def test_store_gives_negative_slices_and_bags_and_skips_removed_files(
    tmp_path: Path, database_url: str, session_factory: sessionmaker[Session],
    studies: list[StudyTruth], caplog: pytest.LogCaptureFixture,
) -> None:
    f = session_factory
    spool = tmp_path / "spool"
    ingest(spool, f, studies)
    positives = [t for t in studies if t.positive]
    negatives = [t for t in studies if not t.positive][:-1]  # the last: no verdict, no label
    # The newest verdict counts: one series first refuted by mistake, then confirmed.
    verdict(f, positives[0], ich=False, at=utcnow() - dt.timedelta(hours=1))
    for t in [*positives, *negatives]:
        verdict(f, t)
    # ICH confirmed without a subtype (after a first verdict with): the bag trains 'any' only.
    verdict(f, positives[1], subtypes=False)
    # Retention removed one slice of a refuted series and every slice of a confirmed one.
    spool_file(spool, negatives[0], 2).unlink()
    gone = positives[-1]
    for i in range(len(gone.slices)):
        spool_file(spool, gone, i).unlink()

    caplog.set_level("WARNING", logger="triage_node.train")
    data = load_store_data(database_url, spool, tmp_path / "store-index.csv")
    n_slices = len(studies[0].slices)
    assert {r.series_uid for r in data.negatives} == {t.series_uid for t in negatives}
    assert len(data.negatives) == len(negatives) * n_slices - 1
    assert all(r.labels == (0,) * 6 for r in data.negatives)
    assert {b.series_uid for b in data.bags} == {t.series_uid for t in positives[:-1]}
    for bag in data.bags:
        truth = next(t for t in positives if t.series_uid == bag.series_uid)
        assert len(bag.records) == n_slices
        assert [r.image_id for r in bag.records] == [s.sop_uid for s in truth.slices], \
            "bag slices in anatomical order"
        assert bag.patient_id == truth.patient_id
        if truth is positives[1]:
            assert bag.labels == (1, 0, 0, 0, 0, 0) and bag.mask == (1, 0, 0, 0, 0, 0)
        else:
            assert bag.labels == tuple(truth.series_labels[k] for k in LABELS)
            assert bag.mask == (1,) * 6
        assert all(r.labels == bag.labels for r in bag.records)
    s = data.summary
    assert s["refuted_series"] == len(negatives) and s["confirmed_series"] == len(positives) - 1
    assert s["slices_missing"] == 1 + n_slices and s["slices_unreadable"] == 0
    assert s["series_dropped"] == [gone.series_uid]
    assert s["confirmed_without_subtype"] == 1
    assert "1 slice file(s) missing" not in caplog.text
    assert f"{1 + n_slices} slice file(s) missing" in caplog.text
    assert "1 series without a readable slice dropped" in caplog.text

    # A file that is no DICOM is skipped when its header is read; a slice whose pixels
    # cannot be decoded is dropped by the slice cache; both are counted.
    data.negatives[0].path.write_bytes(b"not a DICOM file")
    victim = data.bags[0].records[3]
    victim.path.write_bytes(victim.path.read_bytes()[:-2000])
    data = load_store_data(database_url, spool, tmp_path / "store-index.csv")
    assert data.summary["slices_unreadable"] == 1
    assert len(data.negatives) == len(negatives) * n_slices - 2
    cache = SliceCache(tmp_path / "cache", PreprocessSpec(size=32))
    cache.build({b.series_uid: list(b.records) for b in data.bags}
                | {r.series_uid: [x for x in data.negatives if x.series_uid == r.series_uid]
                   for r in data.negatives})
    used = cached_store(cache, data)
    assert used.summary["slices_undecodable"] == 1
    assert sum(len(b.records) for b in used.bags) == sum(len(b.records) for b in data.bags) - 1
    assert used.summary["confirmed_series_used"] == len(positives) - 1

    # since: only series whose newest verdict is that recent.
    recent = read_feedback(database_url, since=utcnow() - dt.timedelta(minutes=30))
    assert len(recent) == len(positives) + len(negatives)
    assert read_feedback(database_url, since=utcnow() + dt.timedelta(minutes=1)) == []


def test_store_refuses_a_missing_sqlite_file_and_an_unmigrated_database(
    tmp_path: Path, database_url: str
) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_feedback(f"sqlite:///{tmp_path / 'nope.db'}")
    assert not (tmp_path / "nope.db").exists(), "never creates the database"
    if make_url(database_url).get_backend_name() == "sqlite":
        Path(make_url(database_url).database or "").parent.mkdir(parents=True, exist_ok=True)
        import sqlite3

        sqlite3.connect(make_url(database_url).database or "").close()
    with pytest.raises(ValueError, match="db upgrade"):
        read_feedback(database_url)


# -- (b) the MIL loss -----------------------------------------------------------------------


def test_mil_loss_is_the_weighted_bce_of_the_maximum_by_hand() -> None:
    # Three slices, six labels; the series logit per label is the column maximum.
    z = torch.tensor([[-2.0, 0.5, -1.0, -3.0, 0.0, -1.0],
                      [1.0, -1.0, -2.0, -3.0, -0.5, 2.0],
                      [0.0, -2.0, -4.0, -1.0, -1.5, 0.5]], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # any + subdural
    # max: any 1.0, epidural 0.5, iph -1.0, ivh -1.0, sah 0.0, sdh 2.0
    def bce(logit: float, target: float) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -math.log(p) if target else -math.log(1 - p)
    by_hand = (2 * bce(1.0, 1) + bce(0.5, 0) + bce(-1.0, 0) + bce(-1.0, 0) + bce(0.0, 0)
               + bce(2.0, 1)) / 7
    loss = mil_bce(z, y)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(weighted_bce(z.max(0).values[None], y[None]).item())
    # The gradient reaches only the arg-max slice of each label.
    loss.backward()
    assert z.grad is not None
    touched = {(i, j) for i, j in torch.nonzero(z.grad).tolist()}
    assert touched == {(1, 0), (0, 1), (0, 2), (2, 3), (0, 4), (1, 5)}
    # A mask leaves labels out: ICH confirmed without a subtype trains 'any' alone.
    mask = torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert mil_bce(z, y, mask).item() == pytest.approx(bce(1.0, 1), rel=1e-6)
    with pytest.raises(ValueError, match="slice_logits"):
        mil_bce(z[:0], y)


def test_long_bags_are_thinned_to_an_even_stride_from_a_random_offset() -> None:
    g = torch.Generator().manual_seed(0)
    assert bag_slices(40, 64, g) == list(range(40)), "a usual series is used whole"
    seen = set()
    for _ in range(20):
        picked = bag_slices(300, 64, g)
        assert len(picked) <= 64 and picked == sorted(picked)
        stride = picked[1] - picked[0]
        assert stride == 5 and np.all(np.diff(picked) == stride)
        assert picked[0] < stride and picked[-1] >= 300 - stride, "the whole head"
        seen.add(picked[0])
    assert len(seen) > 1, "another offset in another epoch"


# -- (d) the split --------------------------------------------------------------------------


def _slice(patient: str, series: str, i: int, labels: tuple[int, ...]) -> SliceRecord:
    return SliceRecord(Path(f"/x/{series}/{i}.dcm"), f"{series}.{i}", f"st.{series}", series,
                       patient, float(i), "", labels)


def test_split_keeps_a_patient_with_csv_slices_and_store_series_on_one_side() -> None:
    rng = np.random.default_rng(1)
    records: list[SliceRecord] = []
    bags: list[Bag] = []
    for p in range(60):
        patient = f"P{p}"
        if p % 3 == 0:  # CSV data, slice labels
            pos = int(rng.random() < 0.4)
            records += [_slice(patient, f"csv{p}", i, (pos * (i == 2),) + (0,) * 5)
                        for i in range(4)]
        if p % 2 == 0:  # a refuted series in the store
            records += [_slice(patient, f"neg{p}", i, (0,) * 6) for i in range(4)]
        if p % 2 == 1 or p % 5 == 0:  # a confirmed series in the store
            y = (1, 0, 0, 0, 0, 1)
            bags.append(Bag(f"bag{p}", f"st.bag{p}", patient, y, (1,) * 6,
                            tuple(_slice(patient, f"bag{p}", i, y) for i in range(4))))
    train, val, train_bags, val_bags = split_sources(records, bags, 0.25, seed=3)
    side = {}
    for name, rs in (("train", [*train, *bag_records(train_bags)]),
                     ("val", [*val, *bag_records(val_bags)])):
        for r in rs:
            assert side.setdefault(r.patient_id, name) == name, f"{r.patient_id} on both sides"
    assert len(train) + len(val) == len(records) and len(train_bags) + len(val_bags) == len(bags)
    assert len(side) == 60 and 10 <= sum(v == "val" for v in side.values()) <= 20
    assert val_bags and train_bags, "confirmed series on both sides (stratified as positives)"
    again = split_sources(records, bags, 0.25, seed=3)
    assert again == (train, val, train_bags, val_bags)


def test_config_needs_data_or_a_store_and_hides_the_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training data"):
        TrainConfig(work_dir=tmp_path)
    with pytest.raises(ValueError, match="spool"):
        TrainConfig(work_dir=tmp_path, from_store="sqlite:///x.db")
    with pytest.raises(ValueError, match="together"):
        TrainConfig(work_dir=tmp_path, data=tmp_path, from_store="sqlite:///x.db",
                    spool=tmp_path)
    url = f"postgresql+psycopg://trainer:{PASSWORD}@db.example/node"
    config = TrainConfig(work_dir=tmp_path, from_store=url, spool=tmp_path)
    assert PASSWORD not in repr(config)
    assert PASSWORD not in json.dumps(config.to_json())
    assert config.to_json()["from_store"] == "postgresql+psycopg://trainer:***@db.example/node"


def test_the_recorded_command_line_hides_the_password() -> None:
    from triage_node.cli import _masked_argv

    url = f"postgresql+psycopg://trainer:{PASSWORD}@db.example:5432/node"
    argv = ["train", "--from-store", url, f"--from-store={url}", "--work-dir", "w"]
    masked = _masked_argv(argv, url)
    assert PASSWORD not in " ".join(masked)
    assert masked[2] == "postgresql+psycopg://trainer:***@db.example:5432/node"
    assert masked[3].startswith("--from-store=postgresql+psycopg://trainer:***@")
    assert _masked_argv(argv[:1], None) == ["train"]


# -- (c) a short run through the command line ----------------------------------------------


def train_args(url: str, spool: Path, work: Path, *extra: str) -> list[str]:
    """The short CPU run on the store's labels only (small network, 64 px, 14 epochs).

    Learning blood from series-level labels takes more steps than from slice labels (see
    test_train.py): batches of 16, 14 epochs, no early stopping (the 16 validation series
    make the criterion noisy). Held-out series AUC of this setting over seeds 1-5 and 7
    on these data: 0.85-1.0 (seed 3: 1.0).
    """
    return [
        "train", "--from-store", url, "--spool", str(spool), "--work-dir", str(work),
        "--architecture", "small-cnn", "--size", "64", "--epochs", "14", "--batch-size", "16",
        "--lr", "3e-3", "--warmup-epochs", "0.5", "--val-fraction", "0.25", "--patience", "0",
        "--seed", "3", "--workers", "0", "--device", "cpu", "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def store_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A node store (SQLite) with 64 phantom series judged by radiologists, and one run."""
    root = tmp_path_factory.mktemp("store_run")
    truths = generate(root / "src", studies=STUDIES, seed=11, n_slices=SLICES, rows=ROWS,
                      cols=ROWS)
    heldout = root / "heldout"
    generate(heldout, studies=24, seed=12, n_slices=SLICES, rows=ROWS, cols=ROWS)
    url = store.default_sqlite_url(root / "node")
    store.upgrade(url)
    engine = store.make_engine(url)
    try:
        factory = store.make_session_factory(engine)
        ingest(root / "spool", factory, truths)
        for t in truths:
            verdict(factory, t)
    finally:
        engine.dispose()
    spool_file(root / "spool", truths[0], 0).unlink()  # retention was here
    work = root / "work"
    out = run(*train_args(url, root / "spool", work))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"url": url, "spool": root / "spool", "work": work, "out": out, "truths": truths,
            "heldout": heldout}


def test_short_store_run_separates_held_out_phantoms(store_run: dict[str, object],
                                                    tmp_path: Path) -> None:
    work = store_run["work"]
    assert isinstance(work, Path)
    out = store_run["out"]
    assert isinstance(out, subprocess.CompletedProcess)
    truths = store_run["truths"]
    assert isinstance(truths, list)
    n_pos = sum(t.positive for t in truths)
    meta = load_artifact(work / "model.tnm").meta
    src = meta.training["sources"]["store"]
    assert src["source"] == store_run["url"] and meta.training["sources"]["csv"] is None
    assert src["refuted_series_used"] == len(truths) - n_pos
    assert src["confirmed_series_used"] == n_pos
    assert src["slices_missing"] == 1 and src["series_dropped"] == 0
    bags = meta.training["train_bags"]["series"] + meta.training["validation_bags"]["series"]
    assert bags == n_pos
    assert meta.metrics["series.bags"] == meta.training["validation_bags"]["series"] > 0
    assert meta.metrics["series.count"] == len(json.loads((work / "split.json").read_text())[
        "validation"])
    assert meta.metrics["series.any.sensitivity"] >= 0.95
    assert "store " in out.stdout and "confirmed series used" in out.stdout
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    # Every training bag is visited in every epoch (they fit into the steps' budget).
    assert {row["train_bags"] for row in lines} == {meta.training["train_bags"]["series"]}
    assert all("val_objective" in row for row in lines)
    assert (work / SNAPSHOT).is_file()

    heldout = store_run["heldout"]
    assert isinstance(heldout, Path)
    ev = run("evaluate", "--model", str(work / "model.tnm"), "--data", str(heldout),
             "--labels", str(heldout / "stage_2_train.csv"), "--out", str(tmp_path / "eval"),
             "--workers", "0", "--device", "cpu", "--no-progress")
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["series.count"] == 24
    assert metrics["series.any.auc"] >= 0.8, ev.stdout  # chance: 0.5


def test_resume_reads_the_frozen_store_labels(store_run: dict[str, object],
                                              tmp_path: Path) -> None:
    import shutil

    work = tmp_path / "work"
    src = store_run["work"]
    assert isinstance(src, Path)
    shutil.copytree(src, work)
    (work / "model.tnm").unlink()
    # New verdicts after the run started must not change the run's data.
    url = store_run["url"]
    assert isinstance(url, str)
    engine = store.make_engine(url)
    try:
        factory = store.make_session_factory(engine)
        truths = store_run["truths"]
        assert isinstance(truths, list)
        for t in truths[:5]:
            verdict(factory, t, ich=not t.positive, subtypes=False)
    finally:
        engine.dispose()
    spool = store_run["spool"]
    assert isinstance(spool, Path)
    out = run(*train_args(url, spool, work, "--epochs", "15", "--resume"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming after epoch 14" in out.stderr and "frozen" in out.stderr
    epochs = [json.loads(x)["epoch"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 16))
    before = load_artifact(src / "model.tnm").meta.training["sources"]["store"]
    after = load_artifact(work / "model.tnm").meta.training["sources"]["store"]
    assert after["refuted_series_used"] == before["refuted_series_used"]
    assert after["confirmed_series_used"] == before["confirmed_series_used"]


def test_cli_needs_data_or_a_store(tmp_path: Path) -> None:
    out = run("train", "--work-dir", str(tmp_path / "w"), "--device", "cpu")
    assert out.returncode == 2 and "--from-store" in out.stderr
    out = run("train", "--data", str(tmp_path), "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 2 and "--labels go together" in out.stderr
    out = run("train", "--spool", str(tmp_path), "--data", str(tmp_path), "--labels",
              str(tmp_path / "l.csv"), "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 2 and "need --from-store" in out.stderr
    help_text = run("train", "--help").stdout
    for option in ("--from-store", "--spool", "--from-store-since", "--data", "--labels"):
        assert option in help_text


def test_evaluate_from_store_never_shows_the_password(
    tmp_path: Path, database_url: str, session_factory: sessionmaker[Session],
    studies: list[StudyTruth],
) -> None:
    ingest(tmp_path / "spool", session_factory, studies)
    for t in studies:
        verdict(session_factory, t)
    url = database_url
    if make_url(url).get_backend_name() == "postgresql":  # trust auth ignores a password
        url = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    spec = PreprocessSpec(size=48)
    random_artifact(tmp_path / "m.tnm", architecture="small-cnn", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=2)
    report = tmp_path / "report"
    out = run("evaluate", "--model", str(tmp_path / "m.tnm"), "--from-store", url, "--spool",
              str(tmp_path / "spool"), "--out", str(report), "--workers", "0", "--device",
              "cpu", "--no-progress", "--log-level", "INFO")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    n_pos = sum(t.positive for t in studies)
    assert metrics["series.count"] == len(studies) and metrics["series.bags"] == n_pos
    assert metrics["slice.count"] == (len(studies) - n_pos) * len(studies[0].slices)
    assert metrics["slice.any.positives"] == 0, "slice level: refuted series only"
    assert metrics["series.any.positives"] == n_pos
    page = (report / "report.html").read_text()
    for text in (out.stdout, out.stderr, page):
        assert PASSWORD not in text
    assert "refuted_series" in page
