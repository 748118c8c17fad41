"""Tests of triage_node.sender and the outbox (triage_node.store.outbox) against real peers:
dcmtk storescp as the PACS, SQLite and PostgreSQL as the database."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import logging
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nodeproc import DCMTK_ENV, free_port, wait_port
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from triage_node import sender, store
from triage_node.config import Config, ResultsConfig, build_config, load_config
from triage_node.domain import LABELS, DeliveryState, EventKind, SeriesResult, utcnow
from triage_node.errors import ConfigError, PermanentAssociationError
from triage_node.ingest import instance_record
from triage_node.phantom import StudyTruth, generate_study
from triage_node.scu import AssociationRequest
from triage_node.spool import Spool

STORESCP = Path("/usr/bin/storescp")
DCIODVFY = Path("/usr/bin/dciodvfy")
ROOT = Path(__file__).resolve().parents[1]

needs_storescp = pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk storescp missing")


# --------------------------------------------------------------------------- helpers


@dataclass
class StoreSCP:
    """A running dcmtk storescp."""

    port: int
    out_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def received(self) -> list[Dataset]:
        return [dcmread(p) for p in sorted(self.out_dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start ``/usr/bin/storescp`` (on ``port`` or a free one); stopped at teardown."""
    started: list[StoreSCP] = []

    def start(*options: str, port: int | None = None) -> StoreSCP:
        n = len(started)
        out_dir = tmp_path / f"storescp{n}"
        out_dir.mkdir()
        log = tmp_path / f"storescp{n}.log"
        chosen = port or free_port()
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [str(STORESCP), "--output-directory", str(out_dir), "--unique-filenames",
                 *options, str(chosen)],
                stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV,
            )
        scp = StoreSCP(chosen, out_dir, proc, log)
        started.append(scp)
        wait_port(chosen, proc)
        return scp

    yield start
    for scp in started:
        scp.stop()


@dataclass
class Node:
    """A database with one classified series, its spool, and a config pointing at both."""

    tmp: Path
    database_url: str
    factory: sessionmaker[Session]
    study: StudyTruth
    result: SeriesResult

    def config(self, *ports: int, **results: Any) -> Config:
        policy = {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.2, "timeout": 5.0,
                  "poll_seconds": 0.05, **results}
        return build_config(
            {
                "data_dir": str(self.tmp / "data"),
                "dicom": {"ae_title": "ICHTRIAGE"},
                "storage": {"path": str(self.tmp / "spool")},
                "database": {"url": self.database_url},
                "results": policy,
                "destinations": [
                    {"ae_title": f"PACS{i}", "host": "127.0.0.1", "port": port}
                    for i, port in enumerate(ports)
                ],
            },
            env={},
            base_dir=self.tmp,
        )

    def store_result(self, any_p: float) -> SeriesResult:
        """Store (or replace) the series' result with ``any`` = ``any_p``."""
        result = dataclasses.replace(
            self.result,
            probabilities={**self.result.probabilities, "any": any_p},
            flagged=any_p >= self.result.threshold,
            inference_done_at=utcnow(),
        )
        store.store_result(self.factory, result)
        stored = store.get_result(self.factory, self.study.series_uid)
        assert stored is not None
        return stored


def ingest(tmp: Path, factory: sessionmaker[Session], seed: int) -> StudyTruth:
    """Write a phantom series into the spool and record it, as the SCP would."""
    study = generate_study(tmp / "src", seed=seed, n_slices=10, rows=64, cols=64,
                           positive=True, quirks=False)
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
            file_size=s.path.stat().st_size, calling_ae="CT", received_at=utcnow(),
        ))
    store.record_batch(factory, records)
    return study


