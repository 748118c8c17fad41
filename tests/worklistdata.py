"""A populated node database and a live worklist API server, for the API and browser tests.

The database is filled through the real store functions only: instances recorded with
``record_batch``, series completed, claimed and given results with ``store_result``, key
images saved, an SR delivery failed in the outbox, audit events recorded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
from nodeproc import free_port
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.api import create_app
from triage_node.config import Config, build_config
from triage_node.domain import (
    LABELS,
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceState,
    ResultDocument,
    SeriesResult,
    SeriesState,
    utcnow,
)

#: Arrival of the first series: an hour ago (whole seconds), so "last N hours" filters work.
T0 = utcnow().replace(microsecond=0) - dt.timedelta(hours=1)
#: In every recorded instance: must never appear in an API response or log.
PATIENT_NAME = "SECRETNAME^DONOTLEAK"
TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Planned:
    """One series of the populated database."""

    uid: str
    patient_id: str
    accession: str
    arrived: dt.datetime
    any_p: float | None  # None: no result
    state: SeriesState
    n: int = 4


#: Arrival order a, b, c, d, e, f; flagged c (0.95) and e (0.80); b and d done below the
#: threshold; f still receiving; a failed. Priority: c, e, then a, b, d, f by arrival.
PLAN = (
    Planned("1.2.826.0.1.9.1", "P-A", "ACC-A", T0, None, SeriesState.FAILED),
    Planned("1.2.826.0.1.9.2", "P-B", "ACC-B", T0 + dt.timedelta(minutes=1), 0.10,
            SeriesState.DONE),
    Planned("1.2.826.0.1.9.3", "P-C", "ACC-C", T0 + dt.timedelta(minutes=2), 0.95,
            SeriesState.DONE),
    Planned("1.2.826.0.1.9.4", "P-D", "ACC-D", T0 + dt.timedelta(minutes=3), 0.30,
            SeriesState.DONE),
    Planned("1.2.826.0.1.9.5", "P-E", "ACC-E", T0 + dt.timedelta(minutes=4), 0.80,
            SeriesState.DONE),
    Planned("1.2.826.0.1.9.6", "P-F", "ACC-F", T0 + dt.timedelta(minutes=5), None,
            SeriesState.RECEIVING),
)
PRIORITY = [PLAN[i].uid for i in (2, 4, 0, 1, 3, 5)]


def png(seed: int, size: int = 32, rgb: bool = False) -> bytes:
    """A small PNG of noise."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), "RGB" if rgb else "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _instances(p: Planned) -> list[InstanceRecord]:
    return [
        InstanceRecord(
            sop_instance_uid=f"{p.uid}.{k + 1}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=p.uid + ".0",
            series_instance_uid=p.uid,
            patient_id=p.patient_id,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_path=f"spool/{p.uid}/{k + 1}.dcm",
            file_size=1000,
            received_at=p.arrived + dt.timedelta(seconds=k),
            calling_ae="CT1",
            state=InstanceState.STORED,
            patient_name=PATIENT_NAME,
            accession_number=p.accession,
            study_description="CT HEAD",
            modality="CT",
            body_part_examined="HEAD",
            series_description=f"Axial {p.patient_id}",
            series_number=2,
            instance_number=k + 1,
            image_position=(0.0, 0.0, 5.0 * k),
            image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            rows=64,
            columns=64,
        )
        for k in range(p.n)
    ]


def _result(p: Planned) -> SeriesResult:
    assert p.any_p is not None
    slices = []
    for k in range(p.n):
        a = p.any_p * (k + 1) / p.n
        probs = (a, a * 0.1, a * 0.2, a * 0.1, a * 0.3, a * 0.9)
        slices.append((f"{p.uid}.{k + 1}", 5.0 * k, probs))
    series = {lab: max(s[2][j] for s in slices) for j, lab in enumerate(LABELS)}
    done = p.arrived + dt.timedelta(seconds=p.n + 20)
    return SeriesResult(
        series_instance_uid=p.uid,
        probabilities=series,
        slices=tuple(slices),
        key_sop_instance_uid=f"{p.uid}.{p.n}",
        flagged=p.any_p >= 0.5,
        threshold=0.5,
        model_name="test-model",
        model_version="1.2.3",
        model_sha256="ab" * 32,
        inference_started_at=done - dt.timedelta(seconds=3),
        inference_done_at=done,
    )


def populate(factory: sessionmaker[Session]) -> None:
    """Fill the database with :data:`PLAN`."""
    for p in PLAN:
        records = _instances(p)
        store.record_batch(factory, records, [
            EventRecord(EventKind.INSTANCE_STORED, r.received_at, actor="CT1",
                        outcome="stored", study_instance_uid=r.study_instance_uid,
                        series_instance_uid=p.uid, sop_instance_uid=r.sop_instance_uid)
            for r in records])
        if p.state is SeriesState.RECEIVING:
            continue
        last = records[-1].received_at
        assert store.complete_series(factory, p.uid, state=SeriesState.QUEUED, reason=None,
                                     at=last + dt.timedelta(seconds=2),
                                     last_received_at=last)
        assert store.claim_series(factory, p.uid)
        if p.state is SeriesState.FAILED:
            assert store.fail_series(factory, p.uid, "cannot classify: test")
            continue
        assert store.store_result(factory, _result(p)) is SeriesState.DONE
        store.save_key_images(factory, p.uid, sop_instance_uid=f"{p.uid}.{p.n}",
                              plain_png=png(1), heatmap_png=png(2, rgb=True),
                              method="gradcam", model_sha256="ab" * 32)
    # The flagged series c: its SR could not be delivered.
    flagged = PLAN[2].uid
    result = store.get_result(factory, flagged)
    assert result is not None and result.stored_at is not None
    store.add_document(factory, ResultDocument(
        series_instance_uid=flagged, sop_instance_uid=flagged + ".99",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", instance_number=1,
        result_stored_at=result.stored_at, supersedes_sop_instance_uid=None,
        created_at=result.stored_at, dataset=b"DICM-test"), ["PACS@127.0.0.1:104"])
    now = utcnow()
    (delivery, _), = store.claim_due(factory, now=now, lease_seconds=60)
    assert store.mark_failed(factory, delivery, error="association rejected", at=now)


def make_config(tmp_path: Path, database_url: str, **api: object) -> Config:
    """A configuration on ``database_url`` with the API on a free loopback port."""
    section: dict[str, object] = {"host": "127.0.0.1", "port": free_port()}
    section.update(api)
    return build_config({"data_dir": str(tmp_path / "data"),
                         "database": {"url": database_url}, "api": section}, env={})


@contextlib.contextmanager
def live_server(config: Config) -> Iterator[str]:
    """Serve the API of ``config`` in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=config.api.host,
                                           port=config.api.port, log_config=None,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.api.host}:{config.api.port}"
    finally:
        server.should_exit = True
        thread.join(10)
