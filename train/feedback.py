"""Labels the node collects itself: the radiologists' verdicts in its database.

``triage-node train --from-store DATABASE_URL --spool DIR`` reads the newest verdict per
series (:func:`triage_node.store.feedback_labels`) and the series' slices from the spool
(the node's ``[storage] path``):

* a **refuted** series (``any`` = 0) makes every slice a strong negative: ordinary
  :class:`~train.data.SliceRecord` s with six zero labels, trained and validated like the
  slices of a CSV;
* a **confirmed** series (``any`` = 1) is only a series-level label - some slice shows the
  bleed, nobody said which - and becomes a :class:`Bag` for multiple-instance learning
  (:func:`train.loop.mil_bce`). A verdict that confirms ICH without naming a subtype says
  nothing about the subtypes: its bag trains ``any`` only (``mask``).

Slices whose file is gone (retention removes images after ``images_days``), whose header
cannot be read or names another SOP Instance UID, and - later, in the slice cache - whose
pixels cannot be decoded, are skipped and counted; a series left without a readable slice
is dropped and reported. Headers go through the same cached index as CSV data
(:func:`train.data.build_index`, its own file), pixels through the same slice cache.

A training run freezes what it read in ``WORK_DIR/store_labels.json``
(:func:`write_snapshot`); ``--resume`` reads that file instead of the database, so verdicts
given (or images removed) meanwhile cannot change the data of a run half done.

The database is only read, never migrated: a database at another schema revision than this
package's is refused with a hint to run ``triage-node db upgrade``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from train.data import SliceCache, SliceRecord, build_index, normalize_id, split_patients
from triage_node import store
from triage_node.domain import LABELS
from triage_node.errors import SpoolError
from triage_node.logs import redact_url
from triage_node.spool import Spool
from triage_node.store.worklist import FeedbackLabel

__all__ = [
    "SNAPSHOT",
    "Bag",
    "StoreData",
    "bag_records",
    "cached_store",
    "describe_bags",
    "load_store_data",
    "public_summary",
    "read_feedback",
    "read_snapshot",
    "split_sources",
    "store_data_from_labels",
    "without_series",
    "write_snapshot",
]

log = logging.getLogger("triage_node.train")

#: The frozen store labels of a run, in its work dir.
SNAPSHOT = "store_labels.json"
_SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Bag:
    """A confirmed series: series-level labels over its slices (a multiple-instance bag).

    Attributes
    ----------
    series_uid, study_uid, patient_id : str
        From the database.
    labels : tuple of int
        The verdict, LABELS order (``any`` = 1).
    mask : tuple of int
        1 where the verdict says something about the label: all six, unless ICH was
        confirmed without any subtype (then only ``any``).
    records : tuple of SliceRecord
        The readable slices in position order. Their ``labels`` are the *series'* labels
        (what the patient-level split and the series aggregation need), never a slice's.
    """

    series_uid: str
    study_uid: str
    patient_id: str
    labels: tuple[int, ...]
    mask: tuple[int, ...]
    records: tuple[SliceRecord, ...]


@dataclass(frozen=True)
class StoreData:
    """What the store contributes to a run.

    Attributes
    ----------
    negatives : list of SliceRecord
        Every readable slice of the refuted series, six zero labels each.
    bags : list of Bag
        The confirmed series.
    summary : dict
        Provenance and counts: ``source`` (the URL without password), ``since``,
        ``read_at``, ``verdicts`` (series with one), ``newest_verdict``,
        ``refuted_series`` / ``confirmed_series`` (with a readable slice),
        ``confirmed_without_subtype``, ``slices_missing`` (file gone), ``slices_unreadable``
        (header unreadable, another instance, or a path leaving the spool),
        ``series_dropped`` (their UIDs: none readable); after :func:`cached_store` also
        ``slices_undecodable``, ``refuted_series_used``, ``confirmed_series_used``,
        ``negative_slices``, ``bag_slices`` and ``series_in_csv_too`` where it applies.
    """

    negatives: list[SliceRecord]
    bags: list[Bag]
    summary: dict[str, Any] = field(default_factory=dict)


# -- the database ---------------------------------------------------------------------------


def read_feedback(url: str, *, since: dt.datetime | None = None) -> list[FeedbackLabel]:
    """The newest verdict per series from the database at ``url`` (read only).

    Parameters
    ----------
    url : str
        Database URL (SQLite file or PostgreSQL); may hold a password, which no message
        shows.
    since : datetime, optional
        Only series whose newest verdict is at least this recent (timezone-aware).

    Returns
    -------
    list of triage_node.store.worklist.FeedbackLabel

    Raises
    ------
    ValueError
        If a SQLite file does not exist or the schema is not at this package's revision.
    DatabaseError
        If the database is unreachable.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not isinstance(url, str) or not url:
        raise ValueError("--from-store: a database URL is needed")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"--from-store: {redact_url(url)} is not a database URL") from exc
    if parsed.get_backend_name() == "sqlite":
        # make_engine would create an empty database; a typo must not look like "no labels".
        name = (parsed.database or "").removeprefix("file:").split("?", 1)[0]
        if name in ("", ":memory:") or not Path(name).is_file():
            raise ValueError(f"--from-store: database file {name or '(memory)'!r} does not exist")
    revision, head = store.current_revision(url), store.head_revision()
    if revision != head:
        raise ValueError(
            f"--from-store: database {redact_url(url)} is at schema revision {revision}, this "
            f"triage-node expects {head} (run 'triage-node db upgrade' with the node's version)"
        )
    engine = store.make_engine(url)
    try:
        return list(store.feedback_labels(store.make_session_factory(engine), since=since))
    finally:
        engine.dispose()


