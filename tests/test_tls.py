"""DICOM TLS on the SCP with client certificates, against dcmtk storescu +tls: a client whose
certificate our [dicom.tls] ca trusts stores; an untrusted certificate, or none, is refused
during the handshake and nothing is stored. (Delivery over TLS: tests/test_delivery.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dicomfiles import make_ct_series
from nodeproc import DCMTK, running_node, storescu

from triage_node import store

pytestmark = pytest.mark.skipif(
    not (DCMTK / "storescu").exists() or shutil.which("openssl") is None,
    reason="dcmtk storescu and openssl are needed")


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_client_certificates_trusted_or_refused(tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path / "pki", "node")
    scanner_cert, scanner_key = _self_signed(tmp_path / "pki", "scanner")
    rogue_cert, rogue_key = _self_signed(tmp_path / "pki", "rogue")
    sent = make_ct_series(tmp_path / "in", 2, rows=32, cols=32)
    extra = (f'[dicom.tls]\ncert = "{server_cert}"\nkey = "{server_key}"\n'
             f'ca = "{scanner_cert}"\nrequire_client_cert = true\n')
    with running_node(tmp_path, extra=extra) as node:
        trusted = storescu(node.port, sent, extra=(
            "+tls", str(scanner_key), str(scanner_cert), "+cf", str(server_cert)))
        assert trusted.stderr.count("(Success)") == 2, trusted.stderr[-2000:]
        rogue = storescu(node.port, sent, extra=(
            "+tls", str(rogue_key), str(rogue_cert), "+cf", str(server_cert)))
        assert rogue.returncode != 0 and "(Success)" not in rogue.stderr
        anonymous = storescu(node.port, sent, extra=("+tla", "+cf", str(server_cert)))
        assert anonymous.returncode != 0 and "(Success)" not in anonymous.stderr
        engine = store.make_engine(node.database_url)
        assert store.count_instances(store.make_session_factory(engine)) == 2
        engine.dispose()
        assert node.proc.poll() is None, "refusals do not take the node down"
