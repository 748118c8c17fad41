#!/usr/bin/env python3
"""Time to result: association release -> series result in the database.

Usage::

    .venv/bin/python bench/ttr.py [--series 10] [--slices 40] [--broker redis://127.0.0.1:6379/15]
                                  [--eager-batch 16] [--notify]

Starts ``triage-node scp`` and ``triage-node worker`` (real processes, default settings but
the broker) with an untrained EfficientNet-B0 artifact (inference cost is what matters, not
accuracy), sends ``--series`` phantom series one after another with dcmtk ``storescu``, and
for each measures from storescu's exit (association released) to the result row. Prints
p50/p95, and how long the series task took after completion. With ``--eager-batch 0``
(all inference in the series task) that time also gives the worker's slices/s, to compare
with ``bench/infer.py``. ``--notify`` adds a dcmtk ``storescp`` as the PACS and also
measures time to notification: release -> the SR stored at the PACS (its outbox row
``sent``, which happens once storescp has acknowledged the C-STORE). Default broker: the
embedded SQLite transport. Stops by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nodeproc import DCMTK_ENV, free_port, running_node, storescu, wait_port  # noqa: E402

from triage_node import store  # noqa: E402
from triage_node.domain import DeliveryState  # noqa: E402
from triage_node.model import random_artifact  # noqa: E402
from triage_node.phantom import generate_study  # noqa: E402
from triage_node.preprocess import PreprocessSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--broker", default="", help="default: embedded SQLite transport")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed series sent first (the worker's first series pays one-off "
                         "costs: lazy imports, first key image); default 1")
    ap.add_argument("--notify", action="store_true",
                    help="send every SR to a local dcmtk storescp and time it too")
    ap.add_argument("--eager-batch", type=int, default=16,
                    help="[queue] eager_batch (default 16, the shipped default; 0 = off)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="triage-ttr-"))
    spec = PreprocessSpec()
    random_artifact(work / "model.tnm", preprocess=spec.to_dict(), in_channels=spec.channels)
    broker = args.broker or f"sqla+sqlite:///{work / 'queue.db'}"
    studies = [generate_study(work / "in" / str(i), seed=100 + i, n_slices=args.slices)
               for i in range(args.warmup + args.series)]
    extra = (f'[queue]\nbroker_url = "{broker}"\neager_batch = {args.eager_batch}\n'
             f'[model]\npath = "{work / "model.tnm"}"\n')
    pacs = None
    if args.notify:
        pacs_port = free_port()
        (work / "pacs").mkdir()
        pacs = subprocess.Popen(["/usr/bin/storescp", "--output-directory", str(work / "pacs"),
                                 str(pacs_port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        wait_port(pacs_port, pacs)
        # Every series notifies (the untrained model flags at random); default delivery
        # settings otherwise.
        extra += ('[results]\nsend_negative = true\n'
                  f'[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                  f'port = {pacs_port}\n')
    ttr, inference, ttn = [], [], []
    with running_node(work, extra=extra) as node:
        log = (work / "worker.log").open("wb")
        worker = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "worker",
                                   "--config", str(node.config), "--log-level", "WARNING"],
                                  stdout=log, stderr=subprocess.STDOUT)
        factory = store.make_session_factory(store.make_engine(node.database_url))
        try:
            for n, truth in enumerate(studies):
                out = storescu(node.port, [s.path for s in truth.slices])
                released = time.monotonic()
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-1000:])
                deadline = released + 300
                result = None
                while result is None and time.monotonic() < deadline:
                    if worker.poll() is not None:
                        raise RuntimeError((work / "worker.log").read_text()[-3000:])
                    result = store.get_result(factory, truth.series_uid)
                    if result is None:
                        time.sleep(0.02)
                if result is None:
                    raise RuntimeError("no result within 300 s")
                if n < args.warmup:  # not timed: wait for its SR too, then go on
                    while args.notify and not any(
                            r.state is DeliveryState.SENT for r in store.list_deliveries(
                                factory, series_instance_uid=truth.series_uid)):
                        time.sleep(0.05)
                    continue
                ttr.append(time.monotonic() - released)
                inference.append((result.inference_done_at - result.inference_started_at
                                  ).total_seconds())
                while args.notify:
                    rows = store.list_deliveries(factory, series_instance_uid=truth.series_uid)
                    if rows and rows[0].state is DeliveryState.SENT:
                        ttn.append(time.monotonic() - released)
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"SR not delivered within 300 s: {rows}")
                    time.sleep(0.02)
        finally:
            worker.terminate()
            worker.wait(60)
            log.close()
            if pacs is not None:
                pacs.terminate()
                pacs.wait(10)

    q = statistics.quantiles(ttr, n=20) if len(ttr) > 1 else ttr * 19
    print(f"\ntime to result, {args.series} series x {args.slices} slices (after {args.warmup} "
          f"untimed), efficientnet-b0 "
          f"256x256 (untrained), CPU, {os.cpu_count()} cores, broker "
          f"{'redis' if broker.startswith('redis') else 'embedded SQLite'}, "
          f"eager_batch {args.eager_batch}")
    print(f"command: python {' '.join(sys.argv)}")
    print("measure                                      | value")
    print("---------------------------------------------|------")
    print(f"release -> result, p50 (s)                   | {statistics.median(ttr):.2f}")
    print(f"release -> result, p95 (s)                   | {q[18]:.2f}")
    if ttn:
        qn = statistics.quantiles(ttn, n=20) if len(ttn) > 1 else ttn * 19
        print(f"release -> SR at the PACS, p50 (s)           | {statistics.median(ttn):.2f}")
        print(f"release -> SR at the PACS, p95 (s)           | {qn[18]:.2f}")
    print(f"series task after completion, median (s)     | {statistics.median(inference):.2f}")
    if args.eager_batch == 0:
        print(f"worker slices/s (inference only)             | "
              f"{args.slices / statistics.median(inference):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