# -- records --------------------------------------------------------------------------------


def _mask(labels: Sequence[int]) -> tuple[int, ...]:
    """Which labels a verdict speaks to (subtypes not at all if ICH came without one)."""
    if labels[0] and not any(labels[1:]):
        return (1,) + (0,) * (len(LABELS) - 1)
    return (1,) * len(LABELS)


def store_data_from_labels(
    labels: Sequence[FeedbackLabel],
    spool: Path,
    index_path: Path,
    *,
    source: str = "",
    since: dt.datetime | None = None,
    workers: int = 0,
    progress: bool = False,
) -> StoreData:
    """Turn verdicts into strong negative slices and positive bags.

    Parameters
    ----------
    labels : sequence of FeedbackLabel
        From :func:`read_feedback`.
    spool : Path
        The spool root the slices' paths are relative to.
    index_path : Path
        Header index of the spool files (reused and updated like the CSV data's).
    source : str
        The database URL for the summary; shown without its password.
    since : datetime, optional
        Recorded in the summary.
    workers, progress
        As for :func:`train.data.build_index`.

    Returns
    -------
    StoreData

    Raises
    ------
    ValueError
        If ``spool`` is not a folder.
    """
    spool = Path(spool)
    if not spool.is_dir():
        raise ValueError(f"--spool {spool} does not exist or is not a folder")
    guard = Spool(spool)
    wanted: dict[str, tuple[str, str]] = {}  # rel path -> (series uid, sop uid)
    missing = outside = 0
    for lab in labels:
        for sop, rel in lab.slices:
            try:
                full = guard.path(rel)
            except SpoolError:
                outside += 1
                continue
            if full.is_file():
                wanted[os.path.relpath(full, spool.resolve())] = (lab.series_instance_uid, sop)
            else:
                missing += 1
    entries = {e.path: e for e in build_index(spool, index_path, files=sorted(wanted),
                                               workers=workers, progress=progress)}
    by_series: dict[str, list[SliceRecord]] = defaultdict(list)
    unreadable = outside
    order = {lab.series_instance_uid: lab for lab in labels}
    for rel, (series_uid, sop) in wanted.items():
        e = entries.get(rel)
        if e is None or e.image_id != normalize_id(sop):
            unreadable += 1  # header unreadable, or the file is not the instance recorded
            continue
        lab = order[series_uid]
        y = tuple(int(lab.labels[k]) for k in LABELS)
        by_series[series_uid].append(SliceRecord(
            spool / rel, e.image_id, lab.study_instance_uid, series_uid, lab.patient_id,
            e.position, e.manufacturer, y))
    negatives: list[SliceRecord] = []
    bags: list[Bag] = []
    dropped: list[str] = []
    refuted = confirmed = 0
    for lab in labels:
        rs = sorted(by_series.get(lab.series_instance_uid, []),
                    key=lambda r: (r.position, r.image_id))
        y = tuple(int(lab.labels[k]) for k in LABELS)
        if not rs:
            dropped.append(lab.series_instance_uid)
            continue
        if y[0]:
            confirmed += 1
            bags.append(Bag(lab.series_instance_uid, lab.study_instance_uid, lab.patient_id,
                            y, _mask(y), tuple(rs)))
        else:
            refuted += 1
            negatives.extend(replace(r, labels=(0,) * len(LABELS)) for r in rs)
    summary: dict[str, Any] = {
        "source": redact_url(source) if source else "",
        "since": since.isoformat() if since else None,
        "read_at": dt.datetime.now(dt.UTC).isoformat(),
        "verdicts": len(labels),
        "newest_verdict": max((lab.at for lab in labels), default=None),
        "refuted_series": refuted,
        "confirmed_series": confirmed,
        "confirmed_without_subtype": sum(1 for b in bags if not any(b.mask[1:])),
        "slices_missing": missing,
        "slices_unreadable": unreadable,
        "series_dropped": dropped,
    }
    if summary["newest_verdict"] is not None:
        summary["newest_verdict"] = summary["newest_verdict"].isoformat()
    _warn(summary)
    return StoreData(negatives, bags, summary)


