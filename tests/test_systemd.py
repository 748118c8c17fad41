"""The systemd units pass `systemd-analyze verify` and carry the hardening the issue asks for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
INSTALLED = "/opt/triage-node/.venv/bin/triage-node"
ANALYZE = shutil.which("systemd-analyze")

SERVICES = sorted(UNITS.glob("*.service"))


def test_every_role_has_a_unit() -> None:
    names = {p.name for p in SERVICES}
    assert {"triage-node.service", "triage-node-scp.service", "triage-node-worker.service",
            "triage-node-api.service"} <= names


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_units_verify(tmp_path: Path) -> None:
    """Verified as installed: ExecStart pointing at this environment's triage-node."""
    exe = Path(sys.executable).parent / "triage-node"
    assert exe.is_file(), "the project is not installed in this environment"
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".timer"):
            (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(exe)))
    out = subprocess.run([str(ANALYZE), "verify", "--man=no",
                          *sorted(str(p) for p in tmp_path.iterdir())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
        out.stdout + out.stderr


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_hardening(unit: Path) -> None:
    lines = {line.strip() for line in unit.read_text().splitlines()}
    for directive in ("User=triage-node", "ProtectSystem=strict",
                      "ReadWritePaths=/var/lib/triage-node", "NoNewPrivileges=yes",
                      "PrivateTmp=yes", "Restart=on-failure", "KillSignal=SIGTERM"):
        assert directive in lines, f"{unit.name}: {directive} missing"
    rw = [line for line in lines if line.startswith("ReadWritePaths=")]
    assert rw == ["ReadWritePaths=/var/lib/triage-node"], "the data dir only"
    assert any(line.startswith("After=") and "postgresql.service" in line
               and "redis-server.service" in line for line in lines)
