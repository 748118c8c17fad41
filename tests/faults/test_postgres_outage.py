"""PostgreSQL unreachable for a while (a TCP proxy between the node and the server is cut)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import TcpProxy, scenario, wait_for
from markers import needs_dcmtk
from sqlalchemy.engine import make_url

from triage_node.domain import SeriesState

pytestmark = [
    needs_dcmtk,
    pytest.mark.postgres,
]

#: Length of the outage (the issue's figure: 30 s).
PG_DOWN_S = 30.0


def test_postgresql_unavailable(tmp_path: Path, fault_model: Path, postgres_url: str) -> None:
    """Three 16-slice series on PostgreSQL reached through a proxy. The proxy is cut (open
    connections reset, new ones refused) the moment the worker claims the first series, so
    its classification (or the SR that follows) meets the outage; the second series is
    sent during the outage (refused 0xA701: nothing acknowledged that is not recorded).
    After ``PG_DOWN_S`` the proxy lets connections through again, the scanner re-sends what
    was refused and sends the third series: every series is classified once and its SR
    delivered once, no process restarted.

    The classify task's retry budget (countdowns 1+2+4+8+16 s, ``max_retries=5``) ends 31 s
    after the first failure, so this 30 s outage passes with about a second to spare."""
    url = make_url(postgres_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    node_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        with scenario(tmp_path, fault_model, name="PostgreSQL unavailable", n_series=3,
                      n_slices=16, seed=401, database_url=node_url,
                      observer_url=postgres_url) as sc:
            node = sc.node
            assert sc.scanner.send(node.port, sc.files(0)).returncode == 0
            wait_for(lambda: sc.series_state(0) in (SeriesState.PROCESSING, SeriesState.DONE),
                     "first series being classified", 120, logs=node.logs,
                     procs=node.live(), interval=0.01)
            proxy.cut()
            cut = time.monotonic()
            state = sc.series_state(0)
            sc.scanner.send(node.port, sc.files(1))
            sc.assert_acknowledged_are_stored()
            refused = len(sc.scanner.unacknowledged(sc.files(1)))
            assert refused > 0, "the SCP acknowledged instances it could not record"
            assert "refused with 0xA701" in node.scp_log.read_text(), "not 'database' status"
            time.sleep(max(0.0, PG_DOWN_S - (time.monotonic() - cut)))  # the outage
            proxy.restore()
            sc.notes.append(f"cut {time.monotonic() - cut:.1f} s with the first series "
                            f"{state}; {refused} of 16 refused (0xA701) during the outage; "
                            f"{proxy.refused} connections refused by the proxy")
            sc.scanner.send_until_acknowledged(lambda: node.port, sc.files(1), timeout=120)
            assert sc.scanner.send(node.port, sc.files(2)).returncode == 0
            sc.wait_settled(180)
            sc.finish()
    finally:
        proxy.close()
