"""The classifier network and the one model artifact format.

An artifact is a single zip file holding two entries:

``meta.json``
    :class:`ModelMeta` as JSON: architecture, input channels, label order, the preprocessing
    parameters (stored verbatim, owned by :mod:`triage_node.preprocess`), operating thresholds,
    training summary, validation metrics, version, creation time and the SHA-256 of
    ``weights.pt``.
``weights.pt``
    ``torch.save(network.state_dict())``, loaded back with ``weights_only=True``.

:func:`load_artifact` refuses an artifact it cannot trust (missing, not a zip, corrupt, a
checksum mismatch, another label order, an unknown architecture, a newer format) with an
:class:`~triage_node.errors.ArtifactError` naming the file. :func:`read_meta` reads only the
metadata and never unpickles anything, so ``triage-node model info`` is cheap and safe.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.densenet import DenseNet121
from monai.networks.nets.efficientnet import EfficientNetBN
from monai.networks.nets.resnet import resnet18, resnet34, resnet50

from triage_node.domain import LABELS
from triage_node.errors import ArtifactError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelMeta",
    "build_network",
    "describe",
    "load_artifact",
    "random_artifact",
    "read_meta",
    "resolve_device",
    "save_artifact",
]

#: Newest artifact format this code writes and reads.
FORMAT_VERSION = 1

_META_ENTRY = "meta.json"
_WEIGHTS_ENTRY = "weights.pt"


def _efficientnet_b0(in_channels: int, num_classes: int) -> torch.nn.Module:
    return EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        progress=False,
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=num_classes,
    )


def _densenet121(in_channels: int, num_classes: int) -> torch.nn.Module:
    return DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        pretrained=False,
    )


def _resnet(depth: int) -> Callable[[int, int], torch.nn.Module]:
    factory = {18: resnet18, 34: resnet34, 50: resnet50}[depth]

    def build(in_channels: int, num_classes: int) -> torch.nn.Module:
        # MONAI's ResNet defaults to a stride-1 stem (made for 3D volumes); the 2D ImageNet
        # design strides the 7x7 stem by 2, which quarters the compute at 256x256.
        net: torch.nn.Module = factory(
            pretrained=False,
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=num_classes,
            conv1_t_size=7,
            conv1_t_stride=2,
        )
        return net

    return build


def _small_cnn(in_channels: int, num_classes: int) -> torch.nn.Module:
    # A small CNN for CPU CI and the shipped demo model (0.53 M parameters, 2.1 MB): four
    # stages of two MONAI conv-BN-ReLU units (the first strided), global average pooling
    # (so any input size works), dropout, one linear layer.
    from monai.networks.blocks.convolutions import Convolution

    layers: list[torch.nn.Module] = []
    channels_in = in_channels
    for channels_out in (24, 48, 96, 160):
        for stride in (2, 1):
            layers.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=channels_in,
                    out_channels=channels_out,
                    strides=stride,
                    kernel_size=3,
                    act="RELU",
                    norm="BATCH",
                )
            )
            channels_in = channels_out
    return torch.nn.Sequential(
        *layers,
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(channels_in, num_classes),
    )


_BUILDERS: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "efficientnet-b0": _efficientnet_b0,
    "densenet121": _densenet121,
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "small-cnn": _small_cnn,
}

#: Architectures :func:`build_network` knows, by the name stored in artifacts.
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)

#: EfficientNet-B0. bench/models.py on this 2-core CPU (batch 16, 3x256x256, noisy host) gave
#: 11-18 slices/s against DenseNet121 4-8 and ResNet50 4-7, with the fewest parameters (4.0 M);
#: EfficientNets were the slice encoders of the strong RSNA 2019 ICH solutions and match
#: ImageNet accuracy of ResNet50 / DenseNet121 at a fraction of the FLOPs, so it gives the best
#: expected accuracy per second. ResNet18 (25-29 slices/s) is faster but a weaker encoder.
DEFAULT_ARCHITECTURE = "efficientnet-b0"


def build_network(
    architecture: str, in_channels: int, num_classes: int = len(LABELS)
) -> torch.nn.Module:
    """Build a randomly initialised 2D classifier (never pretrained, never downloads).

    Parameters
    ----------
    architecture : str
        One of :data:`ARCHITECTURES`.
    in_channels : int
        Input channels: windows times context slices, as the preprocessing produces them.
    num_classes : int, optional
        Outputs; six (:data:`~triage_node.domain.LABELS`) by default.

    Returns
    -------
    torch.nn.Module
        A network mapping ``(N, in_channels, H, W)`` to ``(N, num_classes)`` logits; the
        caller applies the sigmoid.

    Raises
    ------
    TypeError
        If ``in_channels`` or ``num_classes`` is not an int.
    ValueError
        If ``architecture`` is unknown or a count is not positive.
    """
    builder = _BUILDERS.get(architecture)
    if builder is None:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return builder(in_channels, num_classes)


@dataclass(frozen=True)
class ModelMeta:
    """Everything an artifact says about its model, apart from the weights.

    Attributes
    ----------
    architecture : str
        Name in :data:`ARCHITECTURES`.
    in_channels : int
        Input channels the network expects.
    labels : tuple of str
        Output order; must equal :data:`~triage_node.domain.LABELS` to load.
    preprocess : dict
        Preprocessing parameters (windows, size, context) as JSON, stored verbatim.
    thresholds : dict of str to float
        Operating threshold per label; ``"any"`` decides whether a series is flagged.
    version : str
        Model version.
    created : str
        Creation time, ISO 8601 UTC.
    weights_sha256 : str
        SHA-256 (hex) of the ``weights.pt`` bytes; filled in by :func:`save_artifact`.
    format_version : int
        Artifact format version.
    training : dict
        Summary of the training data.
    metrics : dict
        Validation metrics.
    name : str
        Model name.
    """

    architecture: str
    in_channels: int
    labels: tuple[str, ...]
    preprocess: dict[str, Any]
    thresholds: dict[str, float]
    version: str
    created: str
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = "triage-node-ich"

    def to_json(self) -> str:
        """Return the metadata as pretty-printed JSON (the ``meta.json`` entry)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, allow_nan=False) + "\n"