def _warn(summary: Mapping[str, Any]) -> None:
    """Log what was skipped (once, with counts)."""
    if summary.get("slices_missing") or summary.get("slices_unreadable"):
        log.warning(
            "store labels: %d slice file(s) missing from the spool, %d unreadable; skipped",
            summary.get("slices_missing", 0), summary.get("slices_unreadable", 0))
    dropped = summary.get("series_dropped") or []
    if dropped:
        log.warning("store labels: %d series without a readable slice dropped: %s",
                    len(dropped), ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))


def load_store_data(
    url: str,
    spool: Path,
    index_path: Path,
    *,
    since: dt.datetime | None = None,
    workers: int = 0,
    progress: bool = False,
) -> StoreData:
    """:func:`read_feedback` then :func:`store_data_from_labels`."""
    labels = read_feedback(url, since=since)
    log.info("store %s: %d series with a verdict (spool %s)", redact_url(url), len(labels),
             spool)
    return store_data_from_labels(labels, spool, index_path, source=url, since=since,
                                  workers=workers, progress=progress)


def without_series(data: StoreData, records: Sequence[SliceRecord]) -> StoreData:
    """``data`` without the series that ``records`` (CSV data) label slice by slice.

    Slice labels are stronger than a series-level verdict, so the CSV's win; the store's
    copies are counted (``series_in_csv_too``) and logged.
    """
    csv_series = {r.series_uid for r in records}
    dup = ({r.series_uid for r in data.negatives} | {b.series_uid for b in data.bags}
           ) & csv_series
    if not dup:
        return data
    log.warning("%d series both in the CSV data and the store: the CSV's slice labels are used",
                len(dup))
    return StoreData([r for r in data.negatives if r.series_uid not in dup],
                     [b for b in data.bags if b.series_uid not in dup],
                     {**data.summary, "series_in_csv_too": len(dup)})


def public_summary(data: StoreData) -> dict[str, Any]:
    """The summary for an artifact or report: counts only, no series UID."""
    summary = {k: v for k, v in data.summary.items() if k != "series_dropped"}
    summary["series_dropped"] = len(data.summary.get("series_dropped", []))
    return summary


def bag_records(bags: Sequence[Bag]) -> list[SliceRecord]:
    """Every slice of every bag (series labels, weak)."""
    return [r for b in bags for r in b.records]


def cached_store(cache: SliceCache, data: StoreData) -> StoreData:
    """``data`` restricted to slices the cache could decode; counts what it dropped.

    Call after :meth:`SliceCache.build` over the store's series.
    """
    negatives: list[SliceRecord] = []
    bags: list[Bag] = []
    undecodable = 0
    dropped = list(data.summary.get("series_dropped", []))
    by_series: dict[str, list[SliceRecord]] = defaultdict(list)
    for r in data.negatives:
        by_series[r.series_uid].append(r)
    for uid, rs in by_series.items():
        kept = cache.available(rs)
        undecodable += len(rs) - len(kept)
        negatives.extend(kept)
        if not kept:
            dropped.append(uid)
    for b in data.bags:
        kept = cache.available(b.records)
        undecodable += len(b.records) - len(kept)
        if kept:
            bags.append(replace(b, records=tuple(kept)))
        else:
            dropped.append(b.series_uid)
    summary = dict(data.summary)
    if undecodable:
        log.warning("store labels: %d slice(s) whose pixels cannot be decoded skipped",
                    undecodable)
    summary["slices_undecodable"] = undecodable
    summary["series_dropped"] = dropped
    summary["refuted_series_used"] = len({r.series_uid for r in negatives})
    summary["confirmed_series_used"] = len(bags)
    summary["negative_slices"] = len(negatives)
    summary["bag_slices"] = sum(len(b.records) for b in bags)
    return StoreData(negatives, bags, summary)


