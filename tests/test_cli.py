"""The command line, run as a real subprocess where it talks to the network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dicomfiles import make_ct_series
from markers import needs_dcmtk
from nodeproc import running_node

CLI = [sys.executable, "-m", "triage_node.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "scp", "db", "send", "echo", "series", "phantom", "config"):
        assert cmd in out.stdout
    for cmd in ("scp", "serve", "send", "echo", "series"):
        sub = run(cmd, "--help")
        assert sub.returncode == 0 and "--config" in sub.stdout


def test_config_error_exits_2_naming_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[dicom]\nport = -1\n")
    out = run("config", "--config", str(tmp_path / "c.toml"))
    assert out.returncode == 2
    assert "dicom.port = -1" in out.stderr


def test_config_shows_effective_values_without_secrets(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TRIAGE_NODE_DATABASE_URL": "postgresql+psycopg://u:hunter2@h/db",
           "TRIAGE_NODE_DATA_DIR": str(tmp_path)}
    out = run("config", env=env)
    assert out.returncode == 0
    shown = json.loads(out.stdout)
    assert shown["database"]["url"] == "postgresql+psycopg://u:***@h/db"
    assert "hunter2" not in out.stdout
    assert shown["dicom"]["ae_title"] == "ICHTRIAGE"


def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TRIAGE_NODE_DATA_DIR": str(tmp_path)}
    for _ in range(2):
        out = run("db", "upgrade", env=env)
        assert out.returncode == 0, out.stderr
        assert "at revision" in out.stdout
    assert (tmp_path / "triage-node.db").is_file()
    cur = run("db", "current", env=env)
    assert cur.stdout.strip() and cur.stdout.strip() != "(empty)"


@needs_dcmtk
def test_send_echo_series_round_trip(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "in", 6, rows=64, cols=64)
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    with running_node(tmp_path) as node:
        to = f"127.0.0.1:{node.port}"
        echo = run("echo", to)
        assert echo.returncode == 0 and "success" in echo.stdout, echo.stderr
        sent = run("send", str(tmp_path / "in"), "--to", to, "--calling-ae", "CLITEST")
        assert sent.returncode == 0, sent.stderr
        assert "sent 6 of 6" in sent.stdout
        listing = run("series", "--json", "--config", str(node.config))
        rows = json.loads(listing.stdout)
        assert len(rows) == 1 and rows[0]["instance_count"] == len(files)
        table = run("series", "--config", str(node.config))
        assert "PHANTOM-1" in table.stdout and "receiving" in table.stdout
        assert "PHANTOM^" not in table.stdout, "no patient names in listings"
        audit = run("audit", "--json", "--since", "1h", "--config", str(node.config))
        events = [json.loads(line) for line in audit.stdout.splitlines()]
        kinds = [e["kind"] for e in events]
        assert kinds.count("instance_stored") == 6
        assert "association_opened" in kinds
        assert {e["actor"] for e in events if e["kind"] == "instance_stored"} == {"CLITEST"}
        only = run("audit", "--kind", "association_opened", "--config", str(node.config))
        assert only.returncode == 0 and only.stdout.count("association_opened") == len(
            only.stdout.splitlines()) >= 1
        later = run("audit", "--since", "2099-01-01T00:00:00", "--config", str(node.config))
        assert later.returncode == 0 and later.stdout == ""
        bad = run("audit", "--since", "yesterday", "--config", str(node.config))
        assert bad.returncode == 2 and "neither an ISO 8601 time" in bad.stderr


def test_echo_to_closed_port_fails_cleanly() -> None:
    from nodeproc import free_port

    out = run("echo", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.strip()


def test_send_missing_path_fails_cleanly(tmp_path: Path) -> None:
    out = run("send", str(tmp_path / "nope"), "--to", "127.0.0.1:1")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "nope" in out.stderr


def test_receiving_side_never_imports_torch() -> None:
    """The SCP and the API must start fast and stay small: no torch/monai on import."""
    code = ("import sys, triage_node.scp, triage_node.cli, triage_node.scu, triage_node.store, "
            "triage_node.series, triage_node.tasks, triage_node.api, triage_node.api.app, "
            "triage_node.api.health, triage_node.store.worklist; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs_dcmtk
def test_phantom_studies_sent_to_the_node(tmp_path: Path) -> None:
    out = run("phantom", "--out", str(tmp_path / "ph"), "--studies", "2", "--seed", "3",
              "--slices", "6")
    assert out.returncode == 0, out.stderr
    rows = (tmp_path / "ph" / "stage_2_train.csv").read_text().splitlines()
    assert rows[0] == "ID,Label" and len(rows) == 1 + 2 * 6 * 6
    with running_node(tmp_path) as node:
        sent = run("send", str(tmp_path / "ph"), "--to", f"127.0.0.1:{node.port}")
        assert sent.returncode == 0 and "sent 12 of 12" in sent.stdout, sent.stdout + sent.stderr
        listing = json.loads(run("series", "--json", "--config", str(node.config)).stdout)
        assert sorted(r["instance_count"] for r in listing) == [6, 6]
        assert {r["state"] for r in listing} == {"receiving"}


def test_phantom_bad_argument_exits_2(tmp_path: Path) -> None:
    out = run("phantom", "--out", str(tmp_path / "ph"), "--studies", "0")
    assert out.returncode == 2 and "studies" in out.stderr


def test_model_info(tmp_path: Path) -> None:
    from triage_node.model import random_artifact
    from triage_node.preprocess import PreprocessSpec

    spec = PreprocessSpec(size=64)
    random_artifact(tmp_path / "m.tnm", architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels)
    out = run("model", "info", str(tmp_path / "m.tnm"))
    assert out.returncode == 0 and "resnet18" in out.stdout and "sha256" in out.stdout
    as_json = json.loads(run("model", "info", "--json", str(tmp_path / "m.tnm")).stdout)
    assert as_json["labels"][0] == "any" and len(as_json["weights_sha256"]) == 64
    (tmp_path / "bad.tnm").write_text("junk")
    bad = run("model", "info", str(tmp_path / "bad.tnm"))
    assert bad.returncode == 1 and "not a model artifact" in bad.stderr
