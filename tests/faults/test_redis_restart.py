"""The broker (Redis) restarted while series arrive and are classified."""

from __future__ import annotations

import time
from pathlib import Path

from harness import scenario, settled, wait_for
from markers import needs_dcmtk

from triage_node import store
from triage_node.domain import SeriesState

pytestmark = needs_dcmtk

#: Redis stays down until the second series has been decided, then this much longer.
REDIS_DOWN_AFTER_DECISION_S = 3.0


def test_redis_restarted_mid_run(tmp_path: Path, fault_model: Path) -> None:
    """Three 16-slice series. The first goes through; Redis (append-only file, so what was
    queued survives) is stopped while the second arrives and stays down until the second
    has been decided complete (its eager batches and its classification are queued while
    the broker is away), then is started again on the same port; then the third is sent.
    Every series must be classified once and its SR delivered once, with no process
    restarted but Redis."""
    with scenario(tmp_path, fault_model, name="Redis restarted mid-run", n_series=3,
                  n_slices=16, seed=301) as sc:
        node = sc.node
        assert sc.scanner.send(node.port, sc.files(0)).returncode == 0
        wait_for(lambda: settled(sc.factory, sc.truths[:1], with_sr=True), "first series",
                 180, logs=node.logs, procs=node.live())
        join = sc.scanner.send_async(node.port, sc.files(1))
        wait_for(lambda: store.count_instances(sc.factory, sc.truths[1].series_uid) >= 6,
                 "second series arriving", 60, logs=node.logs, interval=0.01)
        sc.redis.stop()
        stopped = time.monotonic()
        assert join().returncode == 0  # the SCP does not need the broker
        wait_for(lambda: sc.series_state(1) is not SeriesState.RECEIVING,
                 "second series decided", 60, logs=node.logs, procs=node.live())
        time.sleep(REDIS_DOWN_AFTER_DECISION_S)  # the outage goes on a little
        sc.redis.start()
        sc.notes.append(f"Redis down {time.monotonic() - stopped:.1f} s (SIGTERM, restart), "
                        "covering the second series' completion")
        assert sc.scanner.send(node.port, sc.files(2)).returncode == 0
        sc.wait_settled(45)  # ~10 s when it works
        sc.finish()
