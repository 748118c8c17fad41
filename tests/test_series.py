"""Series assembly: selection rules, slice order, completion (stable time and release hint)."""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.config import TriageConfig
from triage_node.domain import (
    LABELS,
    InstanceRecord,
    InstanceState,
    SeriesResult,
    SeriesState,
    utcnow,
)
from triage_node.series import Decision, assemble_due, not_selected_reason, order_slices

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
RULES = TriageConfig(min_slices=10)


def sl(i: int, *, series: str = "1.2.3.4", at: dt.datetime | None = None,
       orientation: tuple[float, ...] | None = AXIAL, z: float | None = None,
       **fields: object) -> InstanceRecord:
    pos = None if z is None and orientation is None else (0.0, 0.0, 5.0 * i if z is None else z)
    values: dict[str, object] = {
        "sop_instance_uid": f"{series}.{i}.{random.random():.12f}"[:64],
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": series,
        "patient_id": "P1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "file_path": f"x/{i}.dcm",
        "file_size": 1,
        "received_at": at or T0 + dt.timedelta(seconds=i * 0.1),
        "calling_ae": "CT1",
        "state": InstanceState.STORED,
        "modality": "CT",
        "body_part_examined": "HEAD",
        "series_description": "HEAD 5mm",
        "study_description": "CT HEAD",
        "image_position": pos,
        "image_orientation": orientation,
        "instance_number": i,
    }
    values.update(fields)
    return InstanceRecord(**values)  # type: ignore[arg-type]


def head(n: int = 12, **kw: object) -> list[InstanceRecord]:
    return [sl(i, **kw) for i in range(n)]  # type: ignore[arg-type]


def tilted(deg: float) -> tuple[float, ...]:
    a = math.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))


@pytest.mark.parametrize(
    ("instances", "reason"),
    [
        (head(), None),
        (head(orientation=tilted(20)), None),  # gantry tilt passes
        (head(9), "9 distinct slice positions, fewer than min_slices=10"),
        (head(orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)), "not axial"),  # sagittal
        (head(orientation=None), "no ImageOrientationPatient"),
        (head(body_part_examined="CHEST", series_description="THORAX",
              study_description="CT CHEST"), "not a head series"),
        (head(body_part_examined="", series_description="Routine", study_description="CT HEAD"),
         None),
        (head(body_part_examined="", series_description="STD BRAIN 5MM", study_description=""),
         None),
        (head(state=InstanceState.NOT_FOR_TRIAGE, reason="not a CT image (SOP class SC)"),
         "not a CT image"),
    ],
)
def test_selection(instances: list[InstanceRecord], reason: str | None) -> None:
    got = not_selected_reason(instances, RULES)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_duplicate_positions_do_not_count_twice() -> None:
    doubled = head(6) + [sl(i, at=T0 + dt.timedelta(minutes=1)) for i in range(6)]
    assert "6 distinct" in (not_selected_reason(doubled, RULES) or "")


def test_order_by_position_not_instance_number() -> None:
    slices = [sl(i, instance_number=100 - i) for i in range(20)]
    shuffled = slices[:]
    random.Random(3).shuffle(shuffled)
    ordered, info = order_slices(shuffled)
    assert [r.sop_instance_uid for r in ordered] == [r.sop_instance_uid for r in slices]
    assert info.duplicates == 0 and info.gaps == 0 and info.spacing_mm == pytest.approx(5.0)


def test_duplicates_keep_latest_and_gaps_are_counted() -> None:
    first = [sl(i) for i in (0, 1, 2, 3, 6, 7)]  # 4 and 5 missing: one gap
    again = sl(2, at=T0 + dt.timedelta(hours=1))
    unplaced = sl(50, orientation=None, z=None)
    ordered, info = order_slices([again, *first, unplaced])
    assert info.duplicates == 1 and info.gaps == 1
    assert ordered[2] is again, "the re-sent slice wins its position"
    assert ordered[-1] is unplaced and len(ordered) == 7


def test_tilted_series_orders_along_its_normal() -> None:
    a = math.radians(25)
    o = tilted(25)  # row (1,0,0), column (0, cos a, sin a): normal (0, -sin a, cos a)
    normal, column = (0.0, -math.sin(a), math.cos(a)), (0.0, math.cos(a), math.sin(a))
    slices = []
    for i in range(10):
        shift = 40.0 * (i % 3)  # in-plane shifts along the column: they break a z sort
        pos = tuple(5.0 * i * n + shift * c for n, c in zip(normal, column, strict=True))
        slices.append(sl(i, orientation=o, image_position=pos))
    assert sorted(slices, key=lambda r: r.image_position[2]) != slices  # type: ignore[index]
    ordered, _ = order_slices(list(reversed(slices)))
    assert [r.sop_instance_uid for r in ordered] == [r.sop_instance_uid for r in slices]


# ---------------------------------------------------------------------------- database


def _record(factory: sessionmaker[Session], records: list[InstanceRecord]) -> None:
    store.record_batch(factory, records)


def test_stable_time_completes_and_selects(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head())
    last = T0 + dt.timedelta(seconds=1.1)
    assert assemble_due(session_factory, RULES, now=last + dt.timedelta(seconds=30)) == []
    decided = assemble_due(session_factory, RULES, now=last + dt.timedelta(seconds=61))
    assert [(d.selected, d.slices) for d in decided] == [(True, 12)]
    row = store.list_series(session_factory)[0]
    assert row.state is SeriesState.QUEUED and row.reason is None
    # Decided once: not due again.
    assert assemble_due(session_factory, RULES, now=last + dt.timedelta(seconds=999)) == []


