"""Machinery shared by the fault scenarios: real processes, real peers, and the counts.

A scenario builds a :class:`Scenario` (phantom series, a model, a private Redis, a dcmtk
``storescp`` standing in for the PACS, the node's SCP and worker processes), breaks one
part while series flow through, lets the :class:`Scanner` re-send what was not
acknowledged - as a modality does - and then checks the invariants on :class:`Counts`:

- acknowledged == stored: the SOP Instance UIDs ``storescu`` saw answered *Success* are
  exactly the database rows whose spool file exists and holds the bytes that were sent;
- every complete series has one result covering all its slices (classified once,
  logically; the workers' ``classified: any=`` lines are counted and reported);
- every due result document (an outbox row not superseded: the SR, and the key-image SC
  that goes with it) was sent, and the PACS holds each one's SOP Instance UID exactly once
  and nothing else; the SR of each series' final result is among them.

Every wait polls with a deadline; the only sleeps shape the faults (an outage's length, a
scanner's pause between retries).
"""

from __future__ import annotations

import contextlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodeproc import DCMTK, DCMTK_ENV, free_port, wait_port, write_config
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.domain import DeliveryState, SeriesState
from triage_node.model import random_artifact
from triage_node.phantom import StudyTruth, generate_study
from triage_node.preprocess import PreprocessSpec
from triage_node.sender import SC_SOP_CLASS_UID, SR_SOP_CLASS_UID

Factory = sessionmaker[Session]

_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>[^)]*)\)")
#: Verbose (one line per response), and go on after a refused instance as a scanner does
#: (dcmtk's default is to stop the association at the first failure).
_STORESCU_ARGS = ("-v", "--no-halt", "-aet", "SCANNER", "-aec", "ICHTRIAGE", "127.0.0.1")
_CLASSIFIED = re.compile(r"series (?P<uid>[0-9.]+) classified: any=")


def make_model(directory: Path, size: int = 64, seed: int = 3) -> Path:
    """A random resnet18 artifact with a small input (fast on a CPU)."""
    spec = PreprocessSpec(size=size)
    path = directory / f"model{size}.tnm"
    random_artifact(path, architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=seed)
    return path


