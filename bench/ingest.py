#!/usr/bin/env python3
"""Ingest throughput: our Storage SCP vs dcmtk storescp, side by side, alternating.

Usage::

    .venv/bin/python bench/ingest.py [--slices 300] [--rounds 3] [--concurrent 8 --per-assoc 60]
                                     [--engine native|pynetdicom]

Both receivers get the same files from dcmtk ``storescu`` (``TCP_NODELAY=1``) on loopback:

1. one association carrying a ``--slices``-slice 512x512 int16 series, ``--rounds`` times,
   alternating ours / dcmtk ``storescp``;
2. ``--concurrent`` simultaneous associations of ``--per-assoc`` slices each, against ours
   and against ``storescp --fork``.

Ours runs with fsync on (the default: a slice is acknowledged only once on disk and
recorded in SQLite); dcmtk storescp writes without fsync. Before each timed run the page
cache is written back (``sync``), so no run pays for the previous one's unwritten files.

3. the disk work our SCP does for each slice before it answers, alone (no network, no
   parsing, no Python threads): the spool's file create + write, ``fsync``, rename, folder
   ``fsync``, and a one-row SQLite commit with the node's settings (WAL, synchronous=FULL).
   With dcmtk's per-slice time from (1) it bounds what any receiver that keeps this
   protocol, one association, could reach on this disk at this moment.

Prints a table; stops by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nodeproc  # noqa: E402
from dicomfiles import make_ct_series  # noqa: E402
from nodeproc import (  # noqa: E402
    DCMTK_ENV,
    free_port,
    wait_listening,
    wait_port,
    write_config,
)

from triage_node.spool import Spool  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def _settle() -> None:
    """Write back whatever the previous run left in the page cache (dcmtk storescp does
    not fsync), so that it is not written during the next, timed, run."""
    os.sync()


def _send(port: int, files: list[Path], called: str) -> float:
    _settle()
    t0 = time.perf_counter()
    out = subprocess.run([STORESCU, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                         env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stderr[-1000:]}")
    return dt


def _send_parallel(port: int, groups: list[list[Path]], called: str) -> float:
    _settle()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", called, "127.0.0.1", str(port),
                               *map(str, g)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for g in groups]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, err in zip(procs, errs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-1000:]}")
    return dt


_STEPS = ("create + write", "fsync", "rename", "folder fsync", "commit")


def _durability_floor(work: Path, files: list[Path]) -> dict[str, float]:
    """Median seconds per slice of each step of the SCP's durability protocol, alone."""
    shutil.rmtree(work, ignore_errors=True)
    spool = Spool(work / "spool")
    spool.prepare()
    db = sqlite3.connect(work / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE instance (uid TEXT PRIMARY KEY, path TEXT, size INTEGER)")
    piece = 128 * 1024  # as the native engine hands ranges to sync_file_range
    times: dict[str, list[float]] = {step: [] for step in _STEPS}
    _settle()
    for i, f in enumerate(files):
        data = f.read_bytes()
        t0 = time.perf_counter()
        fh, tmp = spool.open_incoming()
        with fh:
            for off in range(0, len(data), piece):
                fh.write(data[off:off + piece])
                fh.flush()
                spool.start_writeback(fh.fileno(), off, len(data[off:off + piece]))
        t1 = time.perf_counter()
        spool.sync(tmp)
        t2 = time.perf_counter()
        final = spool.place(tmp, f"study/series/{i}.dcm")
        t3 = time.perf_counter()
        spool.sync_dir(final.parent)
        t4 = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT INTO instance VALUES (?, ?, ?)", (str(i), str(final), len(data)))
        db.execute("COMMIT")
        t5 = time.perf_counter()
        for step, dt in zip(_STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            times[step].append(dt)
    db.close()
    shutil.rmtree(work, ignore_errors=True)
    return {step: statistics.median(v) for step, v in times.items()}


class Ours:
    def __init__(self, work: Path, processes: int) -> None:
        self.work = work
        self.port = free_port()
        self.processes = processes

    def __enter__(self) -> Ours:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        cfg = write_config(self.work / "config.toml", port=self.port, spool=self.work / "spool",
                           database_url=f"sqlite:///{self.work / 'node.db'}",
                           processes=self.processes)
        cfg.write_text(cfg.read_text().replace('level = "DEBUG"', 'level = "INFO"'))
        self.log = (self.work / "node.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "scp", "--config",
                                      str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_listening(self.work / "node.log", self.proc)  # every receiving process listens
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


class Dcmtk:
    def __init__(self, work: Path, fork: bool) -> None:
        self.work = work
        self.port = free_port()
        self.fork = fork

    def __enter__(self) -> Dcmtk:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        args = [STORESCP, "-od", str(self.work), *(["--fork"] if self.fork else []),
                str(self.port)]
        self.proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--per-assoc", type=int, default=60)
    ap.add_argument("--processes", type=int, default=0, help="our receiving processes (0=cores)")
    ap.add_argument("--engine", choices=("native", "pynetdicom"), default=None,
                    help="our [dicom] engine (default: the configuration's default)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    nodeproc.ENGINE = args.engine

    base = args.workdir or Path(tempfile.mkdtemp(prefix="triage-bench-"))
    series = make_ct_series(base / "series", args.slices)
    groups = [make_ct_series(base / f"group{i}", args.per_assoc, seed=i)
              for i in range(args.concurrent)]
    rows: list[tuple[str, str, str, str]] = []

    ours_rates, dcmtk_rates = [], []
    for _ in range(args.rounds):
        with Ours(base / "ours", args.processes) as ours:
            ours_rates.append(args.slices / _send(ours.port, series, "ICHTRIAGE"))
        with Dcmtk(base / "dcmtk", fork=False) as dcm:
            dcmtk_rates.append(args.slices / _send(dcm.port, series, "STORESCP"))
    o, d = statistics.median(ours_rates), statistics.median(dcmtk_rates)
    rows.append((f"1 association x {args.slices} slices", f"{o:.0f}", f"{d:.0f}",
                 f"{o / d:.2f}x"))

    total = args.concurrent * args.per_assoc
    ours_c, dcmtk_c = [], []
    for _ in range(args.rounds):
        with Ours(base / "ours", args.processes) as ours:
            ours_c.append(total / _send_parallel(ours.port, groups, "ICHTRIAGE"))
        with Dcmtk(base / "dcmtk", fork=True) as dcm:
            dcmtk_c.append(total / _send_parallel(dcm.port, groups, "STORESCP"))
    o, d = statistics.median(ours_c), statistics.median(dcmtk_c)
    rows.append((f"{args.concurrent} associations x {args.per_assoc} slices (vs --fork)",
                 f"{o:.0f}", f"{d:.0f}", f"{o / d:.2f}x"))

    floor = _durability_floor(base / "floor", series)

    from triage_node.config import DEFAULT_DICOM_ENGINE

    print(f"\ningest, 512x512 int16 slices, median of {args.rounds} rounds, "
          f"{os.cpu_count()} cores, ours ({args.engine or DEFAULT_DICOM_ENGINE} engine) with "
          "fsync + SQLite commit per acknowledged slice")
    print(f"command: python {' '.join(sys.argv)}")
    header = ("scenario", "ours slices/s", "dcmtk slices/s", "ratio")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print("\nper round (slices/s, in run order):")
    for name, ours_r, dcmtk_r in (("1 association", ours_rates, dcmtk_rates),
                                  (f"{args.concurrent} associations", ours_c, dcmtk_c)):
        print(f"  {name}: ours {' '.join(f'{x:.0f}' for x in ours_r)}; "
              f"dcmtk {' '.join(f'{x:.0f}' for x in dcmtk_r)}")
    per_slice = 1 / statistics.median(dcmtk_rates)
    extra = sum(floor[step] for step in _STEPS[1:])
    print("\nthe SCP's disk work per slice, alone (median ms): "
          + ", ".join(f"{step} {floor[step] * 1000:.2f}" for step in _STEPS))
    print(f"dcmtk's whole slice, one association: {per_slice * 1000:.2f} ms; plus fsync, rename, "
          f"folder fsync and commit ({extra * 1000:.2f} ms, in sequence) that is "
          f"{1 / (per_slice + extra):.0f} slices/s = {per_slice / (per_slice + extra):.2f}x dcmtk")
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
