"""`triage-node demo`: one command, the whole node, a worklist printed, a clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from triage_node.config import packaged_model_path


@pytest.mark.skipif(packaged_model_path() is None,
                    reason="the packaged demo model is not in this installation")
def test_demo_runs_and_exits_cleanly(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "triage_node.cli", "demo", "--studies", "2", "--slices", "12",
         "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("patient"))) + 2:][:2]
    assert {row.split()[0] for row in table} == {"PHANTOM-1000", "PHANTOM-1001"}
    for row in table:
        notified = float(row.split()[-1])
        assert 0 < notified < 300
    assert "worklist page: http://127.0.0.1:" in out.stdout
    assert (tmp_path / "demo" / "data" / "triage-node.db").is_file()
