"""Run a real ``triage-node`` process for tests: free port, readiness polled, never a sleep."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DCMTK = Path("/usr/bin")
#: dcmtk tools stall 40 ms per message on Nagle without this.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: ``[dicom] engine`` written into node configs; None = the built-in default.
#: ``tests/test_scp.py`` runs every test once per engine by setting it.
ENGINE: str | None = None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def wait_listening(log: Path, proc: subprocess.Popen[bytes], ae: str = "ICHTRIAGE",
                   timeout: float = 60) -> None:
    """Wait for the node's "<AE> listening on" line (INFO level): the supervisor writes it
    once every receiving process accepts associations."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{ae} listening on" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        time.sleep(0.02)
    raise TimeoutError(f"no '{ae} listening on' in {log} after {timeout} s")


@dataclass
class NodeProc:
    """A running node and where its state lives."""

    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    spool: Path
    database_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def write_config(
    path: Path, *, port: int, spool: Path, database_url: str, processes: int = 1, extra: str = "",
    min_free_mb: int = 0, storage_extra: str = "",
) -> Path:
    """A node config; ``extra`` goes after ``[dicom]`` (may open tables of its own),
    ``storage_extra`` into ``[storage]``."""
    path.write_text(
        f"""
[dicom]
host = "127.0.0.1"
port = {port}
processes = {processes}
{f'engine = "{ENGINE}"' if ENGINE else ""}
{extra}
{"" if "[api]" in extra else f"[api]{chr(10)}port = {free_port()}"}
[storage]
path = "{spool}"
min_free_mb = {min_free_mb}
{storage_extra}
[database]
url = "{database_url}"
[logging]
level = "DEBUG"
"""
    )
    return path


@contextlib.contextmanager
def running_node(
    tmp_path: Path,
    *,
    database_url: str | None = None,
    processes: int = 1,
    extra: str = "",
    command: str = "scp",
    spool: Path | None = None,
    min_free_mb: int = 0,
    storage_extra: str = "",
) -> Iterator[NodeProc]:
    """Start ``triage-node <command>`` as a subprocess and stop it afterwards."""
    port = free_port()
    spool = spool or tmp_path / "spool"
    database_url = database_url or f"sqlite:///{tmp_path / 'node.db'}"
    cfg = write_config(
        tmp_path / "config.toml",
        port=port,
        spool=spool,
        database_url=database_url,
        processes=processes,
        extra=extra,
        min_free_mb=min_free_mb,
        storage_extra=storage_extra,
    )
    log = tmp_path / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "triage_node.cli", command, "--config", str(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    node = NodeProc(proc, port, cfg, spool, database_url, log)
    try:
        wait_port(port, proc)
        yield node
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def storescu(
    port: int,
    files: list[Path] | list[str],
    *,
    called: str = "ICHTRIAGE",
    calling: str = "STORESCU",
    extra: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu (never pynetdicom's shadowing script) with verbose output."""
    cmd = [
        str(DCMTK / "storescu"),
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *, called: str = "ICHTRIAGE",
            calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu against 127.0.0.1:port."""
    cmd = [str(DCMTK / "echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
