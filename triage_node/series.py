"""Series assembly: when a series is complete, whether it is triaged, and its slice order.

A series is complete when nothing has arrived for ``[triage] stable_seconds`` (Orthanc's
StableAge), or ``release_settle_seconds`` after an association that delivered it was released
(the hint the SCP records). A late triageable slice reopens a decided series (the store does
that on arrival), and assembly decides again.

Torch-free on purpose: the SCP process may run assembly.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.config import TriageConfig
from triage_node.domain import (
    InstanceRecord,
    InstanceState,
    SeriesState,
    position_along_normal,
    slice_normal,
    utcnow,
)

log = logging.getLogger(__name__)

#: Two slices closer than this along the normal are duplicates of one position (mm).
DUPLICATE_TOLERANCE_MM = 0.01


def not_selected_reason(instances: Sequence[InstanceRecord], rules: TriageConfig) -> str | None:
    """Why a complete series is not triaged, or None when it is.

    Rules, in order: it has triageable CT slices (localizers, secondary captures and other
    modalities were set aside on arrival); they are axial (slice normal within
    ``max_tilt_degrees`` of the patient's z axis, so gantry tilt passes); there are at least
    ``min_slices`` distinct positions; and it is a head (``BodyPartExamined`` in
    ``body_parts``, or a series/study description matching ``description_patterns``).
    """
    stored = [r for r in instances if r.state is InstanceState.STORED]
    if not stored:
        first = next((r.reason for r in instances if r.reason), None)
        return first or "no triageable CT slices"
    normals = [n for r in stored if r.image_orientation
               for n in [slice_normal(r.image_orientation)] if n is not None]
    if not normals:
        return "no ImageOrientationPatient: cannot tell whether the slices are axial"
    tilt = max(math.degrees(math.acos(min(1.0, abs(n[2])))) for n in normals)
    if tilt > rules.max_tilt_degrees:
        return f"not axial: slice normal {tilt:.0f} degrees from the z axis"
    ordered, _ = order_slices(stored)
    if len(ordered) < rules.min_slices:
        return (f"{len(ordered)} distinct slice positions, fewer than min_slices="
                f"{rules.min_slices}")
    parts = {r.body_part_examined.strip().upper() for r in stored} - {""}
    if parts & set(rules.body_parts):
        return None
    texts = {r.series_description for r in stored} | {r.study_description for r in stored}
    if any(re.search(p, t, re.IGNORECASE) for p in rules.description_patterns for t in texts):
        return None
    return (f"not a head series (BodyPartExamined {sorted(parts) or '-'}, descriptions "
            f"{sorted(t for t in texts if t) or '-'})")


@dataclass(frozen=True, slots=True)
class SliceOrder:
    """What ordering found: duplicates dropped and gaps seen."""

    duplicates: int
    gaps: int
    spacing_mm: float | None


def order_slices(instances: Sequence[InstanceRecord]) -> tuple[list[InstanceRecord], SliceOrder]:
    """Slices sorted by position along the slice normal (not InstanceNumber).

    Duplicates of one position (re-sent or re-reconstructed slices with new UIDs) keep the
    latest received. A gap (a step over 1.5x the median spacing) is counted, not filled:
    the classifier sees the slices there are. Slices without a position sort last by
    InstanceNumber.
    """
    keyed: list[tuple[float, InstanceRecord]] = []
    unplaced: list[InstanceRecord] = []
    for r in instances:
        pos = position_along_normal(r.image_position, r.image_orientation)
        if pos is None:
            unplaced.append(r)
        else:
            keyed.append((pos, r))
    keyed.sort(key=lambda kr: (kr[0], kr[1].received_at))
    kept: list[tuple[float, InstanceRecord]] = []
    duplicates = 0
    for pos, r in keyed:
        if kept and abs(pos - kept[-1][0]) < DUPLICATE_TOLERANCE_MM:
            kept[-1] = (pos, r) if r.received_at >= kept[-1][1].received_at else kept[-1]
            duplicates += 1
        else:
            kept.append((pos, r))
    steps = [b[0] - a[0] for a, b in itertools.pairwise(kept)]
    spacing = statistics.median(steps) if steps else None
    gaps = sum(1 for s in steps if spacing and s > 1.5 * spacing)
    unplaced.sort(key=lambda r: (r.instance_number is None, r.instance_number or 0))
    return [r for _, r in kept] + unplaced, SliceOrder(duplicates, gaps, spacing)


@dataclass(frozen=True, slots=True)
class Decision:
    """What assembly decided for one complete series."""

    series_instance_uid: str
    selected: bool
    reason: str | None
    slices: int


def assemble_due(session_factory: sessionmaker[Session], rules: TriageConfig,
                 *, now: dt.datetime | None = None) -> list[Decision]:
    """Decide every series that is complete by ``now`` (default: the current time).

    Selected series become ``queued``; the others ``not_triaged`` with the reason. A series
    that received a slice while being decided is left receiving (decided next time).
    """
    at = utcnow() if now is None else now
    decisions = []
    for uid, last in store.due_series(session_factory, now=at,
                                      stable_seconds=rules.stable_seconds,
                                      settle_seconds=rules.release_settle_seconds):
        instances = store.series_instances(session_factory, uid)
        reason = not_selected_reason(instances, rules)
        state = SeriesState.NOT_TRIAGED if reason else SeriesState.QUEUED
        if store.complete_series(session_factory, uid, state=state, reason=reason,
                                 at=at, last_received_at=last):
            n = sum(r.state is InstanceState.STORED for r in instances)
            log.info("series %s complete (%d slices): %s", uid, n,
                     "queued for triage" if reason is None else f"not triaged: {reason}")
            decisions.append(Decision(uid, reason is None, reason, n))
    return decisions
