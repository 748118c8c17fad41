"""Inference while a series arrives, and workers that cannot see the SCP's spool.

Real SCP subprocesses, real dcmtk storescu, real HTTP, real Redis and worker processes.
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from markers import needs_dcmtk
from nodeproc import free_port, running_node, storescu, wait_port, write_config
from pydicom import dcmread

from triage_node import store
from triage_node.classify import classify_series, infer_slices
from triage_node.config import TriageConfig
from triage_node.domain import SeriesState, utcnow
from triage_node.errors import SpoolError
from triage_node.model import load_artifact, random_artifact
from triage_node.phantom import generate_study
from triage_node.pipeline import Predictor
from triage_node.preprocess import PreprocessSpec
from triage_node.series import assemble_due
from triage_node.spool import Spool
from triage_node.spoolhttp import RemoteSpool, serve_spool
from triage_node.tasks import EagerBatches

pytestmark = needs_dcmtk


def _predictor(tmp_path: Path, context: int = 1) -> Predictor:
    spec = PreprocessSpec(size=48, context=context)
    random_artifact(tmp_path / "m.tnm", architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=5)
    return Predictor(load_artifact(tmp_path / "m.tnm"), batch_size=4)


def _rows(factory: object, uid: str, predictor: Predictor) -> int:
    return len(store.slice_predictions(factory, uid,  # type: ignore[arg-type]
                                       predictor.model.meta.weights_sha256))


@pytest.mark.parametrize("arrival", ["in_order", "interleaved"])
def test_predicted_ahead_then_completed_equals_whole_series(tmp_path: Path,
                                                            arrival: str) -> None:
    """Slices predicted while the series arrives give exactly the whole-series result; a
    slice that lands between two others makes its neighbours' predictions be redone."""
    truth = generate_study(tmp_path / "ph", seed=31, n_slices=12, rows=80, cols=80,
                           positive=True)
    files = [s.path for s in truth.slices]  # in z order
    first, rest = ((files[:6], files[6:]) if arrival == "in_order"
                   else (files[0::2], files[1::2]))
    predictor = _predictor(tmp_path)
    with running_node(tmp_path) as node:
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        spool = Spool(node.spool)
        assert storescu(node.port, first).returncode == 0
        # Six slices with 2.5D context 1: the last one waits for its upper neighbour.
        assert infer_slices(factory, spool, predictor, truth.series_uid) == 5
        assert infer_slices(factory, spool, predictor, truth.series_uid) == 0, "idempotent"
        assert storescu(node.port, rest).returncode == 0
        decided = assemble_due(factory, TriageConfig(), now=utcnow() + dt.timedelta(minutes=2))
        assert [d.selected for d in decided] == [True]
        result = classify_series(factory, spool, predictor, truth.series_uid)
        assert result is not None
        whole = predictor.predict_series(files)
        assert [s[0] for s in result.slices] == [s.sop_uid for s in truth.slices]
        np.testing.assert_allclose(
            [s[2] for s in result.slices],
            [[p.probabilities[lab] for lab in p.probabilities] for p in whole.slices],
            atol=1e-5)
        assert result.probabilities == pytest.approx(whole.probabilities, abs=1e-5)
        assert result.key_sop_instance_uid == whole.key_sop_instance_uid
        # In order: the five predicted ahead are reused, seven are new. Interleaved: every
        # slice got new neighbours, so all twelve are predicted again.
        assert _rows(factory, truth.series_uid, predictor) == (
            12 if arrival == "in_order" else 17)
        engine.dispose()


def test_eager_batches_follow_arrivals_and_skip_non_head(tmp_path: Path) -> None:
    truth = generate_study(tmp_path / "ph", seed=32, n_slices=9, rows=64, cols=64)
    chest = generate_study(tmp_path / "chest", seed=33, n_slices=6, rows=64, cols=64)
    for s in chest.slices:
        ds = dcmread(s.path)
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = ds.StudyDescription = "Thorax"
        ds.save_as(s.path)
    files = [s.path for s in truth.slices]
    with running_node(tmp_path) as node:
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        eager = EagerBatches(TriageConfig(), batch=4)
        assert storescu(node.port, files[:5] + [s.path for s in chest.slices]).returncode == 0
        assert eager.due(factory) == [truth.series_uid], "4 new slices make a batch; not chest"
        assert eager.due(factory) == [], "nothing new"
        assert storescu(node.port, files[5:7]).returncode == 0
        assert eager.due(factory) == [], "2 new slices: arrivals may go on"
        assert eager.due(factory) == [truth.series_uid], "no arrival since: hand out the rest"
        assert eager.due(factory) == []
        assert EagerBatches(TriageConfig(), batch=0).due(factory) == [], "0 turns it off"
        engine.dispose()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Spool, int]]:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    spool.write("a/b/c.dcm", b"DICM" * 100)
    (spool.incoming / "partial.dcm").write_bytes(b"x")
    server = serve_spool(spool, "127.0.0.1", 0, token="s3cret")
    yield spool, server.port
    server.shutdown()
    server.server_close()