@dataclass
class LoadedModel:
    """A verified artifact, ready for inference.

    Attributes
    ----------
    meta : ModelMeta
        The artifact's metadata.
    network : torch.nn.Module
        The network in ``eval()`` mode, on ``device``.
    device : torch.device
        Where the network lives.
    path : Path
        The artifact file it was loaded from.
    """

    meta: ModelMeta
    network: torch.nn.Module
    device: torch.device
    path: Path


def utc_now() -> str:
    """Return the current time as ISO 8601 UTC with seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device setting into a torch device.

    Parameters
    ----------
    spec : str, optional
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    TypeError
        If ``spec`` is not a str.
    ValueError
        If ``spec`` is not one of the forms above, or names a CUDA device that is not present
        (failing at start-up beats failing on the first series).
    """
    if not isinstance(spec, str):
        raise TypeError(f"device must be a str, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if text != "cuda" and not index_text.isdigit():
            raise ValueError(f"device {spec!r}: expected 'cuda:N' with N a device index")
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine")
        index = int(index_text) if index_text else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return torch.device(text)
    raise ValueError(f"device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _check_meta_for_save(meta: ModelMeta) -> None:
    """Raise ValueError if ``meta`` describes an artifact that load_artifact would refuse."""
    if meta.architecture not in ARCHITECTURES:
        raise ValueError(
            f"meta.architecture {meta.architecture!r} is unknown; known: {', '.join(ARCHITECTURES)}"
        )
    if tuple(meta.labels) != LABELS:
        raise ValueError(f"meta.labels must be {LABELS}, got {tuple(meta.labels)}")
    if set(meta.thresholds) != set(LABELS):
        raise ValueError(
            f"meta.thresholds must have exactly the keys {LABELS}, got {sorted(meta.thresholds)}"
        )
    for label, value in meta.thresholds.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"meta.thresholds[{label!r}] must be in [0, 1], got {value}")
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"meta.format_version must be {FORMAT_VERSION}, got {meta.format_version}")


