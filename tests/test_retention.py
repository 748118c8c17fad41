"""Retention removes images, then rows, of settled series only - never before their SR is
delivered - on SQLite and PostgreSQL; `triage-node retention --dry-run` changes nothing."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.config import Config, build_config
from triage_node.domain import (
    LABELS,
    DeliveryState,
    EventKind,
    SeriesResult,
    SeriesState,
    utcnow,
)
from triage_node.errors import ConfigError
from triage_node.ingest import instance_record
from triage_node.phantom import StudyTruth, generate_study
from triage_node.retention import run_retention
from triage_node.spool import Spool

OLD = dt.timedelta(days=40)


def _ingest(tmp: Path, factory: sessionmaker[Session], seed: int, age: dt.timedelta
            ) -> StudyTruth:
    study = generate_study(tmp / "src" / str(seed), seed=seed, n_slices=4, rows=32, cols=32,
                           quirks=False)
    spool = Spool(tmp / "spool", fsync=False)
    spool.prepare()
    records = []
    for s in study.slices:
        ds = dcmread(s.path, stop_before_pixels=True)
        rel = spool.relpath_for(study.study_uid, study.series_uid, s.sop_uid)
        spool.write(rel, s.path.read_bytes())
        records.append(instance_record(
            ds, sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), file_path=rel,
            file_size=s.path.stat().st_size, calling_ae="CT", received_at=utcnow() - age))
    store.record_batch(factory, records)
    return study


def _decide(factory: sessionmaker[Session], study: StudyTruth, state: SeriesState) -> None:
    [(uid, last)] = [d for d in store.due_series(factory, now=utcnow(), stable_seconds=60,
                                                  settle_seconds=2)
                     if d[0] == study.series_uid]
    assert store.complete_series(factory, uid, state=state, reason=None, at=utcnow(),
                                 last_received_at=last)


def _classify(factory: sessionmaker[Session], study: StudyTruth) -> None:
    _decide(factory, study, SeriesState.QUEUED)
    now = utcnow()
    store.store_result(factory, SeriesResult(
        series_instance_uid=study.series_uid,
        probabilities=dict.fromkeys(LABELS, 0.9),
        slices=tuple((s.sop_uid, float(i), (0.9,) * 6) for i, s in enumerate(study.slices)),
        key_sop_instance_uid=study.slices[0].sop_uid, flagged=True, threshold=0.5,
        model_name="m", model_version="1", model_sha256="cd" * 32,
        inference_started_at=now, inference_done_at=now))


def _config(tmp: Path, database_url: str, **retention: int) -> Config:
    return build_config({
        "storage": {"path": str(tmp / "spool")}, "database": {"url": database_url},
        "retention": retention,
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    }, env={"TRIAGE_NODE_DATA_DIR": str(tmp / "data")}, base_dir=tmp)


def _spool_files(tmp: Path) -> set[str]:
    return {p.name for p in (tmp / "spool").rglob("*.dcm")}


def test_images_of_settled_series_only(tmp_path: Path, database_url: str,
                                       session_factory: sessionmaker[Session]) -> None:
    from triage_node import sender

    f = session_factory
    config = _config(tmp_path, database_url)
    delivered = _ingest(tmp_path, f, 1, OLD)
    _classify(f, delivered)
    assert sender.queue_results_for_delivery(f, config, delivered.series_uid)
    [row] = store.list_deliveries(f, series_instance_uid=delivered.series_uid)
    assert store.mark_sent(f, row, at=utcnow())
    undelivered = _ingest(tmp_path, f, 2, OLD)
    _classify(f, undelivered)
    assert sender.queue_results_for_delivery(f, config, undelivered.series_uid)
    not_triaged = _ingest(tmp_path, f, 3, OLD)
    _decide(f, not_triaged, SeriesState.NOT_TRIAGED)
    receiving = _ingest(tmp_path, f, 4, OLD)
    young = _ingest(tmp_path, f, 5, dt.timedelta(days=1))
    _classify(f, young)
    before = _spool_files(tmp_path)
    assert len(before) == 20

    dry = run_retention(config, dry_run=True)
    assert {s.series_instance_uid for s in dry.images_series} == {
        delivered.series_uid, not_triaged.series_uid}
    assert dry.files == 8 and dry.bytes > 0
    assert _spool_files(tmp_path) == before, "a dry run removes nothing"

    done = run_retention(config, dry_run=False)
    assert done.files == 8
    left = _spool_files(tmp_path)
    assert left == {f"{s.sop_uid}.dcm" for kept in (undelivered, receiving, young)
                    for s in kept.slices}
    assert not (tmp_path / "spool" / Spool(tmp_path / "spool").relpath_for(
        delivered.study_uid, delivered.series_uid, "x")).parent.exists(), \
        "emptied folders go too"
    events = store.list_events(f, kinds=[EventKind.IMAGES_REMOVED])
    assert {e.series_instance_uid for e in events} == {delivered.series_uid,
                                                       not_triaged.series_uid}
    assert run_retention(config, dry_run=False).files == 0, "nothing twice"
    # Rows stay (rows_days = 0): the worklist still shows those series.
    assert store.get_result(f, delivered.series_uid) is not None

    # Once the PACS has it, the undelivered series' images may go too.
    [pending] = store.list_deliveries(f, series_instance_uid=undelivered.series_uid)
    assert pending.state is DeliveryState.PENDING
    assert store.mark_sent(f, pending, at=utcnow())
    assert run_retention(config, dry_run=False).files == 4


def test_rows_pruned_after_rows_days(tmp_path: Path, database_url: str,
                                     session_factory: sessionmaker[Session]) -> None:
    f = session_factory
    config = _config(tmp_path, database_url, images_days=30, rows_days=35)
    old = _ingest(tmp_path, f, 11, OLD)
    _classify(f, old)
    kept = _ingest(tmp_path, f, 12, dt.timedelta(days=31))
    _classify(f, kept)
    labelled = _ingest(tmp_path, f, 13, OLD)
    _classify(f, labelled)
    store.record_feedback(f, labelled.series_uid, user="dr_a", ich=True,
                          subtypes={"subdural": True})
    store.save_slice_predictions(f, "ef" * 32, [(s.sop_uid, "n", (0.1,) * 6)
                                                for s in old.slices])
    report = run_retention(config, dry_run=False)
    assert [s.series_instance_uid for s in report.rows_series] == [old.series_uid]
    uids = {s.series_instance_uid for s in store.list_series(f)}
    assert uids == {kept.series_uid, labelled.series_uid}, "feedback rows are labels: kept"
    assert store.get_result(f, old.series_uid) is None
    assert store.count_instances(f) == 8
    assert [x.series_instance_uid for x in store.feedback_labels(f)] == [labelled.series_uid]
    assert store.get_result(f, kept.series_uid) is not None, "younger than rows_days"
    # The kept series is past images_days (31 > 30): its images went, its rows stay.
    assert _spool_files(tmp_path) == set()


def test_rows_days_below_images_days_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rows_days"):
        _config(tmp_path, "sqlite://", images_days=30, rows_days=7)


def test_cli_dry_run(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'node.db'}"
    store.upgrade(db)
    engine = store.make_engine(db)
    factory = store.make_session_factory(engine)
    study = _ingest(tmp_path, factory, 21, OLD)
    _decide(factory, study, SeriesState.NOT_TRIAGED)
    engine.dispose()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "spool"}"\n[database]\nurl = "{db}"\n')
    out = subprocess.run([sys.executable, "-m", "triage_node.cli", "retention", "--dry-run",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"would remove images  {study.series_uid}" in out.stdout
    assert "dry run: would remove 4 image file(s)" in out.stdout
    assert len(_spool_files(tmp_path)) == 4