def test_spool_server_hands_out_stored_files_only(tmp_path: Path,
                                                  served: tuple[Spool, int]) -> None:
    _, port = served
    remote = RemoteSpool(f"http://127.0.0.1:{port}", tmp_path / "cache", token="s3cret")
    assert remote.path("a/b/c.dcm", 400).read_bytes() == b"DICM" * 100
    assert remote.path("a/b/c.dcm", 400) == tmp_path / "cache" / "a/b/c.dcm", "cached"
    with pytest.raises(SpoolError, match="recorded 401"):
        (tmp_path / "cache" / "a/b/c.dcm").unlink()
        remote.path("a/b/c.dcm", 401)
    assert not (tmp_path / "cache" / "a/b/c.dcm").exists(), "a short copy is never kept"
    assert list((tmp_path / "cache" / "a" / "b").iterdir()) == []
    with pytest.raises(SpoolError, match="404"):
        remote.path("a/b/missing.dcm", 1)
    with pytest.raises(SpoolError, match="401"):
        RemoteSpool(f"http://127.0.0.1:{port}", tmp_path / "c2", token="wrong").path(
            "a/b/c.dcm", 400)
    with pytest.raises(SpoolError, match="not a spool path"):
        remote.path("../spool/a/b/c.dcm", 400)
    for raw in ("/spool/../spool/a/b/c.dcm", "/spool/%2e%2e/etc/passwd", "/spool/.incoming/"
                "partial.dcm", "/spool//etc/passwd", "/etc/passwd"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", raw, headers={"Authorization": "Bearer s3cret"})
        response = conn.getresponse()
        assert response.status == 404, raw
        response.read()
        conn.close()
    with pytest.raises(SpoolError, match="cannot fetch"):
        RemoteSpool(f"http://127.0.0.1:{free_port()}", tmp_path / "c3").path("a/b/c.dcm", 400)


def test_worker_without_the_spool_fetches_from_the_scp_host(tmp_path: Path,
                                                           redis_url: str) -> None:
    """The worker's [storage] path is an empty folder of its own (another host, no shared
    volume): it fetches the slices from the SCP's spool server and classifies the series."""
    truth = generate_study(tmp_path / "ph", seed=34, n_slices=12, rows=80, cols=80)
    spec = PreprocessSpec(size=48, context=1)
    model = tmp_path / "m.tnm"
    random_artifact(model, architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=6)
    http_port = free_port()
    storage = f'http_port = {http_port}\nhttp_token = "t0ken"\n'
    queue = f'[queue]\nbroker_url = "{redis_url}"\n[triage]\nrelease_settle_seconds = 0.5\n'
    with running_node(tmp_path, extra=queue, storage_extra=storage) as node:
        wait_port(http_port, node.proc)
        elsewhere = tmp_path / "worker-host"
        elsewhere.mkdir()
        cfg = write_config(
            elsewhere / "config.toml", port=free_port(), spool=elsewhere / "spool",
            database_url=node.database_url, storage_extra='http_token = "t0ken"\n',
            extra=(f'[queue]\nbroker_url = "{redis_url}"\n'
                   f'spool_url = "http://127.0.0.1:{http_port}"\neager_batch = 4\n'
                   f'[model]\npath = "{model}"\n[triage]\nrelease_settle_seconds = 0.5\n'))
        log = elsewhere / "worker.log"
        with log.open("wb") as fh:
            worker = subprocess.Popen(
                [sys.executable, "-m", "triage_node.cli", "worker", "--config", str(cfg)],
                stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "TRIAGE_NODE_DATA_DIR": str(elsewhere)})
        try:
            assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
            engine = store.make_engine(node.database_url)
            factory = store.make_session_factory(engine)
            deadline = time.monotonic() + 90
            while (result := store.get_result(factory, truth.series_uid)) is None:
                assert worker.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            assert [s[0] for s in result.slices] == [s.sop_uid for s in truth.slices]
            assert store.list_series(factory)[0].state is SeriesState.DONE
            whole = Predictor(load_artifact(model)).predict_series(
                [s.path for s in truth.slices])
            assert result.probabilities == pytest.approx(whole.probabilities, abs=1e-5)
            spool_files = [p for p in (elsewhere / "spool").rglob("*.dcm")]
            assert spool_files == [], "the worker never wrote to a spool of its own"
            assert [p for p in (elsewhere / "fetched").rglob("*.dcm")] == [], \
                "fetched copies are dropped once the series is classified"
            engine.dispose()
        finally:
            worker.terminate()
            worker.wait(60)