def save_artifact(path: Path, network: torch.nn.Module, meta: ModelMeta) -> ModelMeta:
    """Write ``network`` and ``meta`` to one artifact file, atomically.

    The file appears complete or not at all: it is written next to ``path``, fsynced and
    renamed over it.

    Parameters
    ----------
    path : Path
        Destination file (conventionally ``*.tnm``); its directory must exist.
    network : torch.nn.Module
        The network; its ``state_dict()`` must match ``build_network(meta.architecture,
        meta.in_channels, len(LABELS))`` key for key and shape for shape.
    meta : ModelMeta
        Metadata; ``weights_sha256`` is ignored and recomputed.

    Returns
    -------
    ModelMeta
        The metadata as saved, with ``weights_sha256`` filled in.

    Raises
    ------
    ValueError
        If ``meta`` is inconsistent (labels, thresholds, architecture) or the network does
        not match it.
    ArtifactError
        If the file cannot be written.
    """
    path = Path(path)
    _check_meta_for_save(meta)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    # Shapes only: on the meta device nothing is allocated and no global RNG is consumed.
    with torch.device("meta"):
        reference = build_network(meta.architecture, meta.in_channels).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if expected != actual:
        differing = sorted(set(expected) ^ set(actual)) or sorted(
            k for k in expected if expected[k] != actual[k]
        )
        raise ValueError(
            f"network does not match architecture {meta.architecture!r} with "
            f"in_channels={meta.in_channels}: differing parameters {differing[:5]}"
        )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    saved = replace(meta, labels=tuple(meta.labels), weights_sha256=_sha256(weights))
    try:
        with _atomic_file(path) as handle, zipfile.ZipFile(handle, "w") as archive:
            archive.writestr(_META_ENTRY, saved.to_json(), compress_type=zipfile.ZIP_DEFLATED)
            # Float weights barely compress; storing them keeps save and load fast.
            archive.writestr(_WEIGHTS_ENTRY, weights, compress_type=zipfile.ZIP_STORED)
    except OSError as exc:
        raise ArtifactError(f"cannot write model artifact {path}: {exc}") from exc
    return saved


def read_meta(path: Path) -> ModelMeta:
    """Read an artifact's metadata without loading (or unpickling) the weights.

    Parameters
    ----------
    path : Path
        The artifact file.

    Returns
    -------
    ModelMeta

    Raises
    ------
    ArtifactError
        If the file is missing, not an artifact, its metadata is malformed, or its format
        is newer than this code understands.
    """
    path = Path(path)
    with _open_archive(path) as archive:
        return _parse_meta(path, _read_entry(path, archive, _META_ENTRY))


