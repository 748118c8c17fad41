#!/usr/bin/env python3
"""Ceiling experiment: how fast can a *minimal* Python C-STORE receiver go here?

Not product code and not a DICOM-conformant SCP: one thread per connection, A-ASSOCIATE
negotiated with pynetdicom's PDU classes, P-DATA parsed by hand, each slice written to a
file (fsync, rename, directory fsync) and committed to SQLite (WAL, synchronous=FULL),
then answered. No header parse, no checks, no audit. It exists to decide whether replacing
pynetdicom's receive path (2-3 polling threads and queues per association) would let the
real SCP reach issue 2's targets; see the session note of 2026-11-23.

Usage: .venv/bin/python bench/receiver_ceiling.py [--slices 300] [--no-fsync]
"""

import argparse
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicomfiles import make_ct_series
from nodeproc import DCMTK_ENV, free_port
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from triage_node.ulserver import decode_associate_rq, pynetdicom_accept

SUPPORTED = [
    build_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
    build_context(Verification),
]
ap = argparse.ArgumentParser(description="minimal C-STORE receiver ceiling")
ap.add_argument("--slices", type=int, default=300)
ap.add_argument("--concurrent", type=int, default=8)
ap.add_argument("--per-assoc", type=int, default=60)
ap.add_argument("--no-fsync", action="store_true")
args = ap.parse_args()
WORK = Path(tempfile.mkdtemp(prefix="triage-ceiling-"))
OUT = WORK / "out"
OUT.mkdir()
FSYNC = not args.no_fsync
db = sqlite3.connect(str(OUT / "x.db"), check_same_thread=False, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS i (uid TEXT PRIMARY KEY, path TEXT)")


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return buf


def pdata(ctx, cmd_bytes):
    item = struct.pack(">LBB", len(cmd_bytes) + 2, ctx, 0x03) + cmd_bytes
    return struct.pack(">BBL", 4, 0, len(item)) + item


def encode_cmd(ds):
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    body = fp.getvalue()
    g = Dataset()
    g.CommandGroupLength = len(body)
    fp2 = DicomBytesIO()
    fp2.is_little_endian = True
    fp2.is_implicit_VR = True
    write_dataset(fp2, g)
    return fp2.getvalue() + body


def decode_cmd(b):
    fp = DicomBytesIO(bytes(b))
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    return read_dataset(fp, True, True)


def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = recv_exact(conn, 6)
    _, _, n = struct.unpack(">BBL", hdr)
    prim = decode_associate_rq(bytes(hdr + recv_exact(conn, n)))
    ac, _, _ = pynetdicom_accept(prim, SUPPORTED, 4 * 1024 * 1024)
    conn.sendall(ac)
    cmd = bytearray()
    f = None
    tmp = None
    cmd_ds = None
    while True:
        hdr = recv_exact(conn, 6)
        t, _, n = struct.unpack(">BBL", hdr)
        body = recv_exact(conn, n)
        if t == 5:
            conn.sendall(b"\x06\x00" + struct.pack(">L", 4) + b"\x00" * 4)
            conn.close()
            return
        if t == 7:
            conn.close()
            return
        view = memoryview(body)
        off = 0
        while off < n:
            ln, ctx, mch = struct.unpack_from(">LBB", view, off)
            data = view[off + 6 : off + 4 + ln]
            off += 4 + ln
            if mch & 1:
                cmd += data
                if mch & 2:
                    cmd_ds = decode_cmd(cmd)
                    cmd = bytearray()
                    if cmd_ds.CommandField == 0x0030:
                        r = Dataset()
                        r.AffectedSOPClassUID = Verification
                        r.CommandField = 0x8030
                        r.MessageIDBeingRespondedTo = cmd_ds.MessageID
                        r.CommandDataSetType = 0x0101
                        r.Status = 0
                        conn.sendall(pdata(ctx, encode_cmd(r)))
                    else:
                        tmp = OUT / f".in-{threading.get_ident()}"
                        f = open(tmp, "wb")  # noqa: SIM115 - spans PDUs, closed on the last fragment
            else:
                f.write(data)
                if mch & 2:
                    f.flush()
                    if FSYNC:
                        os.fsync(f.fileno())
                    f.close()
                    uid = str(cmd_ds.AffectedSOPInstanceUID)
                    final = OUT / (uid + ".dcm")
                    os.replace(tmp, final)
                    if FSYNC:
                        d = os.open(OUT, os.O_RDONLY)
                        os.fsync(d)
                        os.close(d)
                    with threading.Lock():
                        db.execute("INSERT OR IGNORE INTO i VALUES (?, ?)", (uid, str(final)))
                    r = Dataset()
                    r.AffectedSOPClassUID = cmd_ds.AffectedSOPClassUID
                    r.CommandField = 0x8001
                    r.MessageIDBeingRespondedTo = cmd_ds.MessageID
                    r.CommandDataSetType = 0x0101
                    r.Status = 0
                    r.AffectedSOPInstanceUID = uid
                    conn.sendall(pdata(ctx, encode_cmd(r)))


PORT = free_port()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", PORT))
srv.listen(16)


def acceptor():
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


threading.Thread(target=acceptor, daemon=True).start()


def storescu(files):
    return subprocess.Popen(
        ["/usr/bin/storescu", "-aec", "X", "127.0.0.1", str(PORT), *map(str, files)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


series = make_ct_series(WORK / "series", args.slices)
groups = [make_ct_series(WORK / f"g{i}", args.per_assoc, seed=i) for i in range(args.concurrent)]
t = time.perf_counter()
assert storescu(series).wait() == 0
single = args.slices / (time.perf_counter() - t)
t = time.perf_counter()
procs = [storescu(g) for g in groups]
assert all(p.wait() == 0 for p in procs)
conc = args.concurrent * args.per_assoc / (time.perf_counter() - t)
print(f"minimal receiver, fsync={FSYNC}, SQLite WAL FULL commit per slice, 1 process")
print(f"command: python {' '.join(sys.argv)}")
print("scenario | slices/s")
print(f"1 association x {args.slices} | {single:.0f}")
print(f"{args.concurrent} associations x {args.per_assoc} | {conc:.0f}")
shutil.rmtree(WORK, ignore_errors=True)
