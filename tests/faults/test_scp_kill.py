"""The SCP SIGKILLed in the middle of an association; the scanner re-sends the rest."""

from __future__ import annotations

from pathlib import Path

from harness import scenario, wait_for
from markers import needs_dcmtk

pytestmark = needs_dcmtk


def _placed(spool: Path) -> int:
    """Instances renamed into the spool so far (partial receptions excluded)."""
    return sum(1 for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)


def test_scp_sigkilled_mid_association(tmp_path: Path, fault_model: Path) -> None:
    """Two 40-slice series (256 x 256) in one association; the SCP is SIGKILLed once a
    third of the slices are in the spool. storescu sees the connection drop; whatever it
    saw acknowledged must be stored, and after the scanner re-sends the unacknowledged rest
    to the restarted SCP (same port, spool and database) both series are classified once
    and their SRs delivered once."""
    with scenario(tmp_path, fault_model, name="SCP SIGKILLed mid-association", n_series=2,
                  n_slices=40, size=256, seed=101) as sc:
        node = sc.node
        files = sc.files(0) + sc.files(1)
        join = sc.scanner.send_async(node.port, files)
        wait_for(lambda: _placed(node.spool) >= len(files) // 3, "a third in the spool", 120,
                 logs=node.logs, interval=0.005)
        node.kill_scp()
        first = join()
        assert first.returncode != 0 and sc.scanner.unacknowledged(files), \
            "the association ended before the kill: make the series bigger"
        sc.assert_acknowledged_are_stored()  # nothing acknowledged was lost with the process
        sc.notes.append(f"SIGKILL after {len(sc.scanner.acknowledged)} of {len(files)} "
                        "acknowledged")
        node.start_scp()
        sc.scanner.send_until_acknowledged(lambda: node.port, files, timeout=120)
        sc.wait_settled(240)
        counts = sc.finish()
        assert counts.acknowledged == len(files)
