"""The destination PACS down when the SRs are due, then up again."""

from __future__ import annotations

import time
from pathlib import Path

from harness import scenario, wait_for
from markers import needs_dcmtk

from triage_node import store
from triage_node.domain import DeliveryState

pytestmark = needs_dcmtk

#: How long the PACS stays down after the first SR is due (the issue's figure: a minute).
PACS_DOWN_S = 60.0


def test_pacs_down_then_up(tmp_path: Path, fault_model: Path) -> None:
    """Two 16-slice series are classified while nothing listens on the PACS port: each SR
    (and key-image SC) is retried with backoff (0.5 s doubling to 4 s) and stays pending.
    ``PACS_DOWN_S`` after the first document was due the PACS starts on that port: each
    arrives exactly once."""
    with scenario(tmp_path, fault_model, name="PACS down, then up", n_series=2, n_slices=16,
                  seed=501, pacs_running=False) as sc:
        node = sc.node
        for i in range(2):
            assert sc.scanner.send(node.port, sc.files(i)).returncode == 0
        wait_for(lambda: bool(store.list_deliveries(sc.factory)), "a due SR", 180,
                 logs=node.logs, procs=node.live())
        due = time.monotonic()

        def retrying() -> bool:
            rows = store.list_deliveries(sc.factory)
            series = {r.series_instance_uid for r in rows}
            return len(series) == 2 and all(r.attempts >= 2 for r in rows)

        wait_for(retrying, "the SRs retried", 120, logs=node.logs, procs=node.live())
        time.sleep(max(0.0, PACS_DOWN_S - (time.monotonic() - due)))  # the outage
        rows = store.list_deliveries(sc.factory)
        assert all(r.state is DeliveryState.PENDING and r.last_error for r in rows), rows
        sc.pacs.start()
        sc.notes.append(f"PACS down {time.monotonic() - due:.0f} s after the first SR was "
                        f"due; attempts by then: {[r.attempts for r in rows]}")
        sc.wait_settled(120)
        sc.finish()
