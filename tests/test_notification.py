"""The whole path on real processes: storescu -> `serve` (SCP + worker + delivery loop on the
embedded transport) -> SR at a dcmtk storescp standing in for the PACS."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

from markers import needs_dcmtk
from nodeproc import DCMTK, DCMTK_ENV, free_port, running_node, storescu, wait_port
from pydicom import dcmread

from triage_node import store
from triage_node.domain import DeliveryState
from triage_node.model import random_artifact
from triage_node.phantom import generate_study
from triage_node.preprocess import PreprocessSpec

pytestmark = needs_dcmtk


def _api_port(config: Path) -> int:
    return int(tomllib.loads(config.read_text())["api"]["port"])


def test_serve_classifies_and_delivers_the_sr(tmp_path: Path) -> None:
    truth = generate_study(tmp_path / "ph", seed=61, n_slices=12, rows=96, cols=96,
                           positive=True)
    spec = PreprocessSpec(size=64)
    random_artifact(tmp_path / "m.tnm", architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=3)
    pacs_port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    with (tmp_path / "pacs.log").open("wb") as fh:
        pacs = subprocess.Popen([str(DCMTK / "storescp"), "--aetitle", "PACS",
                                 "--output-directory", str(received), str(pacs_port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_port(pacs_port, pacs)
        extra = (f'[queue]\nbroker_url = "sqla+sqlite:///{tmp_path / "queue.db"}"\n'
                 f'[model]\npath = "{tmp_path / "m.tnm"}"\n'
                 '[triage]\nrelease_settle_seconds = 0.5\n'
                 '[results]\nsend_negative = true\npoll_seconds = 0.2\n'
                 f'[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n')
        with running_node(tmp_path, extra=extra, command="serve") as node:
            assert storescu(node.port, [s.path for s in truth.slices]).returncode == 0
            engine = store.make_engine(node.database_url)
            factory = store.make_session_factory(engine)
            deadline = time.monotonic() + 120

            def sent() -> bool:  # the SR and the key-image SC
                rows = store.list_deliveries(factory, series_instance_uid=truth.series_uid)
                return len(rows) == 2 and all(r.state is DeliveryState.SENT for r in rows)

            while not sent():
                assert node.proc.poll() is None, node.log_text()[-3000:]
                assert time.monotonic() < deadline, node.log_text()[-3000:]
                time.sleep(0.1)
            result = store.get_result(factory, truth.series_uid)
            assert result is not None
            deliveries = store.list_deliveries(factory, series_instance_uid=truth.series_uid)
            # serve also runs the worklist API: healthy (database, broker, worker heartbeat)
            # and listing the series with its result and SR state.
            api = f"http://127.0.0.1:{_api_port(node.config)}"
            health = json.loads(urllib.request.urlopen(f"{api}/healthz", timeout=10).read())
            assert health["ok"], health
            rows = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{api}/api/worklist", headers={"X-Requested-With": "triage-node"}),
                timeout=10).read())["rows"]
            [row] = [r for r in rows if r["series_instance_uid"] == truth.series_uid]
            assert row["state"] == "done"
            engine.dispose()
            assert node.stop() == 0
        files = {dcmread(p).Modality: p for p in received.iterdir() if p.is_file()}
        assert sorted(files) == ["OT", "SR"], files
        sr, sc = dcmread(files["SR"]), dcmread(files["OT"])
        assert {sr.SOPInstanceUID, sc.SOPInstanceUID} == {d.sop_instance_uid
                                                          for d in deliveries}
        for ds in (sr, sc):
            assert ds.StudyInstanceUID == truth.study_uid, "filed into the patient's study"
            assert ds.SeriesInstanceUID != truth.series_uid, "in a series of its own"
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            result.key_sop_instance_uid
        assert sc.pixel_array.shape[2] == 3, "RGB: the slice with its heatmap"
        for path in files.values():
            check = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True,
                                   text=True, timeout=60)
            errors = [ln for ln in (check.stdout + check.stderr).splitlines()
                      if ln.startswith("Error")]
            assert errors == [], (path, errors)
    finally:
        pacs.terminate()
        pacs.wait(10)
