"""Tests of triage_node.model: networks, the artifact format and its refusals."""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from triage_node.domain import LABELS
from triage_node.errors import ArtifactError
from triage_node.model import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    FORMAT_VERSION,
    LoadedModel,
    ModelMeta,
    build_network,
    describe,
    load_artifact,
    random_artifact,
    read_meta,
    resolve_device,
    save_artifact,
)

PREPROCESS: dict[str, Any] = {
    "windows": [[40, 80], [80, 200], [40, 380]],
    "size": 64,
    "context": 0,
}
FAST_ARCH = "resnet18"


def _rewrite(path: Path, edit: dict[str, bytes | None]) -> None:
    """Rewrite the zip at ``path`` with some entries replaced (bytes) or dropped (None)."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    for name, data in edit.items():
        if data is None:
            entries.pop(name, None)
        else:
            entries[name] = data
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _edit_meta(path: Path, **changes: Any) -> None:
    """Change keys of meta.json inside the artifact, keeping the weights as they are."""
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("meta.json"))
    meta.update(changes)
    _rewrite(path, {"meta.json": json.dumps(meta).encode()})


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """A random resnet18 artifact with 3 input channels."""
    path = tmp_path / "model.tnm"
    random_artifact(path, architecture=FAST_ARCH, preprocess=PREPROCESS, in_channels=3, seed=1)
    return path


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_outputs_six_logits(arch: str) -> None:
    torch.manual_seed(0)
    net = build_network(arch, in_channels=5).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 5, 64, 64))
    assert out.shape == (2, len(LABELS))
    assert out.dtype == torch.float32
    # Logits, not probabilities: a random network puts some outside [0, 1].
    assert bool(((out < 0) | (out > 1)).any())


def test_default_architecture_is_known() -> None:
    assert DEFAULT_ARCHITECTURE in ARCHITECTURES


def test_build_network_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="vgg16"):
        build_network("vgg16", in_channels=3)


def test_build_network_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_network(FAST_ARCH, in_channels=0)
    with pytest.raises(TypeError, match="in_channels"):
        build_network(FAST_ARCH, in_channels=3.0)  # type: ignore[arg-type]


def test_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = build_network(DEFAULT_ARCHITECTURE, in_channels=3).eval()
    meta = ModelMeta(
        architecture=DEFAULT_ARCHITECTURE,
        in_channels=3,
        labels=LABELS,
        preprocess=PREPROCESS,
        thresholds={label: 0.3 for label in LABELS},
        version="1.2.3",
        created="2025-01-01T00:00:00Z",
        training={"studies": 10},
        metrics={"auc_any": 0.5},
    )
    path = tmp_path / "m.tnm"
    saved = save_artifact(path, net, meta)
    assert len(saved.weights_sha256) == 64
    assert saved == replace(meta, weights_sha256=saved.weights_sha256)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"

    loaded = load_artifact(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.meta == saved
    assert loaded.device == torch.device("cpu")
    assert loaded.path == path
    assert not loaded.network.training
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), loaded.network(x))


def test_read_meta_does_not_unpickle(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read_meta must not call torch.load")

    monkeypatch.setattr(torch, "load", forbidden)
    meta = read_meta(artifact)
    assert meta.architecture == FAST_ARCH
    assert meta.labels == LABELS
    assert meta.preprocess == PREPROCESS
    assert meta.thresholds == dict.fromkeys(LABELS, 0.5)
    assert meta.format_version == FORMAT_VERSION


def test_artifact_is_one_zip_with_meta_and_weights(artifact: Path) -> None:
    with zipfile.ZipFile(artifact) as archive:
        assert sorted(archive.namelist()) == ["meta.json", "weights.pt"]
        meta = json.loads(archive.read("meta.json"))
    assert meta["labels"] == list(LABELS)
    assert meta["created"].endswith("Z")


def test_tampered_weights_are_refused(artifact: Path) -> None:
    with zipfile.ZipFile(artifact) as archive:
        weights = bytearray(archive.read("weights.pt"))
    # Flip a byte in the tensor data (the end of the file is zip bookkeeping of torch.save).
    weights[len(weights) // 2] ^= 0xFF
    _rewrite(artifact, {"weights.pt": bytes(weights)})
    with pytest.raises(ArtifactError, match="checksum mismatch") as info:
        load_artifact(artifact)
    assert str(artifact) in str(info.value)


def test_corrupt_zip_entry_is_refused(artifact: Path) -> None:
    # Damage the stored bytes in place, so the zip's own CRC no longer matches.
    data = bytearray(artifact.read_bytes())
    with zipfile.ZipFile(artifact) as archive:
        info = archive.getinfo("weights.pt")
    data[info.header_offset + 200 + info.compress_size // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"corrupt|checksum"):
        load_artifact(artifact)


def test_wrong_labels_are_refused(artifact: Path) -> None:
    _edit_meta(artifact, labels=list(reversed(LABELS)))
    with pytest.raises(ArtifactError, match="label order"):
        load_artifact(artifact)


def test_unknown_architecture_is_refused(artifact: Path) -> None:
    _edit_meta(artifact, architecture="transformer-xxl")
    with pytest.raises(ArtifactError, match="unknown architecture 'transformer-xxl'"):
        load_artifact(artifact)


def test_future_format_version_is_refused(artifact: Path) -> None:
    _edit_meta(artifact, format_version=FORMAT_VERSION + 1)
    for reader in (read_meta, load_artifact):
        with pytest.raises(ArtifactError, match=r"format_version 2.*upgrade"):
            reader(artifact)


def test_wrong_channel_count_is_refused(artifact: Path) -> None:
    # Checksum intact, but the weights belong to a 3-channel network.
    _edit_meta(artifact, in_channels=9)
    with pytest.raises(ArtifactError, match="do not fit"):
        load_artifact(artifact)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tnm"
    for reader in (read_meta, load_artifact):
        with pytest.raises(ArtifactError, match=r"nope\.tnm does not exist"):
            reader(missing)


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"definitely not a zip file" * 10)
    with pytest.raises(ArtifactError, match="not a zip"):
        load_artifact(path)


def test_missing_meta_and_bad_json_are_refused(artifact: Path) -> None:
    _rewrite(artifact, {"meta.json": b"{not json"})
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_meta(artifact)
    _rewrite(artifact, {"meta.json": None})
    with pytest.raises(ArtifactError, match=r"no meta\.json"):
        read_meta(artifact)


def test_save_refuses_inconsistent_meta(tmp_path: Path) -> None:
    net = build_network(FAST_ARCH, in_channels=3)
    meta = ModelMeta(
        architecture=FAST_ARCH,
        in_channels=3,
        labels=LABELS,
        preprocess={},
        thresholds=dict.fromkeys(LABELS, 0.5),
        version="x",
        created="2025-01-01T00:00:00Z",
    )
    path = tmp_path / "m.tnm"
    with pytest.raises(ValueError, match="labels"):
        save_artifact(path, net, replace(meta, labels=LABELS[1:]))
    with pytest.raises(ValueError, match="thresholds"):
        save_artifact(path, net, replace(meta, thresholds={"any": 0.5}))
    with pytest.raises(ValueError, match="does not match"):
        save_artifact(path, net, replace(meta, in_channels=4))
    with pytest.raises(ValueError, match="does not match"):
        save_artifact(path, net, replace(meta, architecture="resnet34"))
    assert not list(tmp_path.iterdir())


def test_random_artifact_is_deterministic(tmp_path: Path) -> None:
    state_before = torch.get_rng_state()
    a = random_artifact(tmp_path / "a.tnm", architecture=FAST_ARCH, preprocess={}, in_channels=3)
    b = random_artifact(tmp_path / "b.tnm", architecture=FAST_ARCH, preprocess={}, in_channels=3)
    c = random_artifact(
        tmp_path / "c.tnm", architecture=FAST_ARCH, preprocess={}, in_channels=3, seed=1
    )
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != c.weights_sha256
    assert a.version == "0.0.0-untrained"
    assert torch.equal(torch.get_rng_state(), state_before), "global RNG was disturbed"


def test_resolve_device_on_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "cuda:x", "cuda:", "tpu:0", ""):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    # No CUDA: asking for it is a clear error rather than a failure on the first series.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="not available"):
            resolve_device(spec)
    # With CUDA present, "cuda" and "cuda:N" are accepted as written.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_describe_names_the_essentials(artifact: Path) -> None:
    meta = read_meta(artifact)
    text = describe(meta)
    assert FAST_ARCH in text
    assert "0.0.0-untrained" in text
    assert meta.weights_sha256 in text
    assert "any=0.5" in text


def test_model_imports_only_level_zero_modules() -> None:
    source = Path(sys.modules["triage_node.model"].__file__ or "").read_text()
    ours = {
        line.split()[1]
        for line in source.splitlines()
        if line.startswith(("import triage_node", "from triage_node"))
    }
    assert ours <= {"triage_node.domain", "triage_node.errors"}