def load_artifact(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load and verify an artifact.

    Parameters
    ----------
    path : Path
        The artifact file.
    device : str or torch.device, optional
        Where to put the network; a str goes through :func:`resolve_device`.

    Returns
    -------
    LoadedModel
        The network in ``eval()`` mode on ``device``, with its metadata.

    Raises
    ------
    ArtifactError
        If the file is missing or corrupt, the weights do not match the recorded SHA-256
        ("checksum mismatch"), the label order differs from
        :data:`~triage_node.domain.LABELS`, the architecture is unknown, the format is newer
        than this code, or the weights do not fit the architecture.
    ValueError
        If ``device`` is not a valid device setting.
    """
    path = Path(path)
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    with _open_archive(path) as archive:
        meta = _parse_meta(path, _read_entry(path, archive, _META_ENTRY))
        weights = _read_entry(path, archive, _WEIGHTS_ENTRY)
    if meta.labels != LABELS:
        raise ArtifactError(
            f"model artifact {path}: label order {list(meta.labels)} differs from this "
            f"version's {list(LABELS)}"
        )
    if meta.architecture not in ARCHITECTURES:
        raise ArtifactError(
            f"model artifact {path}: unknown architecture {meta.architecture!r} "
            f"(known: {', '.join(ARCHITECTURES)})"
        )
    digest = _sha256(weights)
    if digest != meta.weights_sha256:
        raise ArtifactError(
            f"model artifact {path}: checksum mismatch: weights sha256 is {digest}, "
            f"metadata says {meta.weights_sha256 or '(none)'}; the file is corrupt or was modified"
        )
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles / zip data
        raise ArtifactError(f"model artifact {path}: cannot read weights: {exc}") from exc
    if not isinstance(state, dict):
        raise ArtifactError(
            f"model artifact {path}: weights are a {type(state).__name__}, not a state dict"
        )
    try:
        network = build_network(meta.architecture, meta.in_channels, len(meta.labels))
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ArtifactError(
            f"model artifact {path}: weights do not fit {meta.architecture!r} with "
            f"in_channels={meta.in_channels}: {exc}"
        ) from exc
    network.to(target).eval()
    return LoadedModel(meta=meta, network=network, device=target, path=path)


def random_artifact(
    path: Path,
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    preprocess: dict[str, Any],
    in_channels: int,
    seed: int = 0,
    version: str = "0.0.0-untrained",
) -> ModelMeta:
    """Save a deterministically random-initialised model (for tests, and before training).

    The same ``architecture``, ``in_channels`` and ``seed`` always give the same weights and
    so the same ``weights_sha256``. The global torch RNG is left as it was.

    Parameters
    ----------
    path : Path
        Destination file.
    architecture : str, optional
        One of :data:`ARCHITECTURES`.
    preprocess : dict
        Preprocessing parameters to store.
    in_channels : int
        Input channels.
    seed : int, optional
        Initialisation seed.
    version : str, optional
        Version string to record.

    Returns
    -------
    ModelMeta
        The metadata as saved; all thresholds are 0.5.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(architecture, in_channels)
    meta = ModelMeta(
        architecture=architecture,
        in_channels=in_channels,
        labels=LABELS,
        preprocess=dict(preprocess),
        thresholds=dict.fromkeys(LABELS, 0.5),
        version=version,
        created=utc_now(),
        training={"note": "untrained: random initialisation", "seed": seed},
    )
    return save_artifact(path, network, meta)


def describe(meta: ModelMeta) -> str:
    """Return a human-readable summary of ``meta`` for ``triage-node model info``.

    Parameters
    ----------
    meta : ModelMeta

    Returns
    -------
    str
        Several ``key: value`` lines, ending without a newline.
    """

    def as_json(value: Any) -> str:
        return json.dumps(value, sort_keys=True) if value else "(none)"

    thresholds = ", ".join(f"{k}={meta.thresholds[k]:g}" for k in meta.thresholds)
    lines = [
        f"name:           {meta.name}",
        f"version:        {meta.version}",
        f"created:        {meta.created}",
        f"architecture:   {meta.architecture}",
        f"in_channels:    {meta.in_channels}",
        f"labels:         {', '.join(meta.labels)}",
        f"thresholds:     {thresholds or '(none)'}",
        f"preprocess:     {as_json(meta.preprocess)}",
        f"training:       {as_json(meta.training)}",
        f"metrics:        {as_json(meta.metrics)}",
        f"weights sha256: {meta.weights_sha256 or '(not saved)'}",
        f"format:         {meta.format_version}",
    ]
    return "\n".join(lines)


def _sha256(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[io.BufferedWriter]:
    """Yield a temp file beside ``path``; on success fsync it and rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _open_archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """Open ``path`` as a zip, translating every failure into ArtifactError."""
    if not path.is_file():
        raise ArtifactError(f"model artifact {path} does not exist or is not a file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(
            f"model artifact {path} is not a model artifact (not a zip): {exc}"
        ) from exc
    with archive:
        yield archive


def _read_entry(path: Path, archive: zipfile.ZipFile, entry: str) -> bytes:
    """Return one entry's bytes; a missing or damaged entry is an ArtifactError."""
    try:
        return archive.read(entry)
    except KeyError as exc:
        raise ArtifactError(f"model artifact {path} has no {entry} entry") from exc
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as exc:
        raise ArtifactError(f"model artifact {path}: entry {entry} is corrupt: {exc}") from exc


_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "architecture": str,
    "in_channels": int,
    "labels": list,
    "preprocess": dict,
    "thresholds": dict,
    "version": str,
    "created": str,
    "weights_sha256": str,
    "format_version": int,
    "training": dict,
    "metrics": dict,
    "name": str,
}


def _parse_meta(path: Path, raw: bytes) -> ModelMeta:
    """Validate and build a ModelMeta from ``meta.json`` bytes."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model artifact {path}: meta.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"model artifact {path}: meta.json is not a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"model artifact {path}: meta.json has no integer format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"model artifact {path} has format_version {version}; this triage-node reads "
            f"format {FORMAT_VERSION} or older - upgrade triage-node to use it"
        )
    if version < 1:
        raise ArtifactError(f"model artifact {path}: invalid format_version {version}")
    missing = [k for k in _META_FIELDS if k not in data]
    if missing:
        raise ArtifactError(f"model artifact {path}: meta.json lacks {', '.join(missing)}")
    for key, kind in _META_FIELDS.items():
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ArtifactError(
                f"model artifact {path}: meta.json {key} has type {type(value).__name__}"
            )
    labels = data["labels"]
    if not all(isinstance(label, str) for label in labels):
        raise ArtifactError(f"model artifact {path}: meta.json labels must be strings")
    thresholds = data["thresholds"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in thresholds.values()):
        raise ArtifactError(f"model artifact {path}: meta.json thresholds must be numbers")
    return ModelMeta(
        architecture=data["architecture"],
        in_channels=data["in_channels"],
        labels=tuple(labels),
        preprocess=data["preprocess"],
        thresholds={str(k): float(v) for k, v in thresholds.items()},
        version=data["version"],
        created=data["created"],
        weights_sha256=data["weights_sha256"],
        format_version=version,
        training=data["training"],
        metrics=data["metrics"],
        name=data["name"],
    )
