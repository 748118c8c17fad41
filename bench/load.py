#!/usr/bin/env python3
"""Load: 8 concurrent associations, each a 300-slice 512x512 series, into `triage-node scp`.

Usage::

    .venv/bin/python bench/load.py [--associations 8] [--slices 300]

Starts ``triage-node scp`` (default settings: fsync on, SQLite, one receiving process per
core), sends ``--associations`` distinct series at once with dcmtk ``storescu``
(``TCP_NODELAY=1``), then prints: slices stored (counted in the database, files checked
on disk), wall time and slices/s, the peak RSS (``VmHWM``) of every SCP process, and
whether any SCP process mapped libtorch. Stops by itself; loopback only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dicomfiles import make_ct_series  # noqa: E402
from nodeproc import DCMTK_ENV, free_port, wait_listening, write_config  # noqa: E402

from triage_node import store  # noqa: E402


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="triage-load-"))
    t = time.perf_counter()
    groups = [make_ct_series(work / f"in{i}", args.slices, seed=100 + i,
                             patient_id=f"LOAD-{i}") for i in range(args.associations)]
    print(f"generated {args.associations} x {args.slices} slices in "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    port = free_port()
    db = f"sqlite:///{work / 'node.db'}"
    cfg = write_config(work / "config.toml", port=port, spool=work / "spool", database_url=db,
                       processes=os.cpu_count() or 1)
    cfg.write_text(cfg.read_text().replace('level = "DEBUG"', 'level = "INFO"'))
    with (work / "scp.log").open("wb") as log:
        scp = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "scp", "--config",
                                str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(work / "scp.log", scp)  # every receiving process listens
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["/usr/bin/storescu", "-aec", "ICHTRIAGE", "127.0.0.1",
                                   str(port), *map(str, g)], env=DCMTK_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for g in groups]
        errors = [p.communicate(timeout=1800)[1] for p in procs]
        seconds = time.perf_counter() - t0
        failed = [e[-500:] for p, e in zip(procs, errors, strict=True) if p.returncode]
        pids = _tree(scp.pid)
        peaks = {pid: _status(pid, "VmHWM") for pid in pids}
        torch = [pid for pid in pids if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]
    finally:
        scp.terminate()
        scp.wait(120)
    engine = store.make_engine(db)
    factory = store.make_session_factory(engine)
    stored = store.count_instances(factory)
    on_disk = sum(1 for _ in (work / "spool").rglob("*.dcm"))
    engine.dispose()
    total = args.associations * args.slices
    print(f"\nload, {args.associations} concurrent associations x {args.slices} slices "
          f"(512x512 int16), fsync on, SQLite, {os.cpu_count()} cores")
    print(f"command: python {' '.join(sys.argv)}")
    print("measure                              | value")
    print("-------------------------------------|------")
    print(f"slices sent / stored (db) / on disk  | {total} / {stored} / {on_disk}")
    print(f"storescu failures                    | {len(failed)}")
    print(f"wall time (s)                        | {seconds:.1f}")
    print(f"throughput (slices/s)                | {total / seconds:.0f}")
    print(f"SCP peak RSS, largest process (MiB)  | {max(peaks.values()) / 1024:.0f}")
    print(f"SCP peak RSS, all {len(peaks)} processes (MiB)  | "
          f"{sum(peaks.values()) / 1024:.0f}")
    print(f"SCP processes with libtorch mapped   | {len(torch)}")
    for e in failed:
        print(f"storescu error: {e}", file=sys.stderr)
    return 0 if stored == total == on_disk and not failed and not torch else 1


if __name__ == "__main__":
    sys.exit(main())