def make_series(directory: Path, count: int, *, n_slices: int, size: int,
                seed: int) -> list[StudyTruth]:
    """``count`` phantom head-CT series (one study each), seeds ``seed``, ``seed + 1``, ..."""
    return [generate_study(directory / f"s{i}", seed=seed + i, n_slices=n_slices, rows=size,
                           cols=size) for i in range(count)]


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set: the bytes after the preamble and the file meta group.

    The SCP writes its own file meta (implementation UID, source AE title), so "the bytes
    that were sent" are compared from the first element after group 0002.
    """
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2, value 4 -> meta ends 12 + value.
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, *,
             logs: Sequence[Path] = (), procs: Sequence[subprocess.Popen[bytes]] = (),
             interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; fail with the logs' tails on timeout or a dead process."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process {p.args!r} exited with {p.returncode} while "
                                     f"waiting for {what}:\n{_tails(logs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{_tails(logs)}")
        time.sleep(interval)


def _tails(logs: Iterable[Path], chars: int = 3000) -> str:
    """The end of each log, DEBUG lines left out."""
    out = []
    for path in logs:
        if path.exists():
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if " DEBUG " not in ln and "highdicom" not in ln]
            out.append(f"--- {path.name}\n" + "\n".join(lines)[-chars:])
    return "\n".join(out)


# -- the scanner --------------------------------------------------------------------------


@dataclass
class SendReport:
    """What one ``storescu`` run did, per file."""

    returncode: int
    statuses: dict[Path, str]  # file -> the Store Response status text (absent: no answer)
    output: str


@dataclass
class Scanner:
    """dcmtk ``storescu`` as a modality: sends files, re-sends the unacknowledged ones."""

    truths: Sequence[StudyTruth]
    log: Path
    acknowledged: set[str] = field(default_factory=set)  # SOP Instance UIDs
    attempts: int = 0  # C-STORE requests answered or not, retries included
    statuses: Counter[str] = field(default_factory=Counter)
    associations: int = 0

    def __post_init__(self) -> None:
        self.index(self.truths)

    def index(self, truths: Sequence[StudyTruth]) -> None:
        """Learn the files of ``truths`` (the series this scanner has to send)."""
        self.truths = truths
        self.uid_of = {s.path: s.sop_uid for t in truths for s in t.slices}

    @property
    def sent(self) -> set[str]:
        """Every SOP Instance UID the scanner has (it sends all of them)."""
        return set(self.uid_of.values())

    def files(self, truth: StudyTruth) -> list[Path]:
        """The files of one series, in slice order."""
        return [s.path for s in truth.slices]

    def send(self, port: int, files: Sequence[Path]) -> SendReport:
        """One association carrying ``files``; records each file's response status."""
        proc = subprocess.Popen(
            [str(DCMTK / "storescu"), *_STORESCU_ARGS, str(port), *map(str, files)],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self._collect(proc)

    def send_async(self, port: int, files: Sequence[Path]) -> Callable[[], SendReport]:
        """Start an association in the background; call the result to wait for it."""
        proc = subprocess.Popen(
            [str(DCMTK / "storescu"), *_STORESCU_ARGS, str(port), *map(str, files)],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        box: list[SendReport] = []
        thread = threading.Thread(target=lambda: box.append(self._collect(proc)), daemon=True)
        thread.start()

        def join() -> SendReport:
            """Wait for the association to end; its report."""
            thread.join(600)
            return box[0]
        return join

    def _collect(self, proc: subprocess.Popen[str]) -> SendReport:
        out, _ = proc.communicate(timeout=600)
        statuses: dict[Path, str] = {}
        current: Path | None = None
        for line in out.splitlines():
            if m := _SENDING.match(line):
                current = Path(m["path"])
            elif (m := _RESPONSE.match(line)) and current is not None:
                statuses[current] = m["status"]
                current = None
        with self.log.open("a") as fh:
            fh.write(out)
        self.associations += 1
        self.attempts += len(statuses) + (current is not None)
        for path, status in statuses.items():
            self.statuses[status] += 1
            if status == "Success":
                self.acknowledged.add(self.uid_of[path])
        if current is not None:
            self.statuses["no response"] += 1
        return SendReport(proc.returncode, statuses, out)

    def unacknowledged(self, files: Iterable[Path]) -> list[Path]:
        """Those of ``files`` never answered *Success*."""
        return [f for f in files if self.uid_of[f] not in self.acknowledged]

    def send_until_acknowledged(self, port: Callable[[], int], files: Sequence[Path], *,
                                timeout: float, pause: float = 1.0) -> None:
        """Re-send what is unacknowledged (a scanner's retry), pausing between attempts."""
        deadline = time.monotonic() + timeout
        while todo := self.unacknowledged(files):
            assert time.monotonic() < deadline, (
                f"{len(todo)} instances still unacknowledged after {timeout} s; statuses "
                f"{dict(self.statuses)}\n{_tails([self.log])}")
            self.send(port(), todo)
            if self.unacknowledged(todo):
                time.sleep(pause)


# -- peers ----------------------------------------------------------------------------------


class Pacs:
    """dcmtk ``storescp`` with unique file names, so a second copy of an SR shows up."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = directory.parent / "pacs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start listening (again) on :attr:`port`."""
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [str(DCMTK / "storescp"), "+uf", "--aetitle", "PACS", "--output-directory",
                 str(self.dir), str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        """Stop listening."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def received(self, sop_class_uid: str | None = None) -> Counter[str]:
        """SOP Instance UID -> copies received (of one SOP class when given)."""
        found: Counter[str] = Counter()
        for path in self.dir.iterdir():
            if path.is_file():
                ds = dcmread(path, stop_before_pixels=True)
                if sop_class_uid is None or ds.SOPClassUID == sop_class_uid:
                    found[str(ds.SOPInstanceUID)] += 1
        return found


class RedisServer:
    """A private ``redis-server`` (append-only file, so queued tasks survive a restart)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL for the node's config."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on :attr:`port` with the same data directory."""
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
                stdout=fh, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        """SIGTERM (redis flushes its append-only file) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


class TcpProxy:
    """A TCP forwarder in a thread; :meth:`cut` drops every connection and refuses new ones
    until :meth:`restore` - a database outage as the node sees it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.refused = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                self.refused += 1
                _hard_close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.5):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            _hard_close(a)
            _hard_close(b)

    def cut(self) -> None:
        """Start the outage: reset every open connection, refuse new ones."""
        self._up.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _hard_close(a)
            _hard_close(b)

    def restore(self) -> None:
        """End the outage: forward new connections again."""
        self._up.set()

    def close(self) -> None:
        """Stop forwarding and listening."""
        self._stop.set()
        self.cut()
        self.listener.close()
        self._thread.join(5)


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed server or a cut cable looks."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


# -- the node -------------------------------------------------------------------------------


class Node:
    """The node's SCP (``triage-node scp``) and worker processes on one config and port."""

    def __init__(self, root: Path, *, database_url: str, spool: Path, extra: str,
                 min_free_mb: int = 0) -> None:
        self.root = root
        self.port = free_port()
        self.spool = spool
        self.database_url = database_url
        self.config = write_config(root / "node.toml", port=self.port, spool=spool,
                                   database_url=database_url, extra=extra,
                                   min_free_mb=min_free_mb)
        self.scp: subprocess.Popen[bytes] | None = None
        self.scp_log = root / "scp.log"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []

    @property
    def logs(self) -> list[Path]:
        """Every log the node's processes wrote."""
        return [self.scp_log, *self.worker_logs]

    def start_scp(self) -> None:
        """Start ``triage-node scp`` on the node's port; return once it listens."""
        with self.scp_log.open("ab") as fh:
            self.scp = subprocess.Popen(
                [sys.executable, "-m", "triage_node.cli", "scp", "--config", str(self.config)],
                stdout=fh, stderr=subprocess.STDOUT)
        wait_port(self.port, self.scp, timeout=60)

    def kill_scp(self) -> None:
        """SIGKILL the SCP (no shutdown, no cleanup)."""
        assert self.scp is not None
        self.scp.send_signal(signal.SIGKILL)
        self.scp.wait(30)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start another ``triage-node worker`` (assembler, delivery loop, Celery)."""
        log = self.root / f"worker{len(self.workers) + 1}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "triage_node.cli", "worker", "--config",
                 str(self.config)], stdout=fh, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        self.worker_logs.append(log)
        return proc

    def wait_worker_ready(self, timeout: float = 180) -> None:
        """Poll the newest worker's log until its Celery consumer is ready."""
        log, proc = self.worker_logs[-1], self.workers[-1]
        wait_for(lambda: "celery.apps.worker" in log.read_text(errors="replace")
                 and " ready." in log.read_text(errors="replace"),
                 "worker ready", timeout, logs=[log], procs=[proc], interval=0.2)

    def live(self) -> list[subprocess.Popen[bytes]]:
        """The processes that should be running now."""
        procs = [w for w in self.workers if w.returncode is None]
        return [self.scp, *procs] if self.scp is not None else procs

    def stop(self) -> None:
        """SIGTERM everything still running and wait (SIGKILL after a minute)."""
        procs = [p for p in [self.scp, *self.workers] if p is not None and p.poll() is None]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def classified_logged(self) -> Counter[str]:
        """Series Instance UID -> ``classified: any=`` lines in all worker logs."""
        found: Counter[str] = Counter()
        for log in self.worker_logs:
            found.update(m["uid"] for m in _CLASSIFIED.finditer(log.read_text(errors="replace")))
        return found


# -- counting -------------------------------------------------------------------------------


@dataclass
class Counts:
    """One scenario's tally (see the module docstring for the invariants)."""

    scenario: str
    series_sent: int = 0
    instances_sent: int = 0
    store_requests: int = 0
    acknowledged: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    db_rows: int = 0
    stored: int = 0  # rows whose spool file exists and is byte-equal to what was sent
    series_complete: int = 0
    series_classified: int = 0  # one result covering every slice, state done
    classified_logged: int = 0
    docs_due: int = 0  # outbox rows (SR and key-image SC) not superseded
    docs_sent: int = 0
    docs_superseded: int = 0
    srs_at_pacs: int = 0  # distinct SOP Instance UIDs received
    scs_at_pacs: int = 0
    files_at_pacs: int = 0  # copies: more than the distinct UIDs means a duplicate
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The counts as an aligned two-column table."""
        rows = [
            ("series sent", self.series_sent),
            ("instances sent", self.instances_sent),
            ("C-STORE requests (retries incl.)", self.store_requests),
            ("acknowledged (Success)", self.acknowledged),
            ("refusals / no response", ", ".join(f"{k}: {v}" for k, v in
                                                 sorted(self.refusals.items())) or "-"),
            ("database rows", self.db_rows),
            ("stored (file byte-equal)", self.stored),
            ("series complete", self.series_complete),
            ("series classified (1 result, all slices)", self.series_classified),
            ("'classified: any=' log lines", self.classified_logged),
            ("SR + SC due (outbox, not superseded)", self.docs_due),
            ("SR + SC sent (outbox)", self.docs_sent),
            ("SR + SC superseded before sending", self.docs_superseded),
            ("SRs at PACS (distinct UIDs)", self.srs_at_pacs),
            ("key-image SCs at PACS (distinct UIDs)", self.scs_at_pacs),
            ("files at PACS (copies)", self.files_at_pacs),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"== {self.scenario}", *(f"  {k:<{width}}  {v}" for k, v in rows)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def stored_instances(factory: Factory, spool: Path, scanner: Scanner) -> tuple[int, set[str]]:
    """(database rows, SOP UIDs of rows whose spool file is byte-equal to the sent file)."""
    sent = {s.sop_uid: s.path for t in scanner.truths for s in t.slices}
    rows = 0
    good: set[str] = set()
    for summary in store.list_series(factory):
        for record in store.series_instances(factory, summary.series_instance_uid):
            rows += 1
            path = spool / record.file_path
            source = sent.get(record.sop_instance_uid)
            if source is not None and path.is_file() and \
                    dataset_bytes(path) == dataset_bytes(source):
                good.add(record.sop_instance_uid)
    return rows, good


def settled(factory: Factory, truths: Sequence[StudyTruth], *, with_sr: bool,
            key_image: bool = True) -> bool:
    """Every series classified over all its slices and (``with_sr``) its documents - the SR
    and, with ``key_image``, the key-image SC - made from the final result and none pending.
    """
    for truth in truths:
        result = store.get_result(factory, truth.series_uid)
        if result is None or len(result.slices) != len(truth.slices):
            return False
        [summary] = [s for s in store.list_series(factory)
                     if s.series_instance_uid == truth.series_uid]
        if summary.state is not SeriesState.DONE:
            return False
        if with_sr:
            for sop_class in (SR_SOP_CLASS_UID, SC_SOP_CLASS_UID)[:1 + key_image]:
                doc = store.latest_document(factory, truth.series_uid, sop_class)
                if doc is None or doc.result_stored_at != result.stored_at:
                    return False
            rows = store.list_deliveries(factory, series_instance_uid=truth.series_uid)
            if any(r.state is DeliveryState.PENDING for r in rows):
                return False
    return True


def count(scenario: str, factory: Factory, node: Node, scanner: Scanner,
          pacs: Pacs | None) -> Counts:
    """Tally everything once the scenario has settled."""
    truths = scanner.truths
    c = Counts(scenario, series_sent=len(truths), instances_sent=len(scanner.sent),
               store_requests=scanner.attempts, acknowledged=len(scanner.acknowledged),
               refusals={k: v for k, v in scanner.statuses.items() if k != "Success"})
    c.db_rows, good = stored_instances(factory, node.spool, scanner)
    c.stored = len(good)
    logged = node.classified_logged()
    for truth in truths:
        uids = {s.sop_uid for s in truth.slices}
        if uids <= good:
            c.series_complete += 1
        result = store.get_result(factory, truth.series_uid)
        if result is not None and {u for u, _, _ in result.slices} == uids:
            c.series_classified += 1
        c.classified_logged += logged[truth.series_uid]
    deliveries = store.list_deliveries(factory)
    c.docs_due = sum(d.state is not DeliveryState.SUPERSEDED for d in deliveries)
    c.docs_sent = sum(d.state is DeliveryState.SENT for d in deliveries)
    c.docs_superseded = sum(d.state is DeliveryState.SUPERSEDED for d in deliveries)
    if pacs is not None:
        c.srs_at_pacs = len(pacs.received(SR_SOP_CLASS_UID))
        c.scs_at_pacs = len(pacs.received(SC_SOP_CLASS_UID))
        c.files_at_pacs = sum(pacs.received().values())
    return c


def check_invariants(counts: Counts, factory: Factory, node: Node, scanner: Scanner,
                     pacs: Pacs | None) -> None:
    """The suite's promises; fails naming the first one broken."""
    _, good = stored_instances(factory, node.spool, scanner)
    assert scanner.acknowledged == good, (
        f"acknowledged but not stored: {len(scanner.acknowledged - good)}, "
        f"stored but never acknowledged: {len(good - scanner.acknowledged)}")
    assert counts.db_rows == counts.stored, "database rows whose file is missing or differs"
    assert counts.acknowledged == counts.instances_sent, "the scanner gave up on some instances"
    assert counts.series_complete == counts.series_sent
    assert counts.series_classified == counts.series_sent, "a complete series lacks its result"
    logged = node.classified_logged()
    for truth in scanner.truths:
        assert logged[truth.series_uid] >= 1, f"no worker logged classifying {truth.series_uid}"
    if pacs is None:
        return
    deliveries = store.list_deliveries(factory)
    due = [d for d in deliveries if d.state is not DeliveryState.SUPERSEDED]
    assert all(d.state is DeliveryState.SENT for d in due), [
        (d.state, d.last_error) for d in due if d.state is not DeliveryState.SENT]
    received = pacs.received()
    assert received == Counter({d.sop_instance_uid: 1 for d in due}), (
        f"PACS holds {dict(received)}, due {[d.sop_instance_uid for d in due]}")
    srs = pacs.received(SR_SOP_CLASS_UID)
    for truth in scanner.truths:
        final = store.latest_document(factory, truth.series_uid, SR_SOP_CLASS_UID)
        assert final is not None and srs[final.sop_instance_uid] == 1, \
            f"the SR of {truth.series_uid}'s final result is not at the PACS once"


def report(counts: Counts, tmp_path: Path) -> None:
    """Print the table (``pytest -s``) and keep it beside the test's files."""
    text = counts.table()
    print("\n" + text)
    (tmp_path / "counts.txt").write_text(text + "\n")


def node_extra(*, broker_url: str, model: Path, pacs_port: int | None,
               results: str = "", triage: str = "", queue: str = "") -> str:
    """The config tables a scenario node gets (after ``[dicom]``)."""
    text = (f'[queue]\nbroker_url = "{broker_url}"\nvisibility_timeout = 20\neager_batch = 8\n'
            f"{queue}"
            f'[model]\npath = "{model}"\ndevice = "cpu"\n'
            f"[triage]\nrelease_settle_seconds = 1.0\nstable_seconds = 20\n{triage}"
            "[results]\nsend_negative = true\npoll_seconds = 0.2\nbackoff_base_seconds = 0.5\n"
            f"backoff_max_seconds = 4\nmax_attempts = 1000\ntimeout = 5\n{results}")
    if pacs_port is not None:
        text += f'[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    return text


@contextlib.contextmanager
def scenario(tmp_path: Path, model: Path, *, name: str, n_series: int, n_slices: int,
             size: int = 64, seed: int, database_url: str | None = None,
             observer_url: str | None = None, spool: Path | None = None,
             pacs_running: bool = True, extra_triage: str = "") -> Iterator[Scenario]:
    """Start one scenario's processes (Redis, PACS, SCP, a worker), then write its phantom
    series while the worker loads torch; stop everything afterwards.

    ``database_url`` is what the node uses (default: SQLite in ``tmp_path``);
    ``observer_url`` what the test reads through (default: the same).
    """
    sc = Scenario(tmp_path, model, name=name, database_url=database_url,
                  observer_url=observer_url, spool=spool, extra_triage=extra_triage)
    try:
        if pacs_running:
            sc.pacs.start()
        sc.node.start_scp()
        sc.node.start_worker()
        sc.add_series(n_series, n_slices=n_slices, size=size, seed=seed)
        sc.node.wait_worker_ready()
        yield sc
    finally:
        sc.close()


class Scenario:
    """Everything one fault scenario runs: see :func:`scenario`."""

    def __init__(self, tmp_path: Path, model: Path, *, name: str, database_url: str | None,
                 observer_url: str | None, spool: Path | None,
                 extra_triage: str = "") -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.truths: list[StudyTruth] = []
        self.notes: list[str] = []
        self.scanner = Scanner(self.truths, tmp_path / "storescu.log")
        self.redis = RedisServer(tmp_path / "redis")
        self.redis.start()
        self.pacs = Pacs(tmp_path / "pacs" / "in")
        database_url = database_url or f"sqlite:///{tmp_path / 'node.db'}"
        self.node = Node(tmp_path, database_url=database_url,
                         spool=spool or tmp_path / "spool",
                         extra=node_extra(broker_url=self.redis.url, model=model,
                                          pacs_port=self.pacs.port, triage=extra_triage))
        self._engine = store.make_engine(observer_url or database_url)
        self.factory: Factory = store.make_session_factory(self._engine)

    def add_series(self, count: int, *, n_slices: int, size: int, seed: int) -> None:
        """Write ``count`` phantom series for the scanner to send."""
        self.truths += make_series(self.tmp_path / "phantoms", count, n_slices=n_slices,
                                   size=size, seed=seed)
        self.scanner.index(self.truths)

    def files(self, index: int) -> list[Path]:
        """The files of series ``index``."""
        return self.scanner.files(self.truths[index])

    def assert_acknowledged_are_stored(self) -> None:
        """Every acknowledged instance is stored, at any moment (also in a fault).

        Mid-fault only this direction holds: an instance recorded just before the SCP died
        was never acknowledged; the scanner's re-send acknowledges it (see :meth:`finish`).
        """
        _, good = stored_instances(self.factory, self.node.spool, self.scanner)
        lost = self.scanner.acknowledged - good
        assert not lost, f"{len(lost)} acknowledged instances not stored: {sorted(lost)[:3]}"

    def series_state(self, index: int) -> SeriesState | None:
        """State of series ``index`` in the database (None before its first slice)."""
        uid = self.truths[index].series_uid
        return next((s.state for s in store.list_series(self.factory)
                     if s.series_instance_uid == uid), None)

    def wait_settled(self, timeout: float) -> None:
        """Wait until every series has its final result and SR; print the table if not."""
        try:
            wait_for(lambda: settled(self.factory, self.truths, with_sr=True),
                     "settled series", timeout, logs=self.node.logs, procs=self.node.live(),
                     interval=0.25)
        except AssertionError:
            self.report()
            raise
        # A duplicate SR would arrive right after the first; give the loop a few rounds.
        time.sleep(1.0)

    def report(self) -> Counts:
        """Count, print and keep the table (also when the scenario failed to settle)."""
        counts = count(self.name, self.factory, self.node, self.scanner, self.pacs)
        counts.notes += self.notes
        report(counts, self.tmp_path)
        return counts

    def finish(self) -> Counts:
        """Count, print, keep the table, and check every invariant."""
        counts = self.report()
        check_invariants(counts, self.factory, self.node, self.scanner, self.pacs)
        return counts

    def close(self) -> None:
        """Stop every process and release the database."""
        self.node.stop()
        self.pacs.stop()
        self.redis.stop()
        self._engine.dispose()
