"""Tests of triage_node.store on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session, sessionmaker

from triage_node.domain import (
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceState,
    SeriesState,
)
from triage_node.errors import DatabaseError
from triage_node.store import (
    InstanceWriter,
    alembic_config,
    count_instances,
    current_revision,
    default_sqlite_url,
    get_instance,
    head_revision,
    list_events,
    list_series,
    make_engine,
    make_session_factory,
    record_batch,
    record_events,
    redact_url,
    upgrade,
)
from triage_node.store.models import Base

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TABLES = {"patient", "study", "series", "instance", "event"}


def instance(
    sop: str,
    *,
    series: str = "1.2.826.0.1.3680043.2.1.1",
    study: str = "1.2.826.0.1.3680043.2.1",
    patient: str = "PAT-1",
    state: InstanceState = InstanceState.STORED,
    reason: str | None = None,
    at: dt.datetime = T0,
    **fields: Any,
) -> InstanceRecord:
    """An InstanceRecord with plausible defaults."""
    values: dict[str, Any] = {
        "sop_instance_uid": sop,
        "sop_class_uid": CT,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "patient_id": patient,
        "transfer_syntax_uid": EXPLICIT_LE,
        "file_path": f"{study}/{series}/{sop}.dcm",
        "file_size": 526_000,
        "received_at": at,
        "calling_ae": "CT_SCANNER",
        "state": state,
        "reason": reason,
    }
    values.update(fields)
    return InstanceRecord(**values)


def event(
    kind: EventKind = EventKind.INSTANCE_STORED, *, at: dt.datetime = T0, **fields: Any
) -> EventRecord:
    """An EventRecord with plausible defaults."""
    return EventRecord(kind=kind, at=at, actor="CT_SCANNER", peer="10.0.0.7", **fields)


def scalar(session_factory: sessionmaker[Session], sql: str) -> Any:
    """Result of one SQL query (for checks the public API does not offer)."""
    with session_factory() as session:
        return session.execute(sa.text(sql)).scalar_one()


def series_row(session_factory: sessionmaker[Session], uid: str) -> tuple[Any, ...]:
    """(state, reason, first_received_at, last_received_at) of a series via list_series."""
    [summary] = [s for s in list_series(session_factory) if s.series_instance_uid == uid]
    return (summary.state, summary.reason, summary.first_received_at, summary.last_received_at)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: ``(instances, events=()) -> list[bool]``
Write = Callable[..., list[bool]]


@pytest.fixture(params=["record_batch", "InstanceWriter"])
def write(request: pytest.FixtureRequest, session_factory: sessionmaker[Session]) -> Write:
    """Both ways of recording received instances: the general :func:`record_batch` and the
    SCP's :class:`InstanceWriter` (its fast path from the second batch of a series on)."""
    if request.param == "record_batch":
        return partial(record_batch, session_factory)
    return InstanceWriter(session_factory)


@pytest.fixture
def spawn() -> Iterator[multiprocessing.context.SpawnContext]:
    """The "spawn" multiprocessing context (fresh interpreters, as separate SCP processes)."""
    yield multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- migrations


def test_upgrade_from_empty_is_idempotent(database_url: str) -> None:
    assert current_revision(database_url) is None

    upgrade(database_url)
    assert current_revision(database_url) == head_revision()
    engine = make_engine(database_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) >= TABLES
        sessions = make_session_factory(engine)
        record_batch(sessions, [instance("1.2.3.1")])

        upgrade(database_url)  # second start-up: nothing to do, nothing lost
        assert current_revision(database_url) == head_revision()
        assert count_instances(sessions) == 1
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    upgrade(database_url)
    command.downgrade(alembic_config(database_url), "base")
    assert current_revision(database_url) is None
    engine = make_engine(database_url)
    try:
        assert not TABLES & set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    upgrade(database_url)
    assert current_revision(database_url) == head_revision()


