"""The spool's file system full (a small tmpfs): refused, never acknowledged unstored."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import scenario
from markers import needs_dcmtk

pytestmark = needs_dcmtk

#: Space left on the spool's file system when the series arrive.
HEADROOM = 300 * 1024


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path``, or skip saying why it cannot be done."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def _fill(volume: Path, leave: int) -> Path:
    """Write a file that leaves ``leave`` bytes free on ``volume``."""
    st = os.statvfs(volume)
    size = st.f_bavail * st.f_frsize - leave
    filler = volume / "filler"
    with filler.open("wb") as fh:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= fh.write(chunk[:size])
    return filler


def test_spool_disk_full(tmp_path: Path, fault_model: Path) -> None:
    """The spool lives on an 8 MiB tmpfs filled to ``HEADROOM`` bytes; two 20-slice series
    (128 x 128, ~34 KB a slice) arrive. What fits is stored and acknowledged; the rest is
    refused (0xA700), and acknowledged == stored holds right then. Space is freed, the
    scanner re-sends the refused instances, and both series are classified over all their
    slices, their SRs delivered once."""
    with _tmpfs(tmp_path / "spoolfs", "8m") as volume, \
            scenario(tmp_path, fault_model, name="spool disk full", n_series=2, n_slices=20,
                     size=128, seed=601, spool=volume / "spool") as sc:
        node = sc.node
        filler = _fill(volume, HEADROOM)
        for i in range(2):
            sc.scanner.send(node.port, sc.files(i))
        sc.assert_acknowledged_are_stored()
        acked, refused = len(sc.scanner.acknowledged), sum(
            n for status, n in sc.scanner.statuses.items() if status != "Success")
        assert refused > 0 and acked > 0, dict(sc.scanner.statuses)
        assert "refused with 0xA700" in node.scp_log.read_text(), "not 'out of resources'"
        partial = list((volume / "spool" / ".incoming").iterdir())
        sc.notes.append(f"disk full: {acked} acknowledged, {refused} refused "
                        f"({dict(sc.scanner.statuses)}); {len(partial)} partial files left "
                        "in .incoming")
        filler.unlink()
        files = sc.files(0) + sc.files(1)
        sc.scanner.send_until_acknowledged(lambda: node.port, files, timeout=120)
        sc.wait_settled(180)
        sc.finish()
