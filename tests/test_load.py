"""Load: 8 concurrent associations, each a 300-slice series, into one SCP (real processes).

Reports throughput and the SCP's peak resident memory; asserts every slice stored and that
no SCP process loaded torch. Marked ``load`` so it can be deselected (``-m "not load"``);
it runs by default.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from markers import needs_dcmtk
from nodeproc import DCMTK, DCMTK_ENV, running_node

from triage_node import store
from triage_node.phantom import StudyTruth, generate_study

pytestmark = [
    needs_dcmtk,
    pytest.mark.load,
]

ASSOCIATIONS = 8
SLICES = 300
MATRIX = 128  # ~34 KB a slice: 2400 slices, ~80 MB


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


def _status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _loads_torch(pid: int) -> bool:
    """Whether torch's shared libraries are mapped into the process."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libtorch" in maps or "/site-packages/torch/" in maps


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return "?"


def test_eight_concurrent_associations_of_300_slices(tmp_path: Path) -> None:
    truths: list[StudyTruth] = [
        generate_study(tmp_path / f"s{i}", seed=700 + i, n_slices=SLICES, rows=MATRIX,
                       cols=MATRIX)
        for i in range(ASSOCIATIONS)
    ]
    megabytes = sum(s.path.stat().st_size for t in truths for s in t.slices) / 1e6
    with running_node(tmp_path, processes=2) as node:
        logs = [tmp_path / f"storescu{i}.log" for i in range(ASSOCIATIONS)]
        start = time.monotonic()
        senders: list[subprocess.Popen[bytes]] = []
        for truth, log in zip(truths, logs, strict=True):
            with log.open("w") as fh:
                senders.append(subprocess.Popen(
                    [str(DCMTK / "storescu"), "-v", "-aet", f"LOAD{len(senders)}", "-aec",
                     "ICHTRIAGE", "127.0.0.1", str(node.port),
                     *(str(s.path) for s in truth.slices)],
                    env=DCMTK_ENV, stdout=fh, stderr=subprocess.STDOUT))
        for proc in senders:
            proc.wait(600)
        elapsed = time.monotonic() - start
        pids = _descendants(node.proc.pid)
        peaks = {pid: _status(pid, "VmHWM") for pid in pids}
        names = {pid: _cmdline(pid) for pid in pids}
        torch = [names[pid] for pid in pids if _loads_torch(pid)]
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        counts = {t.series_uid: store.count_instances(factory, t.series_uid) for t in truths}
        missing = [r.file_path for t in truths
                   for r in store.series_instances(factory, t.series_uid)
                   if not (node.spool / r.file_path).is_file()
                   or (node.spool / r.file_path).stat().st_size != r.file_size]
        engine.dispose()
        assert node.stop() == 0

    acknowledged = [log.read_text().count("Received Store Response (Success)") for log in logs]
    total = ASSOCIATIONS * SLICES
    lines = [
        f"load: {ASSOCIATIONS} concurrent associations x {SLICES} slices ({MATRIX}x{MATRIX}), "
        f"{megabytes:.0f} MB, 2 receiving processes",
        f"  {total} slices in {elapsed:.1f} s: {total / elapsed:.0f} slices/s, "
        f"{megabytes / elapsed:.1f} MB/s",
        f"  SCP peak RSS (VmHWM): {max(peaks.values()) / 1024:.0f} MiB in one process, "
        f"{sum(peaks.values()) / 1024:.0f} MiB summed over {len(peaks)} processes",
        *(f"    pid {pid} {names[pid]}: {kib / 1024:.0f} MiB" for pid, kib in peaks.items()),
    ]
    print("\n" + "\n".join(lines))
    (tmp_path / "load.txt").write_text("\n".join(lines) + "\n")
    assert all(p.returncode == 0 for p in senders), [p.returncode for p in senders]
    assert acknowledged == [SLICES] * ASSOCIATIONS, acknowledged
    assert sorted(counts.values()) == [SLICES] * ASSOCIATIONS, counts
    assert missing == []
    assert torch == [], f"SCP processes with torch loaded: {torch}"
