"""predict_series end to end on phantom DICOM with a (deterministic, untrained) artifact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from triage_node.domain import LABELS
from triage_node.errors import ArtifactError, InvalidDatasetError
from triage_node.model import load_artifact, random_artifact
from triage_node.phantom import generate_study
from triage_node.pipeline import Predictor
from triage_node.preprocess import PreprocessSpec


def _predictor(tmp_path: Path, *, context: int = 0, batch_size: int = 4,
               arch: str = "resnet18") -> Predictor:
    spec = PreprocessSpec(size=64, context=context)
    path = tmp_path / f"model-{context}.tnm"
    random_artifact(path, architecture=arch, preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=7)
    return Predictor(load_artifact(path), batch_size=batch_size)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantom")
    truth = generate_study(out, seed=11, n_slices=10, rows=128, cols=128, positive=True)
    return [s.path for s in truth.slices]


def test_shapes_order_and_key_slice(tmp_path: Path, study: list[Path]) -> None:
    pred = _predictor(tmp_path)
    shuffled = study[:]
    random.Random(1).shuffle(shuffled)
    result = pred.predict_series(shuffled)
    assert len(result.slices) == len(study)
    positions = [s.position for s in result.slices]
    assert positions == sorted(positions), "slices come back in anatomical order"
    assert set(result.probabilities) == set(LABELS)
    anys = [s.probabilities["any"] for s in result.slices]
    assert result.key_slice == int(np.argmax(anys))
    assert result.probabilities["any"] == pytest.approx(max(anys))
    assert result.flagged == (result.probabilities["any"] >= result.threshold)
    assert all(0.0 <= p <= 1.0 for s in result.slices for p in s.probabilities.values())
    assert result.key_sop_instance_uid == result.slices[result.key_slice].sop_instance_uid
    assert {"read", "preprocess", "forward", "total"} <= set(result.timings)
    assert result.model_sha256 and result.model_version


def test_deterministic_and_order_independent(tmp_path: Path, study: list[Path]) -> None:
    pred = _predictor(tmp_path)
    a = pred.predict_series(study)
    b = pred.predict_series(list(reversed(study)))
    assert [s.probabilities for s in a.slices] == [s.probabilities for s in b.slices]


@pytest.mark.parametrize("context", [0, 1])
def test_batches_match_the_three_steps(tmp_path: Path, study: list[Path], context: int) -> None:
    """Batch borders (and 2.5D neighbours across them) change nothing."""
    pred = _predictor(tmp_path, context=context, batch_size=3)
    ordered, x = pred.pre_process(study)
    assert x.shape == (len(study), pred.spec.channels, 64, 64)
    whole = pred.post_process(ordered, pred.predict(x))
    batched = pred.predict_series(study)
    for s, t in zip(whole.slices, batched.slices, strict=True):
        for lab in LABELS:
            assert s.probabilities[lab] == pytest.approx(t.probabilities[lab], abs=1e-5)


def test_datasets_accepted_as_well_as_paths(tmp_path: Path, study: list[Path]) -> None:
    pred = _predictor(tmp_path)
    from_paths = pred.predict_series(study)
    from_ds = pred.predict_series([dcmread(p) for p in study])
    assert from_paths.probabilities == from_ds.probabilities


def test_bad_inputs(tmp_path: Path) -> None:
    pred = _predictor(tmp_path)
    with pytest.raises(InvalidDatasetError):
        pred.predict_series([])
    (tmp_path / "x.dcm").write_bytes(b"nope")
    with pytest.raises(InvalidDatasetError):
        pred.predict_series([tmp_path / "x.dcm"])


def test_channel_mismatch_refused(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=64, context=1)
    path = tmp_path / "m.tnm"
    random_artifact(path, architecture="resnet18", preprocess=spec.to_dict(), in_channels=3)
    with pytest.raises(ArtifactError, match="channels"):
        Predictor(load_artifact(path))
