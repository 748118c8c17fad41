"""Queued work survives the death or restart of any one process (real processes, real Redis).

- a worker SIGKILLed while it classifies: the broker delivers the task again and a new
  worker (with no assembler that could re-queue it) classifies the series once;
- the SCP SIGKILLed mid-series and started again: every acknowledged slice is there and
  the series' result covers all of them;
- the embedded transport: stopped with work queued, started again, the work completes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from markers import needs_dcmtk
from nodeproc import free_port, running_node, storescu, write_config

from triage_node import store
from triage_node.domain import EventKind, SeriesState
from triage_node.model import random_artifact
from triage_node.phantom import generate_study
from triage_node.preprocess import PreprocessSpec

pytestmark = needs_dcmtk


def _model(tmp_path: Path, size: int = 64) -> Path:
    spec = PreprocessSpec(size=size)
    path = tmp_path / f"model{size}.tnm"
    random_artifact(path, architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=3)
    return path


def _worker(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "triage_node.cli", "worker", "--config", str(config), *args],
            stdout=fh, stderr=subprocess.STDOUT)


def _wait(predicate: Callable[[], bool], what: str, timeout: float, logs: Sequence[Path],
          procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Poll ``predicate``; fail with the logs if it times out or a process died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, "\n".join(x.read_text()[-2000:] for x in logs)
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n" + "\n".join(
            x.read_text()[-2000:] for x in logs if x.exists())
        time.sleep(0.05)


def test_worker_killed_mid_series_task_is_redelivered(tmp_path: Path, redis_url: str) -> None:
    truth = generate_study(tmp_path / "ph", seed=51, n_slices=60, rows=128, cols=128)
    # Big enough input that classification takes seconds: time to kill the worker in it.
    extra = (f'[queue]\nbroker_url = "{redis_url}"\nvisibility_timeout = 3\neager_batch = 0\n'
             f'[model]\npath = "{_model(tmp_path, size=256)}"\n'
             '[triage]\nrelease_settle_seconds = 0.2\n')
    with running_node(tmp_path, extra=extra) as node:
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        first_log, second_log = tmp_path / "worker1.log", tmp_path / "worker2.log"
        first = _worker(node.config, first_log)
        assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0

        def processing() -> bool:
            return store.list_series(factory)[0].state is SeriesState.PROCESSING

        _wait(processing, "series claimed", 120, [first_log], [first])
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert store.get_result(factory, truth.series_uid) is None, \
            "the worker finished before it was killed: make the series bigger"
        # No assembler: only the broker's redelivery of the unacknowledged task can help.
        second = _worker(node.config, second_log, "--no-assembler")
        try:
            _wait(lambda: store.get_result(factory, truth.series_uid) is not None,
                  "result", 120, [second_log], [second])
        finally:
            second.terminate()
            second.wait(60)
        result = store.get_result(factory, truth.series_uid)
        assert result is not None and len(result.slices) == 60
        assert store.list_series(factory)[0].state is SeriesState.DONE
        assert "classified: any=" not in first_log.read_text()
        assert second_log.read_text().count("classified: any=") == 1
        engine.dispose()


def test_scp_killed_mid_series_and_restarted_loses_nothing(tmp_path: Path,
                                                          redis_url: str) -> None:
    truth = generate_study(tmp_path / "ph", seed=52, n_slices=16, rows=96, cols=96)
    files = [s.path for s in truth.slices]
    extra = (f'[queue]\nbroker_url = "{redis_url}"\n[model]\npath = "{_model(tmp_path)}"\n'
             '[triage]\nrelease_settle_seconds = 0.5\n')
    worker_log = tmp_path / "worker.log"
    with running_node(tmp_path, extra=extra) as node:
        worker = _worker(node.config, worker_log)
        out = storescu(node.port, files[:7])
        assert out.stderr.count("(Success)") == 7
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(30)
        database_url = node.database_url
    try:
        with running_node(tmp_path, extra=extra) as node:  # same spool, database, broker
            assert storescu(node.port, files[7:]).stderr.count("(Success)") == 9
            engine = store.make_engine(database_url)
            factory = store.make_session_factory(engine)

            def complete() -> bool:
                result = store.get_result(factory, truth.series_uid)
                return (result is not None and len(result.slices) == 16
                        and store.list_series(factory)[0].state is SeriesState.DONE)

            _wait(complete, "result over all 16 slices", 120, [worker_log], [worker])
            assert store.count_instances(factory) == 16
            result = store.get_result(factory, truth.series_uid)
            assert result is not None
            assert [s[0] for s in result.slices] == [s.sop_uid for s in truth.slices]
            engine.dispose()
    finally:
        worker.terminate()
        worker.wait(60)


def test_embedded_mode_stopped_with_work_queued_finishes_after_restart(tmp_path: Path) -> None:
    """`serve` without a model queues the series in the embedded broker (queue.db) and is
    stopped; a worker started afterwards - with no assembler, so nothing re-queues it -
    finds the task in queue.db and classifies the series."""
    truth = generate_study(tmp_path / "ph", seed=53, n_slices=12, rows=96, cols=96)
    queue = f'[queue]\nbroker_url = "sqla+sqlite:///{tmp_path / "queue.db"}"\n'
    triage = '[triage]\nrelease_settle_seconds = 0.5\n'
    no_model = '[model]\nenabled = false\n'
    with running_node(tmp_path, extra=queue + triage + no_model, command="serve") as node:
        assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        _wait(lambda: store.list_series(factory)[0].state is SeriesState.QUEUED, "queued",
              60, [node.log])
        assert node.stop() == 0
        database_url, spool = node.database_url, node.spool
    cfg = write_config(tmp_path / "restart.toml", port=free_port(), spool=spool,
                       database_url=database_url,
                       extra=queue + f'[model]\npath = "{_model(tmp_path)}"\n' + triage)
    log = tmp_path / "restart.log"
    worker = _worker(cfg, log, "--no-assembler")
    try:
        _wait(lambda: store.get_result(factory, truth.series_uid) is not None, "result", 90,
              [log], [worker])
    finally:
        worker.terminate()
        worker.wait(60)
    assert store.list_series(factory)[0].state is SeriesState.DONE
    assert log.read_text().count("classified: any=") == 1
    engine.dispose()


def test_series_with_undecodable_slice_fails_with_reason_and_worker_goes_on(
        tmp_path: Path) -> None:
    """A JPEG 2000 slice whose fragments are not JPEG 2000 passes the SCP (header-only
    parse; compressed data is not decoded on the receive path) but cannot be classified:
    the series becomes failed with a reason naming the slice, and the next series is
    classified as usual. (Short native pixel data is caught on arrival instead: see
    tests/badinput.)"""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    bad = generate_study(tmp_path / "bad", seed=54, n_slices=12, rows=64, cols=64)
    good = generate_study(tmp_path / "good", seed=55, n_slices=12, rows=64, cols=64)
    broken = bad.slices[5]
    ds = dcmread(broken.path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(broken.path)
    extra = (f'[queue]\nbroker_url = "sqla+sqlite:///{tmp_path / "queue.db"}"\n'
             f'[model]\npath = "{_model(tmp_path)}"\n[triage]\nrelease_settle_seconds = 0.5\n')
    with running_node(tmp_path, extra=extra, command="serve") as node:
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        # Our SCU proposes each file's own transfer syntax (storescu would try to decompress).
        from triage_node.scu import send

        report = send([s.path for s in bad.slices], "127.0.0.1", node.port,
                      called_ae="ICHTRIAGE")
        assert report.ok and report.sent == 12, report

        def state(uid: str) -> SeriesState | None:
            return next((s.state for s in store.list_series(factory)
                         if s.series_instance_uid == uid), None)

        _wait(lambda: state(bad.series_uid) is SeriesState.FAILED, "failed series", 90,
              [node.log])
        row = next(s for s in store.list_series(factory) if s.series_instance_uid == bad.series_uid)
        assert row.reason and broken.sop_uid in row.reason, row.reason
        assert storescu(node.port, [s.path for s in good.slices]).returncode == 0
        _wait(lambda: store.get_result(factory, good.series_uid) is not None, "result", 90,
              [node.log])
        assert store.get_result(factory, bad.series_uid) is None
        [failed] = store.list_events(factory, kinds=[EventKind.SERIES_FAILED])
        assert failed.series_instance_uid == bad.series_uid and broken.sop_uid in failed.detail
        engine.dispose()
        assert node.stop() == 0
