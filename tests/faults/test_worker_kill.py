"""A worker SIGKILLed while it runs a task (an eager inference batch or a series)."""

from __future__ import annotations

import re
from pathlib import Path

from harness import scenario, settled, wait_for
from markers import needs_dcmtk

pytestmark = needs_dcmtk

_RECEIVED = re.compile(r"Task (triage_node\.\w+)\[[^]]+\] received")
_DONE = re.compile(r"Task triage_node\.\w+\[[^]]+\] (?:succeeded|failed|retry|raised)")


def _in_flight(log: Path) -> str | None:
    """The task the worker has taken and not finished, from its Celery log lines."""
    text = log.read_text(errors="replace")
    received = _RECEIVED.findall(text)
    if len(received) > len(_DONE.findall(text)):
        return str(received[-1])
    return None


def test_worker_sigkilled_mid_batch(tmp_path: Path, fault_model: Path) -> None:
    """Three 24-slice series; eager batches of 8 slices. Once the first series is done and
    its SR delivered, the other two are sent and the worker is SIGKILLed the moment it runs
    an eager inference batch (``infer_slices``); a second worker starts. Lost batches are
    only a head start: the new worker's assembler re-queues series left queued/processing
    and the series task predicts what is missing, so every series gets one result and one
    SR.

    (A kill *after* a series result is stored but before its SR is queued is recovered
    only by the broker's redelivery - ``visibility_timeout`` plus kombu's restore throttle,
    measured ~110 s with ``visibility_timeout = 20`` - so this test does not wait for it.)
    """
    with scenario(tmp_path, fault_model, name="worker SIGKILLed mid-batch", n_series=3,
                  n_slices=24, seed=201) as sc:
        node = sc.node
        first_log = node.worker_logs[0]
        assert sc.scanner.send(node.port, sc.files(0)).returncode == 0
        wait_for(lambda: settled(sc.factory, sc.truths[:1], with_sr=True),
                 "first series done and its SR sent", 180, logs=node.logs, procs=node.live())
        join = sc.scanner.send_async(node.port, sc.files(1) + sc.files(2))
        wait_for(lambda: _in_flight(first_log) == "triage_node.infer_slices",
                 "an inference batch in flight", 120,
                 logs=node.logs, procs=node.live(), interval=0.01)
        task = _in_flight(first_log)
        node.workers[0].kill()
        node.workers[0].wait(30)
        sc.notes.append(f"SIGKILL while running {task}")
        assert join().returncode == 0
        node.start_worker()
        sc.wait_settled(240)
        sc.finish()