@pytest.fixture
def node(tmp_path: Path, database_url: str,
         session_factory: sessionmaker[Session]) -> Node:
    study = ingest(tmp_path, session_factory, seed=21)
    slices = tuple(
        (s.sop_uid, i * 5.0, tuple(0.9 if (i == 4 and j == 0) else 0.1 for j in range(6)))
        for i, s in enumerate(study.slices)
    )
    now = utcnow()
    result = SeriesResult(
        series_instance_uid=study.series_uid,
        probabilities={label: (0.9 if label == "any" else 0.1) for label in LABELS},
        slices=slices,
        key_sop_instance_uid=study.slices[4].sop_uid,
        flagged=True,
        threshold=0.5,
        model_name="ich-demo",
        model_version="1.0",
        model_sha256="ab" * 32,
        inference_started_at=now,
        inference_done_at=now,
    )
    store.store_result(session_factory, result)
    stored = store.get_result(session_factory, study.series_uid)
    assert stored is not None
    return Node(tmp_path, database_url, session_factory, study, stored)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@contextlib.contextmanager
def delivering(config: Config, factory: sessionmaker[Session], **kwargs: Any) -> Iterator[None]:
    """Run the delivery loop in a thread for the duration of the block."""
    stop = threading.Event()
    thread = threading.Thread(target=sender.run_delivery, args=(config, factory, stop),
                              kwargs=kwargs, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def deliveries(factory: sessionmaker[Session]) -> list[Any]:
    return store.list_deliveries(factory)


def only(factory: sessionmaker[Session]) -> Any:
    (row,) = store.list_deliveries(factory)
    return row


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# --------------------------------------------------------------------------- delivery


@needs_storescp
def test_delivered_to_storescp_and_valid(node: Node, storescp: Callable[..., StoreSCP]) -> None:
    scp = storescp()
    config = node.config(scp.port)
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert uid is not None
    assert only(node.factory).state is DeliveryState.PENDING
    assert sender.deliver_due(config, node.factory) == 1
    row = only(node.factory)
    assert (row.state, row.attempts, row.sop_instance_uid) == (DeliveryState.SENT, 1, uid)
    assert row.sent_at is not None and row.last_error is None
    (received,) = scp.received()
    assert received.SOPInstanceUID == uid
    assert received.PatientID == f"PHANTOM-{node.study.seed}"
    assert received.StudyInstanceUID == node.study.study_uid
    files = [p for p in scp.out_dir.iterdir() if p.is_file()]
    if DCIODVFY.exists():
        assert dciodvfy_errors(files[0]) == []
    [event] = store.list_events(node.factory, kinds=[EventKind.RESULT_DELIVERED])
    assert (event.sop_instance_uid, event.peer) == (uid, row.destination)
    # Nothing left to do: the row is not sent again.
    assert sender.deliver_due(config, node.factory) == 0
    assert store.delivery_counts(node.factory)[DeliveryState.SENT] == 1


@needs_storescp
def test_several_destinations_get_the_same_sr(node: Node,
                                              storescp: Callable[..., StoreSCP]) -> None:
    a, b = storescp(), storescp()
    config = node.config(a.port, b.port)
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert uid is not None
    with delivering(config, node.factory):
        wait_for(lambda: all(d.state is DeliveryState.SENT for d in deliveries(node.factory)),
                 what="both deliveries sent")
    assert sorted(d.destination for d in deliveries(node.factory)) == [
        f"PACS0@127.0.0.1:{a.port}", f"PACS1@127.0.0.1:{b.port}"
    ]
    assert [ds.SOPInstanceUID for ds in a.received()] == [uid]
    assert [ds.SOPInstanceUID for ds in b.received()] == [uid]


@needs_storescp
def test_destination_down_then_up_delivered_exactly_once(
    node: Node, storescp: Callable[..., StoreSCP]
) -> None:
    port = free_port()  # nobody listens yet
    config = node.config(port, max_attempts=1000)
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert uid is not None
    with delivering(config, node.factory):
        wait_for(lambda: only(node.factory).attempts >= 3, what="three failed attempts")
        row = only(node.factory)
        assert row.state is DeliveryState.PENDING
        assert row.last_error is not None and "cannot connect" in row.last_error
        scp = storescp(port=port)
        wait_for(lambda: only(node.factory).state is DeliveryState.SENT, what="delivery")
        sent_after = only(node.factory).attempts
        # Keep the loop running a few more rounds: nothing is sent again.
        time.sleep(0.3)
    assert only(node.factory).attempts == sent_after
    received = scp.received()
    assert [ds.SOPInstanceUID for ds in received] == [uid]


@needs_storescp
def test_association_rejected_fails_at_once_with_the_reason(
    node: Node, storescp: Callable[..., StoreSCP], caplog: pytest.LogCaptureFixture
) -> None:
    scp = storescp("--refuse")
    config = node.config(scp.port)
    sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    with caplog.at_level(logging.ERROR, logger="triage_node.sender"):
        assert sender.deliver_due(config, node.factory) == 1
    row = only(node.factory)
    assert (row.state, row.attempts) == (DeliveryState.FAILED, 1)
    assert row.last_error is not None and "rejected-permanent" in row.last_error
    assert any("delivery failed" in r.getMessage() and "rejected" in r.getMessage()
               for r in caplog.records)
    assert store.delivery_counts(node.factory)[DeliveryState.FAILED] == 1
    [event] = store.list_events(node.factory, kinds=[EventKind.RESULT_DELIVERY_FAILED])
    assert event.outcome == "failed" and "rejected" in event.detail
    assert sender.deliver_due(config, node.factory) == 0  # failed is final
    assert scp.received() == []


def test_max_attempts_then_failed(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    config = node.config(free_port(), max_attempts=3)
    sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    with caplog.at_level(logging.WARNING, logger="triage_node.sender"), \
            delivering(config, node.factory):
        wait_for(lambda: only(node.factory).state is DeliveryState.FAILED, what="failed")
    row = only(node.factory)
    assert row.attempts == 3
    assert row.last_error is not None
    assert row.last_error.startswith("gave up after 3 attempts: cannot connect")
    ours = [r for r in caplog.records if r.name == "triage_node.sender"]
    errors = [r for r in ours if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "delivery failed" in errors[0].getMessage()
    assert sum("retrying in" in r.getMessage() for r in ours) == 2


@needs_storescp
def test_outbox_survives_a_restart(node: Node, storescp: Callable[..., StoreSCP]) -> None:
    """A new engine, session factory and loop carry on where the first loop stopped."""
    port = free_port()
    config = node.config(port, max_attempts=1000)
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    with delivering(config, node.factory):
        wait_for(lambda: only(node.factory).attempts >= 2, what="two failed attempts")
    before = only(node.factory)
    assert before.state is DeliveryState.PENDING
    node.factory.kw["bind"].dispose()

    scp = storescp(port=port)
    engine = store.make_engine(node.database_url)
    try:
        factory = store.make_session_factory(engine)
        with delivering(config, factory):
            wait_for(lambda: only(factory).state is DeliveryState.SENT, what="delivery")
        assert only(factory).attempts == before.attempts + 1
    finally:
        engine.dispose()
    assert [ds.SOPInstanceUID for ds in scp.received()] == [uid]


@needs_storescp
def test_killed_sending_process_is_replaced(node: Node, storescp: Callable[..., StoreSCP],
                                            tmp_path: Path) -> None:
    """SIGKILL the process running the loop; a new process delivers the queued SR once."""
    port = free_port()
    config_file = tmp_path / "config.toml"
    config_file.write_text(textwrap.dedent(f"""
        data_dir = "{tmp_path / 'data'}"
        [storage]
        path = "{tmp_path / 'spool'}"
        [database]
        url = "{node.database_url}"
        [results]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.2
        timeout = 1.0
        poll_seconds = 0.05
        max_attempts = 1000
        [[destinations]]
        ae_title = "PACS"
        host = "127.0.0.1"
        port = {port}
    """))
    config = load_config(config_file, env={})
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    script = textwrap.dedent(f"""
        import threading
        from triage_node import sender, store
        from triage_node.config import load_config
        config = load_config({str(config_file)!r}, env={{}})
        factory = store.make_session_factory(store.make_engine(config.database.url))
        sender.run_delivery(config, factory, threading.Event(), lease_seconds=2.0)
    """)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    first = start()
    try:
        wait_for(lambda: only(node.factory).attempts >= 2, what="two failed attempts")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    scp = storescp(port=port)
    second = start()
    try:
        # The killed process may hold a claim: the row is due again after its 2 s lease.
        wait_for(lambda: only(node.factory).state is DeliveryState.SENT, timeout=60,
                 what="delivery by the second process")
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert [ds.SOPInstanceUID for ds in scp.received()] == [uid]


# --------------------------------------------------------------------------- queueing


def test_queueing_is_idempotent(node: Node) -> None:
    config = node.config(free_port(), free_port())
    first = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    again = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert first is not None and first == again
    rows = deliveries(node.factory)
    assert len(rows) == 2 and {r.sop_instance_uid for r in rows} == {first}
    document = store.latest_document(node.factory, node.study.series_uid)
    assert document is not None
    assert document.instance_number == 1 and document.supersedes_sop_instance_uid is None
    ds = dcmread(io.BytesIO(document.dataset))
    assert ds.SOPInstanceUID == first
    assert ds.ReferringPhysicianName == ""


def test_negative_not_sent_unless_configured(node: Node) -> None:
    node.store_result(0.2)
    config = node.config(free_port())
    assert sender.queue_results_for_delivery(node.factory, config, node.study.series_uid) is None
    assert deliveries(node.factory) == []
    config = node.config(free_port(), send_negative=True)
    assert sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert len(deliveries(node.factory)) == 1


def test_nothing_queued_without_destinations_or_result(node: Node) -> None:
    assert sender.queue_results_for_delivery(node.factory, node.config(),
                                             node.study.series_uid) is None
    assert sender.queue_results_for_delivery(node.factory, node.config(free_port()),
                                             "1.2.3.4") is None
    assert deliveries(node.factory) == []


@needs_storescp
def test_recomputed_result_supersedes_the_sent_sr(node: Node,
                                                  storescp: Callable[..., StoreSCP]) -> None:
    scp = storescp()
    config = node.config(scp.port)
    first = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    sender.deliver_due(config, node.factory)
    # Late slices: the series is classified again, now negative. The correction goes out
    # although send_negative is off, because the PACS has the first SR.
    node.store_result(0.3)
    second = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert second is not None and second != first
    sender.deliver_due(config, node.factory)
    assert [d.state for d in deliveries(node.factory)] == [DeliveryState.SENT] * 2
    old, new = sorted(scp.received(), key=lambda ds: int(ds.InstanceNumber))
    assert (old.SOPInstanceUID, new.SOPInstanceUID) == (first, second)
    assert new.SeriesInstanceUID == old.SeriesInstanceUID
    pre = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [p.ReferencedSOPInstanceUID for p in pre] == [first]
    document = store.latest_document(node.factory, node.study.series_uid)
    assert document is not None and document.supersedes_sop_instance_uid == first


def test_pending_sr_is_superseded_by_a_newer_one(node: Node) -> None:
    config = node.config(free_port())
    first = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    node.store_result(0.95)
    second = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    rows = deliveries(node.factory)
    assert [(r.sop_instance_uid, r.state) for r in rows] == [
        (first, DeliveryState.SUPERSEDED), (second, DeliveryState.PENDING)
    ]
    assert rows[0].last_error == f"superseded by {second}"


def test_removed_destination_fails_the_row(node: Node) -> None:
    sender.queue_results_for_delivery(node.factory, node.config(free_port()),
                                      node.study.series_uid)
    sender.deliver_due(node.config(free_port()), node.factory)
    row = only(node.factory)
    assert row.state is DeliveryState.FAILED
    assert row.last_error is not None and "no longer configured" in row.last_error


# --------------------------------------------------------------------------- fake peers


@dataclass
class FakeAssociation:
    """Stands in for a pynetdicom association (scu.StoreAssociation)."""

    statuses: list[int]
    stored: list[str]
    accepted_contexts: list[Any] = dataclasses.field(default_factory=list)
    rejected_contexts: list[Any] = dataclasses.field(default_factory=list)
    is_established: bool = True

    def send_c_store(self, dataset: Any, msg_id: int = 1) -> Dataset:
        ds = dcmread(dataset) if not isinstance(dataset, Dataset) else dataset
        self.stored.append(str(ds.SOPInstanceUID))
        status = Dataset()
        status.Status = self.statuses.pop(0)
        return status

    def release(self) -> None:
        self.is_established = False

    def abort(self) -> None:
        self.is_established = False


def test_retry_resends_the_same_sop_instance_uid(node: Node) -> None:
    """A peer out of resources (0xA700) then fine: two C-STOREs of the same instance."""
    from pynetdicom.presentation import PresentationContext

    stored: list[str] = []
    statuses = [0xA700, 0x0000]

    def associate(request: AssociationRequest) -> FakeAssociation:
        contexts = []
        for i, proposed in enumerate(request.contexts):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = proposed.abstract_syntax
            cx.transfer_syntax = [proposed.transfer_syntaxes[0]]
            contexts.append(cx)
        return FakeAssociation(statuses, stored, accepted_contexts=contexts)

    config = node.config(104)
    uid = sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    sender.deliver_due(config, node.factory, associate=associate)
    row = only(node.factory)
    assert row.state is DeliveryState.PENDING and row.last_error is not None
    assert "0xA700" in row.last_error
    wait_for(lambda: sender.deliver_due(config, node.factory, associate=associate) == 1,
             what="the retry to fall due")
    assert only(node.factory).state is DeliveryState.SENT
    assert stored == [uid, uid]


def test_permanent_error_from_the_factory_fails(node: Node) -> None:
    def associate(request: AssociationRequest) -> FakeAssociation:
        raise PermanentAssociationError(f"{request.peer} rejected the association (test)")

    config = node.config(104)
    sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    sender.deliver_due(config, node.factory, associate=associate)
    row = only(node.factory)
    assert row.state is DeliveryState.FAILED
    assert row.last_error == "PACS0@127.0.0.1:104 rejected the association (test)"


def test_two_senders_never_claim_the_same_row(node: Node) -> None:
    config = node.config(104)
    sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    now = utcnow()
    first = store.claim_due(node.factory, now=now, lease_seconds=60)
    second = store.claim_due(node.factory, now=now, lease_seconds=60)
    assert len(first) == 1 and second == []
    (delivery, data) = first[0]
    assert delivery.attempts == 1 and data[128:132] == b"DICM"
    # After the lease, the row is due again (its claimer died).
    later = store.claim_due(node.factory, now=now + dt.timedelta(seconds=61), lease_seconds=60)
    assert [d.attempts for d, _ in later] == [2]
    # The first claim no longer holds: its outcome is not recorded over the second's.
    assert not store.mark_retry(node.factory, delivery, error="late", at=now,
                                next_attempt_at=now)
    assert store.mark_failed(node.factory, later[0][0], error="x", at=now)


# --------------------------------------------------------------------------- policy, config


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for attempts, nominal in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (9, 100.0),
                              (200, 100.0)]:
        delays = [sender.backoff_delay(attempts, 10.0, 100.0, rng) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert len(set(delays)) > 100  # jittered
    with pytest.raises(ValueError, match="attempts"):
        sender.backoff_delay(0, 10.0, 100.0, rng)
    with pytest.raises(ValueError, match="base"):
        sender.backoff_delay(1, 0.0, 100.0, rng)


def test_results_config_defaults_and_example(tmp_path: Path) -> None:
    env = {"TRIAGE_NODE_DATA_DIR": str(tmp_path)}
    example = load_config(ROOT / "config.example.toml", env=env)
    assert example.results == load_config(None, env=env).results == ResultsConfig()
    text = (ROOT / "config.example.toml").read_text()
    assert "[results]" in text
    for name in ResultsConfig.__dataclass_fields__:
        assert f"{name} =" in text, f"ResultsConfig.{name} undocumented"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[results]\nsend_negative = "yes"', "results.send_negative = 'yes'"),
        ('[results]\nmax_attempts = 0', "results.max_attempts = 0"),
        ('[results]\ndisclaimer = " "', "results.disclaimer"),
        ('[results]\nbackoff_base_seconds = 10.0\nbackoff_max_seconds = 5.0',
         "results.backoff_max_seconds = 5.0: must be >= backoff_base_seconds"),
        ('[results]\ntimeout = 0', "results.timeout = 0"),
        ('[results]\nkey_images = true', "unknown key results.key_images"),
    ],
)
def test_results_config_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.toml", env={})
    assert message in str(info.value)


def test_destination_key_and_tls(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    config = build_config(
        {"destinations": [{"ae_title": "PACS", "host": "pacs", "port": 11112,
                           "tls": {"cert": str(cert), "key": str(key), "ca": str(cert)}}]},
        env={"TRIAGE_NODE_DATA_DIR": str(tmp_path)},
    )
    (dest,) = config.destinations
    assert sender.destination_key(dest) == "PACS@pacs:11112"
    ctx = sender.client_ssl_context(dest.tls)
    assert ctx is not None and ctx.check_hostname
    assert sender.client_ssl_context(dataclasses.replace(dest.tls, cert="", ca="")) is None


@needs_storescp
def test_delivered_over_tls_to_a_real_tls_peer(node: Node, storescp: Callable[..., StoreSCP],
                                               tls_files: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """dcmtk storescp with +tls, requiring and checking our client certificate: the SR
    arrives. A destination whose certificate we do not trust gets nothing (retried later;
    pynetdicom logs the verification error, the row says the handshake failed)."""
    cert, key = tls_files
    scp = storescp("+tls", str(key), str(cert), "+cf", str(cert), "--require-peer-cert")
    tls = {"cert": str(cert), "key": str(key), "ca": str(cert)}
    base = node.config(scp.port)
    config = dataclasses.replace(base, destinations=(dataclasses.replace(
        base.destinations[0], tls=build_config(
            {"destinations": [{"ae_title": "X", "host": "h", "port": 1, "tls": tls}]},
            env={"TRIAGE_NODE_DATA_DIR": str(tmp_path)}).destinations[0].tls),))
    assert sender.queue_results_for_delivery(node.factory, config, node.study.series_uid)
    assert sender.deliver_due(config, node.factory) == 1
    row = only(node.factory)
    assert row.state is DeliveryState.SENT, row.last_error
    (received,) = scp.received()
    assert received.SOPInstanceUID == row.sop_instance_uid

    # Another server certificate, not the one we trust: no TLS session, nothing sent.
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(other / "key.pem"), "-out", str(other / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    impostor = storescp("+tls", str(other / "key.pem"), str(other / "cert.pem"), "+cf",
                        str(cert), "--require-peer-cert")
    config2 = dataclasses.replace(config, destinations=(dataclasses.replace(
        config.destinations[0], port=impostor.port),))
    node.store_result(0.99)  # a recomputed result: a new SR, for the impostor only
    assert sender.queue_results_for_delivery(node.factory, config2, node.study.series_uid)
    sender.deliver_due(config2, node.factory)
    pending = [d for d in deliveries(node.factory) if d.destination.endswith(
        f":{impostor.port}")]
    assert [d.state for d in pending] == [DeliveryState.PENDING]
    assert "tls handshake failed" in (pending[0].last_error or "").lower(), pending[0].last_error
    assert impostor.received() == []
