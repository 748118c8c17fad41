"""Training data: labels, the DICOM header index, the patient-level split and the slice cache.

Sources of labels
    * the RSNA layout (:func:`read_rsna_labels`): ``stage_2_train.csv`` with rows
      ``ID_<image>_<label>,<0|1>``, six per image; exact duplicate rows (present in the real
      file) are dropped, conflicting ones keep the positive label and are counted;
    * a generic CSV (:func:`read_generic_labels`): a ``path`` column (relative to the CSV's
      folder, or absolute) and one column per label in :data:`~triage_node.domain.LABELS`.

The header index (:func:`build_index`)
    Series and patient grouping come from the DICOM headers (StudyInstanceUID,
    SeriesInstanceUID, PatientID, slice position). Reading 750k headers takes long, so they
    are read once and kept in a CSV index; a later run reads only files that are new to it
    and drops entries whose files are gone.

The split (:func:`split_patients`)
    By patient, never by slice, multilabel-stratified on the patients' labels (the OR of
    their slices) with ``iterstrat``'s ``MultilabelStratifiedShuffleSplit``, seeded.

The slice cache (:class:`SliceCache`)
    Each series is read once, ordered with :func:`triage_node.preprocess.order_slices` and
    run through :func:`triage_node.preprocess.preprocess_series` (context 0: the 2.5D
    neighbours are stacked when a slice is drawn, exactly as ``preprocess_series`` stacks
    them) and kept as a float16 ``.npy`` per series, memory-mapped by the datasets. The cache
    key is the SHA-256 of the windows, the size and the series' SOP Instance UIDs, so another
    preprocessing never reads a stale file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.context
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage_node.domain import LABELS
from triage_node.errors import InvalidDatasetError
from triage_node.preprocess import PreprocessSpec, order_slices, preprocess_series, slice_position

__all__ = [
    "INDEX_FIELDS",
    "IndexEntry",
    "LabelTable",
    "SliceCache",
    "SliceRecord",
    "build_index",
    "cached_records",
    "describe_records",
    "detect_label_format",
    "join_records",
    "load_records",
    "normalize_id",
    "read_generic_labels",
    "read_rsna_labels",
    "series_groups",
    "split_patients",
]

log = logging.getLogger("triage_node.train")

#: Columns of the header index CSV.
INDEX_FIELDS: tuple[str, ...] = (
    "path",
    "image_id",
    "study_uid",
    "series_uid",
    "patient_id",
    "position",
    "manufacturer",
    "size",
    "mtime_ns",
)
_HEADER_TAGS = [
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "Manufacturer",
]

LabelArray = NDArray[np.uint8]


def normalize_id(image_id: str) -> str:
    """An image id without the RSNA ``ID_`` prefix (RSNA SOP UIDs carry it, phantoms don't)."""
    return image_id[3:] if image_id.startswith("ID_") else image_id


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Header facts of one DICOM file; ``path`` is relative to the indexed root."""

    path: str
    image_id: str
    study_uid: str
    series_uid: str
    patient_id: str
    position: float
    manufacturer: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SliceRecord:
    """One labelled slice: where it is, what it belongs to, its six labels (LABELS order)."""

    path: Path
    image_id: str
    study_uid: str
    series_uid: str
    patient_id: str
    position: float
    manufacturer: str
    labels: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LabelTable:
    """Labels by normalised image id, plus what was odd about the file."""

    labels: Mapping[str, tuple[int, ...]]
    duplicates: int = 0
    conflicts: int = 0
    paths: Mapping[str, Path] | None = None


# -- labels ---------------------------------------------------------------------------------


def detect_label_format(csv_path: Path) -> str:
    """``"rsna"`` for an ``ID,Label`` file, ``"generic"`` for one with a ``path`` column.

    Raises
    ------
    ValueError
        If the header is neither; the message names the file and its columns.
    """
    with Path(csv_path).open(newline="") as fh:
        header = next(csv.reader(fh), [])
    columns = [c.strip() for c in header]
    if columns[:2] == ["ID", "Label"]:
        return "rsna"
    if "path" in columns:
        return "generic"
    raise ValueError(
        f"labels {csv_path}: header {columns!r} is neither the RSNA 'ID,Label' layout nor a "
        f"generic CSV with a 'path' column and the columns {', '.join(LABELS)}"
    )


def read_rsna_labels(csv_path: Path) -> LabelTable:
    """Read ``stage_2_train.csv`` (``ID_<image>_<label>,<0|1>``, six rows per image).

    Parameters
    ----------
    csv_path : Path
        The labels file.

    Returns
    -------
    LabelTable
        Six labels per image id (``ID_`` prefix removed). Exact duplicates are counted in
        ``duplicates``; a label given both 0 and 1 keeps 1 and is counted in ``conflicts``.

    Raises
    ------
    ValueError
        On a malformed row, an unknown label name or an image with fewer than six labels;
        the message names the file and line or image.
    """
    csv_path = Path(csv_path)
    index = {label: i for i, label in enumerate(LABELS)}
    partial: dict[str, list[int]] = {}
    duplicates = conflicts = 0
    with csv_path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [c.strip() for c in header[:2]] != ["ID", "Label"]:
            raise ValueError(f"labels {csv_path}: expected the header 'ID,Label', got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"labels {csv_path} line {line}: expected 2 fields, got {row!r}")
            image, sep, label = row[0].strip().rpartition("_")
            if not sep or label not in index or not image:
                raise ValueError(
                    f"labels {csv_path} line {line}: ID {row[0]!r} is not "
                    f"ID_<image>_<label> with a label in {LABELS}"
                )
            value_text = row[1].strip()
            if value_text not in ("0", "1"):
                raise ValueError(
                    f"labels {csv_path} line {line}: Label must be 0 or 1, got {row[1]!r}"
                )
            value = int(value_text)
            slot = partial.setdefault(normalize_id(image), [-1] * len(LABELS))
            j = index[label]
            if slot[j] == value:
                duplicates += 1
            elif slot[j] == -1:
                slot[j] = value
            else:
                conflicts += 1
                slot[j] = 1
    labels: dict[str, tuple[int, ...]] = {}
    for image, values in partial.items():
        if -1 in values:
            missing = [LABELS[j] for j, v in enumerate(values) if v == -1]
            raise ValueError(f"labels {csv_path}: image {image!r} has no {', '.join(missing)} row")
        labels[image] = tuple(values)
    if not labels:
        raise ValueError(f"labels {csv_path}: no labelled image")
    return LabelTable(labels, duplicates, conflicts)


def read_generic_labels(csv_path: Path) -> LabelTable:
    """Read a CSV with a ``path`` column and one 0/1 column per label.

    Parameters
    ----------
    csv_path : Path
        The labels file; relative paths in it are relative to its folder.

    Returns
    -------
    LabelTable
        Labels keyed by the resolved path (as a string); ``paths`` maps the same keys to
        the files. The index later replaces the keys by SOP Instance UIDs.

    Raises
    ------
    ValueError
        If a column is missing or a value is not 0 or 1; the message names the file, line
        and column.
    """
    csv_path = Path(csv_path)
    labels: dict[str, tuple[int, ...]] = {}
    paths: dict[str, Path] = {}
    duplicates = 0
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", *LABELS) if c not in columns]
        if missing:
            raise ValueError(f"labels {csv_path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            path = Path(row["path"])
            if not path.is_absolute():
                path = csv_path.parent / path
            values = []
            for label in LABELS:
                if row[label] not in ("0", "1"):
                    raise ValueError(
                        f"labels {csv_path} line {line}: column {label!r} must be 0 or 1, "
                        f"got {row[label]!r}"
                    )
                values.append(int(row[label]))
            key = str(path.resolve())
            duplicates += key in labels
            labels[key] = tuple(values)
            paths[key] = path
    if not labels:
        raise ValueError(f"labels {csv_path}: no labelled image")
    return LabelTable(labels, duplicates, 0, paths)


# -- the header index -----------------------------------------------------------------------


def _read_header(root: str, rel: str) -> IndexEntry | str:
    """One file's index entry, or an error message (runs in worker processes)."""
    full = os.path.join(root, rel)
    try:
        stat = os.stat(full)
        ds = dcmread(full, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        sop = str(ds.get("SOPInstanceUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "")
        if not sop or not series:
            return f"{rel}: no SOPInstanceUID/SeriesInstanceUID"
        position = slice_position(ds)
    except (OSError, InvalidDatasetError, ValueError, TypeError, AttributeError) as exc:
        return f"{rel}: {exc}"
    except Exception as exc:  # pydicom raises a wide range on damaged files
        return f"{rel}: {type(exc).__name__}: {exc}"
    return IndexEntry(
        path=rel,
        image_id=normalize_id(sop),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=series,
        patient_id=str(ds.get("PatientID", "") or "") or f"(no PatientID) {series}",
        position=position,
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


def _read_headers(root: str, rels: Sequence[str]) -> list[IndexEntry | str]:
    """Headers of a chunk of files (one task for the process pool)."""
    return [_read_header(root, rel) for rel in rels]


def _walk_dicom(root: Path) -> list[str]:
    """Relative paths of every ``*.dcm`` under ``root``, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(".dcm"):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    found.sort()
    return found


def _load_index(index_path: Path) -> dict[str, IndexEntry]:
    """Entries of an existing index by path; an unreadable index counts as empty."""
    entries: dict[str, IndexEntry] = {}
    try:
        with index_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != INDEX_FIELDS:
                log.warning("index %s has other columns; rebuilding it", index_path)
                return {}
            for row in reader:
                entry = IndexEntry(
                    path=row["path"],
                    image_id=row["image_id"],
                    study_uid=row["study_uid"],
                    series_uid=row["series_uid"],
                    patient_id=row["patient_id"],
                    position=float(row["position"]),
                    manufacturer=row["manufacturer"],
                    size=int(row["size"]),
                    mtime_ns=int(row["mtime_ns"]),
                )
                entries[entry.path] = entry
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, csv.Error) as exc:
        log.warning("index %s is unreadable (%s); rebuilding it", index_path, exc)
        return {}
    return entries


def _write_index(index_path: Path, entries: Iterable[IndexEntry]) -> None:
    """Write the index atomically (temp file + rename)."""
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(INDEX_FIELDS)
        for e in entries:
            writer.writerow(
                [e.path, e.image_id, e.study_uid, e.series_uid, e.patient_id, repr(e.position),
                 e.manufacturer, e.size, e.mtime_ns]
            )
    os.replace(tmp, index_path)


def build_index(
    root: Path,
    index_path: Path,
    *,
    files: Sequence[str] | None = None,
    workers: int = 0,
    progress: bool = False,
) -> list[IndexEntry]:
    """Index the DICOM headers under ``root``, reusing ``index_path`` where it is current.

    An existing entry is reused when its file still has the same size and modification
    time; other files are read (``stop_before_pixels``, a handful of tags). Unreadable files
    are logged and left out.

    Parameters
    ----------
    root : Path
        Folder the paths are relative to.
    index_path : Path
        The CSV index to read and (re)write.
    files : sequence of str, optional
        Paths relative to ``root`` to index; default every ``*.dcm`` below ``root``.
    workers : int, optional
        Processes reading headers; 0 reads in this process.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    list of IndexEntry
        One per readable file, in path order.

    Raises
    ------
    ValueError
        If ``root`` is not a folder or ``workers`` is negative.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist or is not a folder")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    rels = sorted(set(files)) if files is not None else _walk_dicom(root)
    old = _load_index(Path(index_path))
    keep: dict[str, IndexEntry] = {}
    todo: list[str] = []
    for rel in rels:
        entry = old.get(rel)
        if entry is not None:
            try:
                stat = os.stat(root / rel)
            except OSError:
                continue
            if stat.st_size == entry.size and stat.st_mtime_ns == entry.mtime_ns:
                keep[rel] = entry
                continue
        todo.append(rel)
    failures: list[str] = []
    if todo:
        log.info("indexing %d DICOM header(s) under %s (%d reused)", len(todo), root, len(keep))
        chunk = 256
        chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
        bar = _progress(total=len(todo), desc="index", unit="file", enabled=progress)
        results: Iterator[list[IndexEntry | str]]
        pool: ProcessPoolExecutor | None = None
        if workers > 0:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_spawn())
            results = pool.map(_read_headers, [str(root)] * len(chunks), chunks)
        else:
            results = (_read_headers(str(root), c) for c in chunks)
        try:
            for batch in results:
                for item in batch:
                    if isinstance(item, IndexEntry):
                        keep[item.path] = item
                    else:
                        failures.append(item)
                bar.update(len(batch))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
        for message in failures[:20]:
            log.warning("not indexed: %s", message)
        if len(failures) > 20:
            log.warning("... and %d more file(s) not indexed", len(failures) - 20)
    entries = [keep[rel] for rel in sorted(keep)]
    if todo or len(entries) != len(old):
        _write_index(Path(index_path), entries)
    return entries


# -- records --------------------------------------------------------------------------------


def join_records(root: Path, entries: Sequence[IndexEntry], table: LabelTable) -> list[SliceRecord]:
    """Labelled slices: index entries whose image id (or path) has labels.

    Images labelled but not found are logged (the real RSNA folders miss a few); files
    without labels are ignored (unlabelled test images may share the folder).

    Raises
    ------
    ValueError
        If no labelled image was found in the index.
    """
    root = Path(root)
    records: list[SliceRecord] = []
    by_path = table.paths is not None
    seen: set[str] = set()
    for e in entries:
        path = root / e.path
        key = str(path.resolve()) if by_path else e.image_id
        labels = table.labels.get(key)
        if labels is None or key in seen:
            continue
        seen.add(key)
        records.append(
            SliceRecord(path, e.image_id, e.study_uid, e.series_uid, e.patient_id, e.position,
                        e.manufacturer, labels)
        )
    missing = len(table.labels) - len(seen)
    if missing:
        log.warning("%d labelled image(s) not found among the indexed DICOM files", missing)
    if not records:
        raise ValueError(
            f"no labelled image found under {root}: none of the {len(entries)} indexed file(s) "
            f"matches the labels' image ids"
        )
    return records


def load_records(
    data: Path,
    labels: Path,
    index_path: Path,
    *,
    label_format: str = "auto",
    workers: int = 0,
    progress: bool = False,
) -> list[SliceRecord]:
    """Labels plus header index: the labelled slices of a data set.

    Parameters
    ----------
    data : Path
        Folder with the DICOM files (the RSNA ``stage_2_train`` folder, searched
        recursively); for a generic CSV the folder its relative paths are indexed against
        (normally the CSV's folder).
    labels : Path
        ``stage_2_train.csv`` or a generic CSV.
    index_path : Path
        The header index cache file.
    label_format : {"auto", "rsna", "generic"}
        Format of ``labels``; ``auto`` looks at its header.
    workers, progress
        As for :func:`build_index`.

    Returns
    -------
    list of SliceRecord

    Raises
    ------
    ValueError
        On an unreadable labels file, a wrong ``label_format``, or no labelled image.
    """
    labels = Path(labels)
    if not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist")
    if label_format not in ("auto", "rsna", "generic"):
        raise ValueError(f"label_format must be auto, rsna or generic, got {label_format!r}")
    fmt = detect_label_format(labels) if label_format == "auto" else label_format
    if fmt == "rsna":
        table = read_rsna_labels(labels)
        entries = build_index(data, index_path, workers=workers, progress=progress)
    else:
        table = read_generic_labels(labels)
        assert table.paths is not None
        root = Path(data).resolve()
        rels = []
        for path in table.paths.values():
            try:
                rels.append(str(path.resolve().relative_to(root)))
            except ValueError as exc:
                raise ValueError(f"labels {labels}: {path} is not under --data {root}") from exc
        entries = build_index(root, index_path, files=rels, workers=workers, progress=progress)
        data = root
    if table.duplicates or table.conflicts:
        log.info("labels %s: %d duplicate row(s) dropped, %d conflicting label(s) set to 1",
                 labels, table.duplicates, table.conflicts)
    return join_records(data, entries, table)


def series_groups(records: Sequence[SliceRecord]) -> dict[str, list[SliceRecord]]:
    """Records by Series Instance UID, each list ordered by slice position."""
    groups: dict[str, list[SliceRecord]] = defaultdict(list)
    for r in records:
        groups[r.series_uid].append(r)
    return {uid: sorted(rs, key=lambda r: (r.position, r.image_id)) for uid, rs in groups.items()}


# -- the split ------------------------------------------------------------------------------


def split_patients(
    records: Sequence[SliceRecord], val_fraction: float, seed: int
) -> tuple[list[SliceRecord], list[SliceRecord]]:
    """Split by patient, multilabel-stratified on the patients' labels.

    Parameters
    ----------
    records : sequence of SliceRecord
        All labelled slices.
    val_fraction : float
        Fraction of patients for validation, in (0, 1).
    seed : int
        Seed of the split.

    Returns
    -------
    (train, val) : tuple of lists of SliceRecord
        No patient appears in both.

    Raises
    ------
    ValueError
        If ``val_fraction`` is not in (0, 1) or there are fewer than two patients.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if isinstance(val_fraction, bool) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    by_patient: dict[str, list[SliceRecord]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    patients = sorted(by_patient)
    if len(patients) < 2:
        raise ValueError(f"a split needs at least 2 patients, got {len(patients)}")
    y = np.array(
        [np.max([r.labels for r in by_patient[p]], axis=0) for p in patients], dtype=np.int64
    )
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros((len(patients), 1)), y))
    train = [r for i in sorted(train_idx) for r in by_patient[patients[i]]]
    val = [r for i in sorted(val_idx) for r in by_patient[patients[i]]]
    return train, val


# -- the slice cache ------------------------------------------------------------------------


def _spec_key(spec: PreprocessSpec) -> dict[str, Any]:
    """The parts of the spec the cached (context-free) arrays depend on."""
    d = spec.to_dict()
    d.pop("context")
    return d


def _read_series(paths: Sequence[Path], *, check: bool) -> tuple[list[Dataset], list[int]]:
    """Read the files, dropping (and logging) those that cannot be read or, with ``check``,
    whose pixels cannot be decoded."""
    from triage_node.preprocess import to_hu

    datasets: list[Dataset] = []
    kept: list[int] = []
    for i, p in enumerate(paths):
        try:
            ds = dcmread(p)
            if check:
                to_hu(ds)
        except Exception as exc:  # a damaged slice must not lose its whole series
            log.warning("slice %s left out: %s", p, exc)
            continue
        datasets.append(ds)
        kept.append(i)
    return datasets, kept


def _preprocess_files(
    paths: Sequence[Path], spec: PreprocessSpec
) -> tuple[NDArray[np.float32], list[int]]:
    """Preprocess a series' files in slice order; returns the array and the file order."""
    for check in (False, True):
        datasets, kept = _read_series(paths, check=check)
        if not datasets:
            break
        order = order_slices(datasets)
        try:
            x = preprocess_series([datasets[i] for i in order], spec)
        except InvalidDatasetError:
            if check:
                raise
            continue  # find and drop the slice(s) whose pixels cannot be decoded
        return x, [kept[i] for i in order]
    return np.zeros((0, spec.channels, spec.size, spec.size), dtype=np.float32), []


def _build_one(job: tuple[str, list[str], list[str], dict[str, Any], str]) -> tuple[str, int]:
    """Preprocess one series into the cache (runs in worker processes)."""
    series_uid, paths, image_ids, spec_dict, target = job
    spec = PreprocessSpec.from_dict({**spec_dict, "context": 0})
    x, order = _preprocess_files([Path(p) for p in paths], spec)
    arr = x.astype(np.float16)
    ids = [image_ids[i] for i in order]
    tmp = f"{target}.{os.getpid()}.tmp.npy"
    np.save(tmp, arr)
    with open(f"{target}.{os.getpid()}.tmp.json", "w") as fh:
        json.dump({"series_uid": series_uid, "image_ids": ids}, fh)
    os.replace(f"{target}.{os.getpid()}.tmp.json", f"{target}.json")
    os.replace(tmp, f"{target}.npy")
    return series_uid, len(ids)


class SliceCache:
    """Preprocessed series on disk, one float16 ``.npy`` per series, memory-mapped.

    Parameters
    ----------
    cache_dir : Path
        Folder of the cache files (created if missing); shared between runs.
    spec : PreprocessSpec
        The preprocessing; ``context`` is applied when slices are drawn.
    """

    #: Memory maps kept open at once; each holds a file descriptor, and the RSNA data have
    #: about 22k series against a usual limit of 1024 open files.
    MAX_OPEN = 256

    def __init__(self, cache_dir: Path, spec: PreprocessSpec) -> None:
        self.dir = Path(cache_dir)
        self.spec = spec
        self._arrays: OrderedDict[str, NDArray[np.float16]] = OrderedDict()
        self._rows: dict[str, dict[str, int]] = {}
        # Series UID -> cache file stem, fixed by the full series (before damaged slices were
        # dropped), so a filtered record list still finds its file.
        self._targets: dict[str, Path] = {}

    def _target(self, series: Sequence[SliceRecord]) -> Path:
        uid = series[0].series_uid
        known = self._targets.get(uid)
        if known is not None:
            return known
        h = hashlib.sha256()
        h.update(json.dumps(_spec_key(self.spec), sort_keys=True).encode())
        for r in sorted(series, key=lambda r: r.image_id):
            h.update(r.image_id.encode() + b"\0")
        digest = h.hexdigest()
        self._targets[uid] = self.dir / digest[:2] / digest
        return self._targets[uid]

    def build(
        self,
        groups: Mapping[str, Sequence[SliceRecord]],
        *,
        workers: int = 0,
        progress: bool = False,
    ) -> None:
        """Preprocess every series not yet in the cache.

        Parameters
        ----------
        groups : mapping of str to sequence of SliceRecord
            Series UID to its slices (:func:`series_groups`).
        workers : int, optional
            Processes; 0 preprocesses in this process.
        progress : bool, optional
            Show a progress bar.
        """
        jobs = []
        for uid, rs in groups.items():
            target = self._target(rs)
            if not (target.with_suffix(".npy").exists() and target.with_suffix(".json").exists()):
                target.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((uid, [str(r.path) for r in rs], [r.image_id for r in rs],
                             _spec_key(self.spec), str(target)))
        if not jobs:
            return
        total = sum(len(j[1]) for j in jobs)
        log.info("preprocessing %d series (%d slices) into %s", len(jobs), total, self.dir)
        bar = _progress(total=total, desc="preprocess", unit="slice", enabled=progress)
        try:
            if workers > 0:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_spawn()) as pool:
                    for _, n in pool.map(_build_one, jobs):
                        bar.update(n)
            else:
                for job in jobs:
                    bar.update(_build_one(job)[1])
        finally:
            bar.close()

    def _load(self, series: Sequence[SliceRecord]) -> tuple[NDArray[np.float16], dict[str, int]]:
        uid = series[0].series_uid
        target = self._target(series) if uid not in self._rows or uid not in self._arrays else None
        if uid not in self._rows:
            assert target is not None
            with target.with_suffix(".json").open() as fh:
                ids = json.load(fh)["image_ids"]
            self._rows[uid] = {image_id: i for i, image_id in enumerate(ids)}
        if uid in self._arrays:
            self._arrays.move_to_end(uid)
        else:
            assert target is not None
            self._arrays[uid] = np.load(target.with_suffix(".npy"), mmap_mode="r")
            while len(self._arrays) > self.MAX_OPEN:
                self._arrays.popitem(last=False)
        return self._arrays[uid], self._rows[uid]

    def available(self, series: Sequence[SliceRecord]) -> list[SliceRecord]:
        """The records of ``series`` whose slice made it into the cache."""
        uid = series[0].series_uid
        if uid not in self._rows:
            with self._target(series).with_suffix(".json").open() as fh:
                ids = json.load(fh)["image_ids"]
            self._rows[uid] = {image_id: i for i, image_id in enumerate(ids)}
        rows = self._rows[uid]
        return [r for r in series if r.image_id in rows]

    def slice(self, series: Sequence[SliceRecord], image_id: str) -> NDArray[np.float32]:
        """Model input of one slice: its windows with ``context`` neighbours each side.

        Neighbours are clamped at the series' ends, as in
        :func:`~triage_node.preprocess.preprocess_series`.
        """
        arr, rows = self._load(series)
        i = rows[image_id]
        k = self.spec.context
        n = arr.shape[0]
        idx = np.clip(np.arange(i - k, i + k + 1), 0, n - 1)
        x = np.asarray(arr[idx], dtype=np.float32)
        return x.reshape(self.spec.channels, self.spec.size, self.spec.size)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in each DataLoader worker.
        return {"dir": self.dir, "spec": self.spec, "targets": self._targets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dir = state["dir"]
        self.spec = state["spec"]
        self._targets = dict(state["targets"])
        self._arrays = OrderedDict()
        self._rows = {}


def cached_records(
    cache: SliceCache, groups: Mapping[str, Sequence[SliceRecord]]
) -> dict[str, list[SliceRecord]]:
    """``groups`` restricted to slices present in the cache (damaged ones are dropped)."""
    out = {}
    for uid, rs in groups.items():
        avail = cache.available(rs)
        if avail:
            out[uid] = avail
    return out


def _spawn() -> multiprocessing.context.SpawnContext:
    """Fresh worker processes: a process forked after torch ran an OpenMP parallel region
    (e.g. after loading a model) deadlocks in its first torch operation."""
    return multiprocessing.get_context("spawn")


# -- progress bars --------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix_str(self, s: str) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def _progress(*, total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar (ETA included) on stderr, or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def describe_records(records: Sequence[SliceRecord]) -> dict[str, Any]:
    """Counts for the artifact's training summary: slices, series, patients, positives."""
    y = np.array([r.labels for r in records], dtype=np.int64).reshape(-1, len(LABELS))
    manufacturers: dict[str, int] = defaultdict(int)
    for r in records:
        manufacturers[r.manufacturer] += 1
    series_pos = {r.series_uid for r in records if r.labels[0]}
    return {
        "slices": len(records),
        "series": len({r.series_uid for r in records}),
        "patients": len({r.patient_id for r in records}),
        "positive_slices": {lab: int(y[:, j].sum()) for j, lab in enumerate(LABELS)},
        "positive_series_any": len(series_pos),
        "manufacturers": dict(sorted(manufacturers.items())),
    }