def test_concurrent_upgrades_all_succeed(database_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start_up() -> None:
        barrier.wait()
        try:
            upgrade(database_url)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert current_revision(database_url) == head_revision()


def upgrade_worker(url: str, barrier: Any, results: Any) -> None:
    """Body of one start-up process calling upgrade (module level: started with "spawn")."""
    try:
        barrier.wait()
        upgrade(url)
        results.put("ok")
    except BaseException as exc:  # reported to the parent
        results.put(repr(exc))


def test_concurrent_upgrades_from_separate_processes(
    database_url: str, spawn: multiprocessing.context.SpawnContext
) -> None:
    barrier = spawn.Barrier(3)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=upgrade_worker, args=(database_url, barrier, results))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert outcomes == ["ok"] * 3
    assert current_revision(database_url) == head_revision()


def test_migrations_match_models(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_compare_metadata_would_notice_a_difference(sqlite_url: str) -> None:
    # Guards the test above against comparing nothing.
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    metadata = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    sa.Table("extra", metadata, sa.Column("id", sa.Integer, primary_key=True))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert [d[0] for d in diff] == ["add_table"]


# --------------------------------------------------------------------------- SQLite engine


def test_sqlite_connections_use_wal_and_full_sync(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    connections = [engine.raw_connection() for _ in range(2)]  # two pooled connections
    try:
        for conn in connections:
            cursor = conn.cursor()
            pragmas = {
                name: cursor.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
            # synchronous: 2 is FULL
            assert pragmas == {
                "journal_mode": "wal",
                "synchronous": 2,
                "busy_timeout": 30_000,
                "foreign_keys": 1,
            }
    finally:
        for conn in connections:
            conn.close()
        engine.dispose()
    assert Path(sqlite_url.removeprefix("sqlite:///")).is_file()


def test_sqlite_write_transaction_takes_the_write_lock_at_begin(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    engine = make_engine(sqlite_url)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with make_session_factory(engine).begin() as session:
            session.execute(sa.text("SELECT count(*) FROM series"))  # a read, yet...
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")  # ...no other writer may start
        other.execute("BEGIN IMMEDIATE")  # released at commit
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_sqlite_reads_do_not_wait_for_a_writer(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    record_batch(sessions, [instance("1.2.3.1")])
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE series SET reason = 'busy'")
        # Reads begin DEFERRED and see the last committed state (WAL) instead of waiting.
        assert count_instances(sessions) == 1
        assert list_series(sessions)[0].reason is None
        assert get_instance(sessions, "1.2.3.1") is not None
        writer.execute("ROLLBACK")
    finally:
        writer.close()
        engine.dispose()


def test_default_sqlite_url(tmp_path: Path) -> None:
    assert default_sqlite_url(tmp_path) == f"sqlite:///{tmp_path}/triage-node.db"


# --------------------------------------------------------------------------- errors


def test_unreachable_postgres_raises_database_error_without_password() -> None:
    url = f"postgresql+psycopg://triage:s3cret-pw@127.0.0.1:{free_port()}/triage"
    with pytest.raises(DatabaseError) as upgrading:
        upgrade(url)
    with pytest.raises(DatabaseError) as reading:
        current_revision(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with pytest.raises(DatabaseError) as recording:
            record_batch(sessions, [instance("1.2.3.1")])
        with pytest.raises(DatabaseError) as listing:
            list_series(sessions)
    finally:
        engine.dispose()
    for raised in (upgrading, reading, recording, listing):
        message = str(raised.value)
        assert "s3cret" not in message
        assert "triage:***@127.0.0.1" in message
        assert isinstance(raised.value.__cause__, sa.exc.OperationalError)
    assert "cannot record 1 instance(s)" in str(recording.value)


def test_sqlite_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be")
    for path in (blocker / "sub" / "triage-node.db", Path("/proc/triage-node/x.db")):
        with pytest.raises(DatabaseError, match="cannot create the directory") as raised:
            make_engine(f"sqlite:///{path}")
        assert str(path) in str(raised.value)
        assert isinstance(raised.value.__cause__, OSError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_sqlite_in_read_only_directory(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(DatabaseError, match="cannot create the directory"):
            make_engine(f"sqlite:///{read_only}/sub/triage-node.db")
        with pytest.raises(DatabaseError, match="unable to open database file"):
            upgrade(f"sqlite:///{read_only}/triage-node.db")
    finally:
        read_only.chmod(0o700)


def test_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    # The database path is an existing directory: sqlite cannot open it, even as root.
    (tmp_path / "triage-node.db").mkdir()
    with pytest.raises(DatabaseError, match="unable to open database file"):
        upgrade(default_sqlite_url(tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:pw@host/db",
        "not a url",
        "oracle+cx_oracle://scott:tiger@host",
        "postgresql+asyncpg://user:pw@host/db",
        "postgresql+pg8000://user:pw@host/db",
        "sqlite+pysqlcipher://:pw@/x.db",
    ],
)
def test_unsupported_or_invalid_urls(url: str) -> None:
    with pytest.raises(DatabaseError) as raised:
        make_engine(url)
    assert "pw@" not in str(raised.value) and "tiger" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://user:p%40ss@db.example:5432/node",
            "postgresql+psycopg://user:***@db.example:5432/node",
        ),
        (
            "postgresql+psycopg://postgres@127.0.0.1/test",
            "postgresql+psycopg://postgres@127.0.0.1/test",
        ),
        (
            "postgresql+psycopg://db.example/node?user=u&password=hunter2",
            "postgresql+psycopg://db.example/node?password=***&user=u",
        ),
        (
            "sqlite:////var/lib/triage-node/triage-node.db",
            "sqlite:////var/lib/triage-node/triage-node.db",
        ),
        ("garbage://user:hunter2@host:x:y", "garbage://user:***@host:x:y"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_failed_batch_records_nothing(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        session.execute(sa.text("DROP TABLE event"))
    with pytest.raises(DatabaseError, match="event"):
        record_batch(session_factory, [instance("1.2.3.1")], [event()])
    assert count_instances(session_factory) == 0
    assert list_series(session_factory) == []


def test_invalid_records_are_refused_before_writing(session_factory: sessionmaker[Session]) -> None:
    good = instance("1.2.3.1")
    with pytest.raises(ValueError, match=r"instances\[1\]\.received_at must be timezone-aware"):
        record_batch(session_factory, [good, instance("1.2.3.2", at=dt.datetime(2024, 1, 1))])
    with pytest.raises(ValueError, match=r"instances\[0\]\.sop_instance_uid is 129"):
        record_batch(session_factory, [instance("1" * 129)])
    with pytest.raises(ValueError, match="series_instance_uid must not be empty"):
        record_batch(session_factory, [instance("1.2.3.3", series="")])
    with pytest.raises(TypeError, match=r"instances\[0\] must be an InstanceRecord"):
        record_batch(session_factory, [event()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"events\[0\]\.at must be timezone-aware"):
        record_events(session_factory, [event(at=dt.datetime(2024, 1, 1))])
    with pytest.raises(ValueError, match="since must be timezone-aware"):
        list_events(session_factory, since=dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="limit must be >= 0"):
        list_series(session_factory, limit=-1)
    assert count_instances(session_factory) == 0
    assert list_events(session_factory) == []


# --------------------------------------------------------------------------- record_batch


def test_new_and_duplicate_instances(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    a, b, c = (instance(f"1.2.3.{n}") for n in (1, 2, 3))
    assert write([a, b, a]) == [True, True, False]
    resent_b = instance("1.2.3.2", file_path="elsewhere.dcm", at=T0 + dt.timedelta(hours=1))
    assert write([resent_b, c, c]) == [False, True, False]
    assert count_instances(session_factory) == 3

    stored_b = get_instance(session_factory, "1.2.3.2")
    assert stored_b is not None
    # The re-send replaced the file in the spool: the row names the new file, nothing else
    # changed...
    assert stored_b.file_path == "elsewhere.dcm"
    assert stored_b.received_at == b.received_at
    # ...and did not count as activity on the series.
    assert series_row(session_factory, b.series_instance_uid)[3] == T0


def test_empty_batch_writes_nothing(session_factory: sessionmaker[Session]) -> None:
    assert record_batch(session_factory, []) == []
    assert record_batch(session_factory, [], [event()]) == []
    assert len(list_events(session_factory)) == 1


def test_patient_study_series_are_shared_across_batches(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    study = "1.2.3"
    s1, s2 = "1.2.3.100", "1.2.3.200"
    write([instance("1.2.3.100.1", series=s1, study=study)])
    write(
        [
            instance("1.2.3.100.2", series=s1, study=study, at=T0 + dt.timedelta(seconds=5)),
            instance("1.2.3.200.1", series=s2, study=study, at=T0 + dt.timedelta(seconds=9)),
        ],
    )
    write(
        [instance("9.9.1", series="9.9.1.1", study="9.9", patient="PAT-1")]
    )
    assert scalar(session_factory, "SELECT count(*) FROM patient") == 1
    assert scalar(session_factory, "SELECT count(*) FROM study") == 2
    assert scalar(session_factory, "SELECT count(*) FROM series") == 3
    assert count_instances(session_factory, s1) == 2
    assert count_instances(session_factory, s2) == 1
    assert count_instances(session_factory, "1.2.999") == 0
    counts = {s.series_instance_uid: s.instance_count for s in list_series(session_factory)}
    assert counts == {s1: 2, s2: 1, "9.9.1.1": 1}


def test_series_states(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    refused = InstanceState.NOT_FOR_TRIAGE
    t = [T0 + dt.timedelta(seconds=n) for n in range(10)]

    write([instance("1.1.1", series="1.1", at=t[3])])
    assert series_row(session_factory, "1.1") == (SeriesState.RECEIVING, None, t[3], t[3])

    # A new series of refused instances is NOT_TRIAGED with the first one's reason...
    write(
        [
            instance("1.2.1", series="1.2", state=refused, reason="localizer", at=t[5]),
            instance("1.2.2", series="1.2", state=refused, reason="other", at=t[4]),
        ],
    )
    assert series_row(session_factory, "1.2") == (SeriesState.NOT_TRIAGED, "localizer", t[4], t[5])
    # ...stays so when more refused instances come...
    write([instance("1.2.3", series="1.2", state=refused, reason="x")])
    assert series_row(session_factory, "1.2")[:2] == (SeriesState.NOT_TRIAGED, "localizer")
    # ...and becomes RECEIVING, without reason, with the first triageable one.
    write([instance("1.2.4", series="1.2", at=t[9])])
    assert series_row(session_factory, "1.2") == (SeriesState.RECEIVING, None, t[0], t[9])

    # A RECEIVING series stays so whatever arrives; times only widen.
    write(
        [instance("1.1.2", series="1.1", state=refused, reason="r", at=t[1])]
    )
    assert series_row(session_factory, "1.1") == (SeriesState.RECEIVING, None, t[1], t[3])

    # A new series whose batch mixes both kinds is RECEIVING.
    write(
        [
            instance("1.3.1", series="1.3", state=refused, reason="localizer"),
            instance("1.3.2", series="1.3"),
        ],
    )
    assert series_row(session_factory, "1.3")[:2] == (SeriesState.RECEIVING, None)

    # A late slice reopens a decided series (issue 5): assembly decides again.
    with session_factory.begin() as session:
        session.execute(
            sa.text("UPDATE series SET state = 'done' WHERE series_instance_uid = '1.3'")
        )
    write([instance("1.3.3", series="1.3", at=t[8])])
    assert series_row(session_factory, "1.3") == (SeriesState.RECEIVING, None, t[0], t[8])
    # ...but a late non-triageable instance (a dose report, say) does not.
    with session_factory.begin() as session:
        session.execute(
            sa.text("UPDATE series SET state = 'done' WHERE series_instance_uid = '1.3'")
        )
    write([instance("1.3.4", series="1.3", at=t[9], state=refused,
                                            reason="not a CT image")])
    assert series_row(session_factory, "1.3")[0] == SeriesState.DONE


def test_batch_spanning_series_studies_and_patients(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    batch = [
        instance(f"2.{p}.{s}.{n}", series=f"2.{p}.{s}", study=f"2.{p}", patient=f"P{p}")
        for p in range(3)
        for s in range(2)
        for n in range(4)
    ]
    random.Random(7).shuffle(batch)
    assert all(write(batch))
    assert scalar(session_factory, "SELECT count(*) FROM patient") == 3
    assert scalar(session_factory, "SELECT count(*) FROM study") == 3
    assert [s.instance_count for s in list_series(session_factory)] == [4] * 6


def test_large_batch(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    batch = [instance(f"3.{n}", at=T0 + dt.timedelta(milliseconds=n)) for n in range(1234)]
    assert write(batch) == [True] * 1234
    assert write(batch[::-1]) == [False] * 1234
    assert count_instances(session_factory) == 1234
    assert series_row(session_factory, batch[0].series_instance_uid)[2:] == (
        T0,
        T0 + dt.timedelta(milliseconds=1233),
    )


def test_batch_of_one_series_takes_a_handful_of_statements(
    session_factory: sessionmaker[Session],
) -> None:
    statements: list[str] = []
    engine = session_factory.kw["bind"]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        record_batch(session_factory, [instance(f"4.{n}") for n in range(50)], [event()])
        first = list(statements)
        statements.clear()
        record_batch(session_factory, [instance(f"4.{n}") for n in range(50, 100)], [event()])
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    # New series: lookup, patient, study and series inserts, instances, event (+ BEGIN).
    assert len(first) <= 10, first
    # Existing series: lookup, instances, series update, event (+ BEGIN).
    assert len(statements) <= 5, statements


# --------------------------------------------------------------------------- reading back


def test_instance_round_trip(session_factory: sessionmaker[Session]) -> None:
    cest = dt.timezone(dt.timedelta(hours=2))
    record = instance(
        "1.2.840.99.1",
        at=dt.datetime(2024, 5, 1, 14, 30, 1, 5, tzinfo=cest),
        reason=None,
        patient_name="Doe^Jane",
        accession_number="ACC42",
        study_date="20240501",
        study_description="CT HEAD",
        modality="CT",
        body_part_examined="HEAD",
        series_description="Axial 5mm",
        series_number=3,
        image_type="ORIGINAL\\PRIMARY\\AXIAL",
        instance_number=17,
        image_position=(-125.0, -98.123456789012345, 0.1 + 0.2),
        image_orientation=(1.0, 0.0, 0.0, 0.0, 0.9999999999999999, -1e-17),
        rows=512,
        columns=512,
    )
    record_batch(session_factory, [record])
    loaded = get_instance(session_factory, record.sop_instance_uid)
    assert loaded == record
    assert loaded is not None and loaded.received_at.tzinfo == dt.UTC
    assert loaded.received_at == dt.datetime(2024, 5, 1, 12, 30, 1, 5, tzinfo=dt.UTC)
    assert isinstance(loaded.state, InstanceState)

    minimal = instance("1.2.840.99.2", series="1.2.840.99", study="1.2.840", patient="")
    record_batch(session_factory, [minimal])
    assert get_instance(session_factory, "1.2.840.99.2") == minimal
    assert get_instance(session_factory, "1.2.840.99.3") is None


def test_list_series_order_and_limit(session_factory: sessionmaker[Session]) -> None:
    for n, minutes in enumerate((5, 1, 9)):
        record_batch(
            session_factory,
            [instance(f"5.{n}.1", series=f"5.{n}", at=T0 + dt.timedelta(minutes=minutes))],
        )
    summaries = list_series(session_factory)
    assert [s.series_instance_uid for s in summaries] == ["5.2", "5.0", "5.1"]
    assert list_series(session_factory, limit=2) == summaries[:2]
    assert list_series(session_factory, limit=0) == []
    top = summaries[0]
    assert top.last_received_at == T0 + dt.timedelta(minutes=9)
    assert top.last_received_at.tzinfo == dt.UTC
    assert (top.patient_id, top.instance_count, top.state) == ("PAT-1", 1, SeriesState.RECEIVING)


def test_list_events_filters_and_order(session_factory: sessionmaker[Session]) -> None:
    utc_minus_5 = dt.timezone(dt.timedelta(hours=-5))
    events = [
        event(EventKind.ASSOCIATION_OPENED, at=T0 + dt.timedelta(seconds=2)),
        event(EventKind.INSTANCE_STORED, at=T0, sop_instance_uid="1.2.3.1", outcome="success"),
        event(
            EventKind.ASSOCIATION_CLOSED, at=(T0 + dt.timedelta(seconds=3)).astimezone(utc_minus_5)
        ),
        event(
            EventKind.INSTANCE_REFUSED,
            at=T0 + dt.timedelta(seconds=1),
            detail="no pixels",
            outcome="0xC000",
        ),
    ]
    record_events(session_factory, events[:2])
    record_batch(session_factory, [instance("1.2.3.1")], events[2:])

    listed = list_events(session_factory)
    assert [e.at for e in listed] == [T0 + dt.timedelta(seconds=n) for n in range(4)]
    assert all(e.at.tzinfo == dt.UTC for e in listed)
    assert listed[0] == events[1]
    assert listed[1] == events[3]
    assert list_events(
        session_factory, since=(T0 + dt.timedelta(seconds=2)).astimezone(utc_minus_5)
    ) == [
        events[0],
        events[2],
    ]
    assert [
        e.kind
        for e in list_events(
            session_factory, kinds=[EventKind.INSTANCE_STORED, EventKind.INSTANCE_REFUSED]
        )
    ] == [
        EventKind.INSTANCE_STORED,
        EventKind.INSTANCE_REFUSED,
    ]
    assert list_events(session_factory, kinds=[]) == []
    assert list_events(session_factory, limit=1) == [events[1]]


# --------------------------------------------------------------------------- concurrency

N_SHARED = 90
SHARED_SERIES = 3


def shared_instances() -> list[InstanceRecord]:
    """The instances every concurrent writer records.

    Three series: 7.0 and 7.1 in one study, 7.2 (refused instances only) in another study of
    another patient; 7.1 mixes refused and triageable instances.
    """
    records = []
    for n in range(N_SHARED):
        k = n % SHARED_SERIES
        refused = k == 2 or (k == 1 and n % 2 == 1)
        records.append(
            instance(
                f"7.{k}.{n}",
                series=f"7.{k}",
                study=f"7.s{k // 2}",
                patient=f"PAT-{7 + k // 2}",
                state=InstanceState.NOT_FOR_TRIAGE if refused else InstanceState.STORED,
                reason="localizer" if refused else None,
                at=T0 + dt.timedelta(seconds=n),
            )
        )
    return records


def record_overlapping(sessions: sessionmaker[Session], worker: int) -> tuple[int, int]:
    """Record all shared instances in a worker-specific order and batching.

    Batches mix series, and repeat instances. Odd workers write through the SCP's
    :class:`InstanceWriter` (its fast path for series it has seen), even ones through
    :func:`record_batch`, so both meet on the same series. Returns (instances reported new,
    batches).
    """
    write: Write = InstanceWriter(sessions) if worker % 2 else partial(record_batch, sessions)
    rng = random.Random(worker)
    todo = shared_instances()
    rng.shuffle(todo)
    new = batches = 0
    while todo:
        size = rng.randint(1, 8)
        batch, todo = todo[:size], todo[size:]
        batch += batch[: rng.randint(0, 1)]  # a re-send inside the batch
        new += sum(write(batch, [event(detail=f"worker {worker}")]))
        batches += 1
    return new, batches


def check_overlapping_result(sessions: sessionmaker[Session], new: int, batches: int) -> None:
    """The database holds each shared instance once, every event, and the right series."""
    assert new == N_SHARED
    assert count_instances(sessions) == N_SHARED
    assert len(list_events(sessions)) == batches
    summaries = {s.series_instance_uid: s for s in list_series(sessions)}
    per_series = N_SHARED // SHARED_SERIES
    for k in range(SHARED_SERIES):
        summary = summaries[f"7.{k}"]
        assert summary.instance_count == per_series
        assert summary.first_received_at == T0 + dt.timedelta(seconds=k)
        assert summary.last_received_at == T0 + dt.timedelta(seconds=N_SHARED - 3 + k)
    assert [(summaries[f"7.{k}"].state, summaries[f"7.{k}"].reason) for k in range(3)] == [
        (SeriesState.RECEIVING, None),
        (SeriesState.RECEIVING, None),
        (SeriesState.NOT_TRIAGED, "localizer"),
    ]
    assert scalar(sessions, "SELECT count(*) FROM patient") == 2
    assert scalar(sessions, "SELECT count(*) FROM study") == 2


def test_concurrent_threads(session_factory: sessionmaker[Session]) -> None:
    barrier = threading.Barrier(4)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        barrier.wait()
        try:
            results.append(record_overlapping(session_factory, worker))
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    check_overlapping_result(
        session_factory, sum(r[0] for r in results), sum(r[1] for r in results)
    )


def process_worker(url: str, worker: int, barrier: Any, results: Any) -> None:
    """Body of one writer process (module level: started with "spawn")."""
    engine = make_engine(url)
    try:
        barrier.wait()
        results.put(("ok", record_overlapping(make_session_factory(engine), worker)))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))
    finally:
        engine.dispose()


def test_concurrent_processes(
    database_url: str, spawn: multiprocessing.context.SpawnContext
) -> None:
    upgrade(database_url)
    barrier = spawn.Barrier(2)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=process_worker, args=(database_url, w, barrier, results))
        for w in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    engine = make_engine(database_url)
    try:
        check_overlapping_result(
            make_session_factory(engine),
            sum(r[0] for _, r in outcomes),
            sum(r[1] for _, r in outcomes),
        )
    finally:
        engine.dispose()


def test_resend_updates_file_facts_only(
    session_factory: sessionmaker[Session], write: Write
) -> None:
    """A re-sent instance (new transfer syntax, new file) keeps its row but not stale facts."""
    first = instance("1.2.3.9.1", file_size=100)
    assert write([first]) == [True]
    again = dataclasses.replace(first, transfer_syntax_uid="1.2.840.10008.1.2.4.90",
                                file_size=42, calling_ae="OTHER")
    assert write([again]) == [False]
    got = get_instance(session_factory, "1.2.3.9.1")
    assert got is not None
    assert got.transfer_syntax_uid == "1.2.840.10008.1.2.4.90" and got.file_size == 42
    assert got.calling_ae == first.calling_ae, "other facts stay as first recorded"


def test_instance_writer_fast_path_statements(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a series is known, a batch is its instances, one series update and the events,
    run on the driver's cursor."""
    from triage_node.store import repository

    statements: list[str] = []
    run = repository._Precompiled.run

    def spy(self: Any, cursor: Any, values: dict[str, Any]) -> None:
        statements.append(self.sql.split(None, 1)[0].upper())
        run(self, cursor, values)

    monkeypatch.setattr(repository._Precompiled, "run", spy)
    write = InstanceWriter(session_factory)
    write([instance("4.0")])  # first sight of the series: the general path
    assert statements == []
    assert write([instance("4.1"), instance("4.2")], [event()]) == [True, True]
    pg = session_factory.kw["bind"].dialect.name == "postgresql"
    assert statements == ["SELECT"] * pg + ["INSERT", "INSERT", "UPDATE", "INSERT"]
    assert count_instances(session_factory) == 3
    assert write([instance("4.2")]) == [False], "a re-send is no new instance"
    assert statements[-2:] == ["INSERT", "UPDATE"]  # the insert, then the file facts


def test_instance_writer_fast_path_failure_records_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    """A statement failing in the fast path's transaction (here the events' insert, after
    the instances' insert and the series update) rolls all of it back; the next batch is
    written on a fresh connection."""
    write = InstanceWriter(session_factory)
    write([instance("6.0")])  # the series is known: the next batches take the fast path
    with session_factory.begin() as session:
        session.execute(sa.text("DROP TABLE event"))
    with pytest.raises(DatabaseError, match="event"):
        write([instance("6.1"), instance("6.2")], [event()])
    assert count_instances(session_factory) == 1
    assert write([instance("6.1")]) == [True]
    assert count_instances(session_factory) == 2
    write.close()


def test_row_keys_cover_the_rows() -> None:
    """The fast path's precompiled statements name exactly the columns the rows carry."""
    from triage_node.store import repository

    row = repository._instance_row(instance("9.1"), 1)
    assert set(row) == set(repository._INSTANCE_ROW_KEYS)
    assert set(repository._event_row(event())) == set(repository._EVENT_ROW_KEYS)


def test_instance_writer_survives_a_deleted_series(session_factory: sessionmaker[Session]) -> None:
    """A remembered series whose rows were deleted (retention) is created again."""
    write = InstanceWriter(session_factory)
    write([instance("5.1", at=T0)])
    with session_factory.begin() as session:
        session.execute(sa.text("DELETE FROM instance"))
        session.execute(sa.text("DELETE FROM series"))
    later = T0 + dt.timedelta(seconds=30)
    assert write([instance("5.2", at=later)]) == [True]
    assert count_instances(session_factory) == 1
    assert series_row(session_factory, "1.2.826.0.1.3680043.2.1.1") == (
        SeriesState.RECEIVING, None, later, later)


def test_instance_writers_take_turns_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    """SQLite writers queue on a lock file (no busy-handler sleeps); a writer waits there."""
    import fcntl

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        write = InstanceWriter(make_session_factory(engine))
        write([instance("8.1")])
        lock = Path(sqlite_url.removeprefix("sqlite:///") + "-writers.lock")
        assert lock.exists()
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's turn
        done = threading.Event()
        thread = threading.Thread(target=lambda: (write([instance("8.2")]), done.set()))
        thread.start()
        assert not done.wait(0.5), "the writer waits for its turn"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert done.wait(10)
        thread.join()
        os.close(fd)
        write.close()
        assert count_instances(make_session_factory(engine)) == 2
    finally:
        engine.dispose()


def test_instance_writer_writes_within_its_own_turn(sqlite_url: str) -> None:
    """The recorder holds the writer's turn while it picks a batch, then writes with it:
    the turn is re-entrant, and held the whole time against other processes."""
    import fcntl

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        write = InstanceWriter(make_session_factory(engine))
        lock = Path(sqlite_url.removeprefix("sqlite:///") + "-writers.lock")
        with write.turn():
            assert write([instance("9.1")]) == [True]
            fd = os.open(lock, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        finally:
            os.close(fd)
        write.close()
    finally:
        engine.dispose()


def test_staged_batch_commits_only_when_told(session_factory: sessionmaker[Session]) -> None:
    """stage() writes a known series' batch without committing it: nobody else sees it
    until commit(), which answers like a write; rollback() leaves nothing; either ends the
    batch, and the writer writes again afterwards."""
    write = InstanceWriter(session_factory)
    assert write.stage([instance("10.0")]) is None, "a series not written yet: slow path"
    assert count_instances(session_factory) == 0
    write([instance("10.0")])
    staged = write.stage([instance("10.1")], [event()])
    assert staged is not None
    assert count_instances(session_factory) == 1, "not visible before the commit"
    assert staged.commit() == [True]
    assert count_instances(session_factory) == 2
    assert len(list_events(session_factory)) == 1
    with pytest.raises(DatabaseError, match="already ended"):
        staged.commit()

    dropped = write.stage([instance("10.2")], [event()])
    assert dropped is not None
    dropped.rollback()
    dropped.rollback()  # a second call does nothing
    assert count_instances(session_factory) == 2
    assert len(list_events(session_factory)) == 1

    again = write.stage([instance("10.1")])
    assert again is not None and again.commit() == [False], "a re-send is no new instance"
    assert write([instance("10.2")]) == [True]
    assert count_instances(session_factory) == 3
    write.close()


def test_stage_declines_while_another_process_has_the_turn(sqlite_url: str) -> None:
    """On SQLite, stage() does not wait for another writer's turn: it returns None at once
    (the caller records later, through the recorder), and holds the turn while staged."""
    import fcntl

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        factory = make_session_factory(engine)
        write = InstanceWriter(factory)
        write([instance("11.0")])
        lock = Path(sqlite_url.removeprefix("sqlite:///") + "-writers.lock")
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process's turn
            started = time.monotonic()
            assert write.stage([instance("11.1")]) is None
            assert time.monotonic() - started < 0.5
            fcntl.flock(fd, fcntl.LOCK_UN)
            staged = write.stage([instance("11.1")])
            assert staged is not None
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            staged.commit()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # given back
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        assert count_instances(factory) == 2
        write.close()
    finally:
        engine.dispose()


def test_staged_batch_failing_commit_records_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    """A commit that fails ends the batch with DatabaseError and nothing recorded; the
    writer goes on with a fresh connection."""
    write = InstanceWriter(session_factory)
    write([instance("12.0")])
    staged = write.stage([instance("12.1")])
    assert staged is not None
    assert write._conn is not None
    conn = write._conn.connection.dbapi_connection
    assert conn is not None
    conn.close()  # the connection is lost before the commit
    with pytest.raises(DatabaseError):
        staged.commit()
    assert count_instances(session_factory) == 1
    assert write([instance("12.1")]) == [True]
    assert count_instances(session_factory) == 2
    write.close()