# -- the split ------------------------------------------------------------------------------


def split_sources(
    records: Sequence[SliceRecord], bags: Sequence[Bag], val_fraction: float, seed: int
) -> tuple[list[SliceRecord], list[SliceRecord], list[Bag], list[Bag]]:
    """Split strong slices and bags together, by patient.

    Patients are those of :func:`train.data.split_patients` over the strong slices and the
    bags' slices (which carry their series' labels), so a patient with CSV slices, refuted
    and confirmed series lands on one side with all of them, and the stratification sees
    the confirmed series as positives.

    Returns
    -------
    (train, val, train_bags, val_bags)
    """
    _, val = split_patients([*records, *bag_records(bags)], val_fraction, seed)
    val_patients = {r.patient_id for r in val}
    return (
        [r for r in records if r.patient_id not in val_patients],
        [r for r in records if r.patient_id in val_patients],
        [b for b in bags if b.patient_id not in val_patients],
        [b for b in bags if b.patient_id in val_patients],
    )


# -- summaries ------------------------------------------------------------------------------


def describe_bags(bags: Sequence[Bag]) -> dict[str, Any]:
    """Counts of bags for the artifact: series, slices, patients, positives per label."""
    y = np.array([b.labels for b in bags], dtype=np.int64).reshape(-1, len(LABELS))
    return {
        "series": len(bags),
        "slices": sum(len(b.records) for b in bags),
        "patients": len({b.patient_id for b in bags}),
        "positive_series": {lab: int(y[:, j].sum()) for j, lab in enumerate(LABELS)},
        "any_only": sum(1 for b in bags if not any(b.mask[1:])),
    }


# -- the snapshot ---------------------------------------------------------------------------


def _record_json(r: SliceRecord) -> list[Any]:
    return [str(r.path), r.image_id, r.study_uid, r.series_uid, r.patient_id, r.position,
            r.manufacturer, list(r.labels)]


def _record_of(x: Sequence[Any]) -> SliceRecord:
    return SliceRecord(Path(x[0]), str(x[1]), str(x[2]), str(x[3]), str(x[4]), float(x[5]),
                       str(x[6]), tuple(int(v) for v in x[7]))


def write_snapshot(path: Path, data: StoreData) -> None:
    """Freeze ``data`` (before the slice cache) in ``path``, atomically."""
    doc = {
        "version": _SNAPSHOT_VERSION,
        "summary": data.summary,
        "negatives": [_record_json(r) for r in data.negatives],
        "bags": [{"series_uid": b.series_uid, "study_uid": b.study_uid,
                  "patient_id": b.patient_id, "labels": list(b.labels), "mask": list(b.mask),
                  "records": [_record_json(r) for r in b.records]} for b in data.bags],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def read_snapshot(path: Path) -> StoreData:
    """The store data a run froze with :func:`write_snapshot`.

    Raises
    ------
    ValueError
        If the file is missing or not a snapshot of this version.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume: the run's store labels {path} are missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--resume: cannot read the store labels {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != _SNAPSHOT_VERSION:
        raise ValueError(f"--resume: {path} is not a store-labels file of version "
                         f"{_SNAPSHOT_VERSION}")
    bags = [Bag(str(b["series_uid"]), str(b["study_uid"]), str(b["patient_id"]),
                tuple(int(v) for v in b["labels"]), tuple(int(v) for v in b["mask"]),
                tuple(_record_of(r) for r in b["records"])) for b in doc["bags"]]
    return StoreData([_record_of(r) for r in doc["negatives"]], bags, dict(doc["summary"]))
