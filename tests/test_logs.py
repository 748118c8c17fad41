"""Log lines: plain or one JSON object each; URLs with their secrets hidden."""

from __future__ import annotations

import json
import logging

import pytest

from triage_node.logs import JsonFormatter, redact_url, setup_logging


def test_json_lines_carry_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", json_lines=True)
    try:
        log = logging.getLogger("triage_node.test")
        log.info("stored %s", "1.2.3", extra={"calling_ae": "CT1"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        obj = json.loads(line)
        assert obj["msg"] == "stored 1.2.3"
        assert obj["level"] == "INFO" and obj["calling_ae"] == "CT1"
        assert obj["ts"].endswith("Z")
    finally:
        setup_logging("WARNING")


def test_json_formatter_includes_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        rec.exc_info = sys.exc_info()
    assert "boom" in json.loads(JsonFormatter().format(rec))["exc"]


def test_third_party_chatter_is_quiet() -> None:
    setup_logging("INFO")
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    assert logging.getLogger("alembic").level == logging.WARNING


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql+psycopg://u:pw@db/x", "postgresql+psycopg://u:***@db/x"),
        ("sqlite:////var/lib/x.db", "sqlite:////var/lib/x.db"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
