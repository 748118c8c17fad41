"""`triage-node demo`: the whole node in one minute, on embedded defaults.

Starts ``triage-node serve`` (SCP, worker, API; SQLite, the embedded broker, the packaged
demo model) in a fresh data directory with a small built-in PACS (a pynetdicom Storage SCP
in this process) as its one destination; writes a handful of phantom head-CT studies, some
with bleeds; sends each over DICOM; waits for the results and the SR at the PACS; prints
the worklist with probabilities, time to result and time to notification, and the URL of
the page; then stops everything (or, with ``--keep-running``, leaves the node up until
Ctrl-C). Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from triage_node import store
from triage_node.config import packaged_model_path
from triage_node.phantom import StudyTruth, generate_study
from triage_node.scu import send

__all__ = ["run_demo"]

PACS_AE = "DEMOPACS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode} while starting")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the node did not listen on {port} within {timeout:.0f} s")


@dataclass
class _Pacs:
    """A tiny Storage SCP standing in for the PACS: remembers when each SR arrived."""

    port: int
    arrived: dict[str, float] = field(default_factory=dict)  # source series UID -> time
    server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        def on_store(event: Any) -> int:
            ds = event.dataset
            if str(ds.get("Modality", "")) == "SR":
                for ev in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
                    for series in ev.get("ReferencedSeriesSequence", []):
                        self.arrived.setdefault(str(series.SeriesInstanceUID),
                                                time.monotonic())
            return 0x0000

        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def _config(work: Path, port: int, api_port: int, pacs_port: int) -> Path:
    path = work / "config.toml"
    path.write_text(f"""# written by `triage-node demo`
data_dir = "{work / 'data'}"
[dicom]
host = "127.0.0.1"
port = {port}
[storage]
min_free_mb = 0
[triage]
release_settle_seconds = 1.0
[results]
send_negative = true
poll_seconds = 0.5
[api]
host = "127.0.0.1"
port = {api_port}
[logging]
level = "WARNING"
[[destinations]]
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {pacs_port}
""")
    return path


def run_demo(*, studies: int = 4, slices: int = 24, keep_running: bool = False,
             workdir: Path | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo (see the module docstring); returns the process exit code."""
    logging.getLogger("triage_node").setLevel(logging.WARNING)  # the demo prints its own
    if packaged_model_path() is None:
        print("triage-node demo: the packaged demo model is missing from this installation",
              file=sys.stderr)
        return 1
    work = workdir or Path(tempfile.mkdtemp(prefix="triage-node-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    port, api_port, pacs_port = _free_port(), _free_port(), _free_port()
    config = _config(work, port, api_port, pacs_port)
    pacs = _Pacs(pacs_port)
    pacs.start()
    print(f"demo: data in {work}", file=out)
    print(f"demo: writing {studies} phantom head-CT studies of {slices} slices", file=out)
    truths: list[StudyTruth] = [
        generate_study(work / "studies" / str(i), seed=1000 + i, n_slices=slices,
                       positive=(i % 2 == 0)) for i in range(studies)]
    log = (work / "node.log").open("wb")
    env = {**os.environ, "TRIAGE_NODE_CONFIG": str(config)}
    env.pop("TRIAGE_NODE_DATA_DIR", None)
    node = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "serve", "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        print(f"demo: starting `triage-node serve` (DICOM {port}, worklist {api_port})",
              file=out, flush=True)
        _wait_port(port, node, 120)
        _wait_port(api_port, node, 120)
        released: dict[str, float] = {}
        for truth in truths:
            report = send([s.path for s in truth.slices], "127.0.0.1", port,
                          called_ae="ICHTRIAGE", calling_ae="DEMO-CT")
            released[truth.series_uid] = time.monotonic()
            if not report.ok:
                raise RuntimeError(f"sending {truth.patient_id} failed: {report.failed[:1]}")
            print(f"demo: sent {truth.patient_id} ({len(truth.slices)} slices, "
                  f"{'bleed' if truth.positive else 'no bleed'})", file=out, flush=True)
        engine = store.make_engine(f"sqlite:///{work / 'data' / 'triage-node.db'}")
        factory = store.make_session_factory(engine)
        deadline = time.monotonic() + 300
        while not all(t.series_uid in pacs.arrived for t in truths):
            if node.poll() is not None:
                raise RuntimeError(f"the node exited with {node.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError("no result for every study within 300 s; see " + log.name)
            time.sleep(0.1)
        results = {t.series_uid: store.get_result(factory, t.series_uid) for t in truths}
        engine.dispose()
        _print_worklist(truths, results, released, pacs.arrived, out)
        print(f"\nworklist page: http://127.0.0.1:{api_port}/   (log: {log.name})", file=out)
        if keep_running:
            print("the node keeps running; Ctrl-C stops it", file=out, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                node.wait()
        return 0
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        log.close()
        pacs.stop()


def _print_worklist(truths: list[StudyTruth], results: dict[str, Any],
                    released: dict[str, float], arrived: dict[str, float],
                    out: TextIO) -> None:
    rows = []
    for t in truths:
        r = results[t.series_uid]
        rows.append((r.flagged, r.probabilities["any"], t, r))
    rows.sort(key=lambda x: (not x[0], -x[1]))  # the worklist's order: flagged first
    print("\nworklist (flagged first; phantom truth for comparison)", file=out)
    head = (f"{'patient':<14} {'flag':<5} {'any':>5} {'epi':>5} {'ipa':>5} {'ivh':>5} "
            f"{'sah':>5} {'sdh':>5}  {'truth':<8} {'result s':>8} {'notified s':>10}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for flagged, _, t, r in rows:
        p = r.probabilities
        to_result = r.stored_at.timestamp() - _wall(released[t.series_uid])
        notified = arrived[t.series_uid] - released[t.series_uid]
        print(f"{t.patient_id:<14} {'YES' if flagged else '-':<5} {p['any']:5.2f} "
              f"{p['epidural']:5.2f} {p['intraparenchymal']:5.2f} {p['intraventricular']:5.2f} "
              f"{p['subarachnoid']:5.2f} {p['subdural']:5.2f}  "
              f"{'bleed' if t.positive else 'none':<8} {to_result:8.1f} {notified:10.1f}",
              file=out)


def _wall(monotonic: float) -> float:
    """A ``time.monotonic()`` instant as a Unix time."""
    return dt.datetime.now(dt.UTC).timestamp() - (time.monotonic() - monotonic)