def test_not_selected_recorded_with_reason(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head(5))
    assemble_due(session_factory, RULES, now=T0 + dt.timedelta(minutes=5))
    row = store.list_series(session_factory)[0]
    assert row.state is SeriesState.NOT_TRIAGED and "fewer than min_slices" in (row.reason or "")


def test_release_hint_completes_within_settle(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head())
    released = T0 + dt.timedelta(seconds=2)
    store.mark_release_hint(session_factory, {"1.2.3.4"}, released)
    assert assemble_due(session_factory, RULES, now=released + dt.timedelta(seconds=1)) == []
    decided = assemble_due(session_factory, RULES, now=released + dt.timedelta(seconds=2))
    assert [d.selected for d in decided] == [True]


def test_hint_older_than_the_last_slice_is_ignored(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head())
    store.mark_release_hint(session_factory, {"1.2.3.4"}, T0 - dt.timedelta(seconds=1))
    assert assemble_due(session_factory, RULES, now=T0 + dt.timedelta(seconds=10)) == []


def test_late_slice_reopens_and_is_decided_again(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head(9))
    assemble_due(session_factory, RULES, now=T0 + dt.timedelta(minutes=2))
    assert store.list_series(session_factory)[0].state is SeriesState.NOT_TRIAGED
    late = T0 + dt.timedelta(minutes=3)
    _record(session_factory, [sl(9, at=late), sl(10, at=late)])
    assert store.list_series(session_factory)[0].state is SeriesState.RECEIVING
    decided = assemble_due(session_factory, RULES, now=late + dt.timedelta(minutes=2))
    assert [(d.selected, d.slices) for d in decided] == [(True, 11)]


def test_decision_skipped_when_a_slice_arrived_meanwhile(
    session_factory: sessionmaker[Session],
) -> None:
    _record(session_factory, head())
    [(uid, last)] = store.due_series(session_factory, now=T0 + dt.timedelta(minutes=5),
                                     stable_seconds=60, settle_seconds=2)
    _record(session_factory, [sl(12, at=T0 + dt.timedelta(minutes=4))])
    assert not store.complete_series(session_factory, uid, state=SeriesState.QUEUED,
                                     reason=None, at=utcnow(), last_received_at=last)
    assert store.list_series(session_factory)[0].state is SeriesState.RECEIVING


def test_scp_release_hint_end_to_end(tmp_path: Path) -> None:
    """storescu -> SCP -> release: complete after the settle time, long before stable time."""
    from nodeproc import DCMTK, running_node, storescu

    from triage_node.phantom import generate_study

    if not (DCMTK / "storescu").exists():
        pytest.skip("dcmtk not installed")
    truth = generate_study(tmp_path / "ph", seed=4, n_slices=12, rows=64, cols=64)
    with running_node(tmp_path) as node:
        out = storescu(node.port, [s.path for s in truth.slices])
        assert out.stderr.count("(Success)") == 12, out.stderr[-1000:]
        engine = store.make_engine(node.database_url)
        factory = store.make_session_factory(engine)
        # 60 s stable time; the hint (written as the association closes, possibly just after
        # storescu returns) makes it due 2 s after release: look 5 s ahead, poll briefly.
        decided: list[Decision] = []
        deadline = time.monotonic() + 10
        while not decided and time.monotonic() < deadline:
            decided = assemble_due(factory, TriageConfig(),
                                   now=utcnow() + dt.timedelta(seconds=5))
            time.sleep(0.05)
        assert [(d.series_instance_uid, d.selected) for d in decided] == [
            (truth.series_uid, True)]
        engine.dispose()


def _result(uid: str, any_p: float = 0.9) -> SeriesResult:
    return SeriesResult(
        series_instance_uid=uid,
        probabilities=dict.fromkeys(LABELS, any_p),
        slices=(("1.2.3.4.0", 0.0, (any_p,) * 6),),
        key_sop_instance_uid="1.2.3.4.0",
        flagged=any_p >= 0.5,
        threshold=0.5,
        model_name="m",
        model_version="1",
        model_sha256="0" * 64,
        inference_started_at=T0,
        inference_done_at=T0 + dt.timedelta(seconds=1),
    )


def test_result_round_trip_claim_and_replace(session_factory: sessionmaker[Session]) -> None:
    _record(session_factory, head())
    assemble_due(session_factory, RULES, now=T0 + dt.timedelta(minutes=5))
    assert store.claim_series(session_factory, "1.2.3.4")
    assert store.store_result(session_factory, _result("1.2.3.4")) is SeriesState.DONE
    assert not store.claim_series(session_factory, "1.2.3.4"), "done is not claimable"
    got = store.get_result(session_factory, "1.2.3.4")
    assert got is not None and got.flagged and got.probabilities["any"] == pytest.approx(0.9)
    assert got.slices == (("1.2.3.4.0", 0.0, (0.9,) * 6),) and got.stored_at is not None
    # Recomputed (e.g. after a late slice): replaced, one row.
    store.store_result(session_factory, _result("1.2.3.4", 0.1))
    again = store.get_result(session_factory, "1.2.3.4")
    assert again is not None and not again.flagged
    assert store.get_result(session_factory, "9.9.9") is None
    with pytest.raises(ValueError, match="unknown series"):
        store.store_result(session_factory, _result("9.9.9"))
