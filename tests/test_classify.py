"""From received slices to a stored result: SCP -> assembly -> classify_series -> database."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from markers import needs_dcmtk
from nodeproc import running_node, storescu

from triage_node import store
from triage_node.classify import classify_series
from triage_node.config import TriageConfig
from triage_node.domain import EventKind, SeriesState, utcnow
from triage_node.model import load_artifact, random_artifact
from triage_node.phantom import generate_study
from triage_node.pipeline import Predictor
from triage_node.preprocess import PreprocessSpec
from triage_node.series import assemble_due
from triage_node.spool import Spool

pytestmark = needs_dcmtk


def test_received_series_classified_and_stored(tmp_path: Path) -> None:
    truth = generate_study(tmp_path / "ph", seed=8, n_slices=12, rows=96, cols=96,
                           positive=True)
    spec = PreprocessSpec(size=64)
    random_artifact(tmp_path / "m.tnm", architecture="resnet18", preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=1)
    predictor = Predictor(load_artifact(tmp_path / "m.tnm"), batch_size=5)
    with running_node(tmp_path) as node:
        out = storescu(node.port, [s.path for s in truth.slices])
        assert out.stderr.count("(Success)") == 12
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        # Far enough ahead that the stable time alone completes it (no race with the hint).
        decided = assemble_due(factory, TriageConfig(), now=utcnow() + dt.timedelta(minutes=2))
        assert [d.selected for d in decided] == [True]
        spool = Spool(node.spool)
        result = classify_series(factory, spool, predictor, truth.series_uid)
        assert result is not None
        assert classify_series(factory, spool, predictor, truth.series_uid) is None, \
            "idempotent: a done series is not classified again"
        stored = store.get_result(factory, truth.series_uid)
        assert stored is not None and stored.stored_at is not None
        assert [s[0] for s in stored.slices] == [s.sop_uid for s in truth.slices], \
            "slices in anatomical order"
        assert stored.probabilities == pytest.approx(result.probabilities)
        assert stored.key_sop_instance_uid in {s.sop_uid for s in truth.slices}
        assert stored.flagged == (stored.probabilities["any"] >= stored.threshold)
        assert stored.inference_started_at <= stored.inference_done_at <= stored.stored_at
        assert store.list_series(factory)[0].state is SeriesState.DONE
        [event] = store.list_events(factory, kinds=[EventKind.RESULT_STORED])
        assert event.series_instance_uid == truth.series_uid and event.actor.startswith("worker@")
        assert event.outcome == ("flagged" if stored.flagged else "negative")
        listing = json.loads(subprocess.run(
            [sys.executable, "-m", "triage_node.cli", "series", "--json", "--config",
             str(node.config)], capture_output=True, text=True, check=True).stdout)
        row = listing[0]
        assert row["state"] == "done" and row["result"]["flagged"] == stored.flagged
        assert row["result"]["probabilities"]["any"] == pytest.approx(stored.probabilities["any"])
        assert row["result"]["time_to_result_seconds"] >= 0
        engine.dispose()
