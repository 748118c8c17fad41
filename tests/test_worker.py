"""storescu -> SCP -> broker -> worker subprocess -> result in the database (real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from markers import needs_dcmtk
from nodeproc import running_node, storescu

from triage_node import store
from triage_node.domain import SeriesState
from triage_node.model import random_artifact
from triage_node.phantom import generate_study
from triage_node.preprocess import PreprocessSpec

pytestmark = needs_dcmtk


def _model(tmp_path: Path) -> Path:
    spec = PreprocessSpec(size=64)
    path = tmp_path / "model.tnm"
    random_artifact(path, architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=3)
    return path


def _run(tmp_path: Path, broker: str) -> None:
    truth = generate_study(tmp_path / "ph", seed=21, n_slices=12, rows=96, cols=96)
    extra = (f'[queue]\nbroker_url = "{broker}"\n[model]\npath = "{_model(tmp_path)}"\n'
             '[triage]\nrelease_settle_seconds = 0.5\n')
    with running_node(tmp_path, extra=extra) as node:
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "triage_node.cli", "worker", "--config", str(node.config)],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            out = storescu(node.port, [s.path for s in truth.slices])
            assert out.stderr.count("(Success)") == 12
            engine = store.make_engine(node.database_url)
            factory = store.make_session_factory(engine)
            deadline = time.monotonic() + 90
            result = None
            while result is None and time.monotonic() < deadline:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                result = store.get_result(factory, truth.series_uid)
                time.sleep(0.2)
            assert result is not None, (tmp_path / "worker.log").read_text()[-3000:]
            assert len(result.slices) == 12
            assert store.list_series(factory)[0].state is SeriesState.DONE
            engine.dispose()
        finally:
            worker.terminate()
            worker.wait(60)
            log.close()


def test_end_to_end_with_redis(tmp_path: Path, redis_url: str) -> None:
    _run(tmp_path, redis_url)


def test_end_to_end_embedded_transport(tmp_path: Path) -> None:
    """No Redis: kombu's durable SQLite transport (the embedded default) carries the task."""
    _run(tmp_path, f"sqla+sqlite:///{tmp_path / 'queue.db'}")
    assert (tmp_path / "queue.db").is_file()


def test_embedded_transport_is_the_default(tmp_path: Path) -> None:
    from triage_node.config import load_config
    from triage_node.tasks import broker_url, make_celery

    cfg = load_config(None, env={"TRIAGE_NODE_DATA_DIR": str(tmp_path / "data")})
    assert broker_url(cfg) == f"sqla+sqlite:///{tmp_path / 'data' / 'queue.db'}"
    app = make_celery(cfg)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert (tmp_path / "data").is_dir()


def test_series_left_queued_is_picked_up_by_a_new_worker(tmp_path: Path, redis_url: str) -> None:
    """Decided but never queued (a crash in between): the next worker's assembler re-queues."""

    import datetime as dt

    import sqlalchemy as sa

    from triage_node.config import TriageConfig
    from triage_node.domain import utcnow
    from triage_node.series import assemble_due
    from triage_node.store.models import UTCDateTime

    truth = generate_study(tmp_path / "ph", seed=22, n_slices=12, rows=96, cols=96)
    extra = f'[queue]\nbroker_url = "{redis_url}"\n[model]\npath = "{_model(tmp_path)}"\n'
    with running_node(tmp_path, extra=extra) as node:
        assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        time.sleep(0.2)  # quiet for longer than stable_seconds below: decided now, not later
        decided = assemble_due(factory, TriageConfig(stable_seconds=0.1), now=utcnow())
        assert [d.selected for d in decided] == [True]  # queued in the database, no task sent
        # ... a minute before this worker starts (a younger decision may be another live
        # assembler's, which the start-up sweep leaves alone for SWEEP_GRACE_SECONDS).
        with factory.begin() as session:
            session.execute(
                sa.text("UPDATE series SET completed_at = :t").bindparams(
                    sa.bindparam("t", type_=UTCDateTime())),
                {"t": utcnow() - dt.timedelta(minutes=1)})
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "worker",
                                       "--config", str(node.config)],
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while store.get_result(factory, truth.series_uid) is None:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
                assert worker.poll() is None
                time.sleep(0.2)
            assert "re-queuing series" in (tmp_path / "worker.log").read_text()
        finally:
            worker.terminate()
            worker.wait(60)
        engine.dispose()


def test_two_workers_share_the_work_once(tmp_path: Path, redis_url: str) -> None:
    """Two worker processes (each with an assembler) against one Redis and one database:
    every series is decided once, queued once and classified once."""
    studies = [generate_study(tmp_path / f"ph{i}", seed=30 + i, n_slices=10, rows=96, cols=96)
               for i in range(4)]
    extra = (f'[queue]\nbroker_url = "{redis_url}"\n[model]\npath = "{_model(tmp_path)}"\n'
             '[triage]\nrelease_settle_seconds = 0.5\nmin_slices = 5\n')
    with running_node(tmp_path, extra=extra) as node:
        logs = [tmp_path / f"worker{i}.log" for i in range(2)]
        workers = []
        for path in logs:
            with path.open("wb") as fh:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "triage_node.cli", "worker", "--config",
                     str(node.config)], stdout=fh, stderr=subprocess.STDOUT))
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        try:
            for truth in studies:
                assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
            deadline = time.monotonic() + 120
            while not all(store.get_result(factory, t.series_uid) for t in studies):
                assert time.monotonic() < deadline, "\n".join(p.read_text()[-1500:] for p in logs)
                assert all(w.poll() is None for w in workers)
                time.sleep(0.2)
            time.sleep(1.0)  # let a duplicate, if any, show up in the logs
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(60)
        text = "".join(p.read_text() for p in logs)
        assert text.count("classified: any=") == len(studies), text[-3000:]
        assert text.count("complete (") == len(studies)
        per_worker = [p.read_text().count("classified: any=") for p in logs]
        engine.dispose()
    print("series classified per worker:", per_worker)


def test_serve_runs_scp_and_worker_with_no_redis(tmp_path: Path) -> None:
    """`triage-node serve`: one command, embedded transport, slices in -> result out; SIGTERM
    stops every process and exits 0."""
    truth = generate_study(tmp_path / "ph", seed=40, n_slices=12, rows=96, cols=96)
    extra = (f'[queue]\nbroker_url = "sqla+sqlite:///{tmp_path / "queue.db"}"\n'
             f'[model]\npath = "{_model(tmp_path)}"\n[triage]\nrelease_settle_seconds = 0.5\n')
    with running_node(tmp_path, extra=extra, command="serve") as node:
        assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        deadline = time.monotonic() + 90
        while store.get_result(factory, truth.series_uid) is None:
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            assert node.proc.poll() is None, node.log_text()[-3000:]
            time.sleep(0.2)
        engine.dispose()
        assert node.stop() == 0, node.log_text()[-3000:]


def test_serve_without_a_model_assembles_and_queues(tmp_path: Path) -> None:
    truth = generate_study(tmp_path / "ph", seed=41, n_slices=12, rows=96, cols=96)
    extra = (f'[queue]\nbroker_url = "sqla+sqlite:///{tmp_path / "queue.db"}"\n'
             '[triage]\nrelease_settle_seconds = 0.5\n[model]\nenabled = false\n')
    with running_node(tmp_path, extra=extra, command="serve") as node:
        assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        deadline = time.monotonic() + 60
        while store.list_series(factory)[0].state is not SeriesState.QUEUED:
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            time.sleep(0.2)
        assert "no [model] path" in node.log_text()
        engine.dispose()
        assert node.stop() == 0
