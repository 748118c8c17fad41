"""Database fixtures: each test gets a fresh SQLite file and a fresh PostgreSQL database.

PostgreSQL is the server at ``TRIAGE_NODE_TEST_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``, trust auth). Each test creates its own
database ``triage_test_<hex>`` there and drops it afterwards, so nothing depends on
leftovers. When the server is unreachable the PostgreSQL variants are skipped, unless
``TRIAGE_NODE_REQUIRE_POSTGRES=1`` (set in CI), which turns that into a failure.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from triage_node.store.db import (
    default_sqlite_url,
    make_engine,
    make_session_factory,
    redact_url,
    upgrade,
)

PG_URL_ENV = "TRIAGE_NODE_TEST_PG_URL"
REQUIRE_PG_ENV = "TRIAGE_NODE_REQUIRE_POSTGRES"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: Why PostgreSQL cannot be used, once found out (saves a connect attempt per test).
_pg_unavailable: list[str] = []


def postgres_base_url() -> str:
    """URL of the PostgreSQL database the per-test databases are created from."""
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def _postgres_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when CI requires PostgreSQL."""
    if os.environ.get(REQUIRE_PG_ENV) == "1":
        pytest.fail(f"{REQUIRE_PG_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    if _pg_unavailable:
        _postgres_unavailable(_pg_unavailable[0])
    base = make_url(postgres_base_url())
    admin = sa.create_engine(
        base,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    name = f"triage_test_{secrets.token_hex(6)}"
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        detail = " ".join(str(exc.orig).split())
        reason = f"PostgreSQL at {redact_url(base)} is unreachable: {detail}"
        _pg_unavailable.append(reason)
        _postgres_unavailable(reason)
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file (not yet created) in the test's temporary directory."""
    return default_sqlite_url(tmp_path / "data")


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest) -> str:
    """URL of a fresh, empty database: a SQLite file, then a PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url = request.getfixturevalue(fixture)
    assert isinstance(url, str)
    return url


@pytest.fixture
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Session factory on a freshly migrated database."""
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made with openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    outputs = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *subject,
            *outputs,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own, empty before and after (real Redis at 127.0.0.1)."""
    redis = pytest.importorskip("redis")
    db = random.Random().randrange(1, 16)
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"Redis at 127.0.0.1:6379 unreachable: {exc}")
    yield f"redis://127.0.0.1:6379/{db}"
    client.flushdb()
