"""Logging: one line per event on stderr (journald-friendly), plain or JSON.

Patient names are never passed to a logger above DEBUG; identifiers we log are UIDs,
AE titles and addresses.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object; ``extra=`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Configure the root logger once for a process (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and each association at INFO: keep ours readable.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


#: What a secret is replaced with in anything we log or print.
REDACTED = "***"
#: URL query keys that carry passwords.
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword"})
_SECRET_QUERY_RE = re.compile(
    rf"([?&](?:{'|'.join(sorted(SECRET_QUERY_KEYS))})=)[^&]*", re.IGNORECASE
)


def redact_url(url: str | URL) -> str:
    """Render a URL (database, broker) with its password and password-like query keys hidden.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        A URL, possibly with credentials.

    Returns
    -------
    str
        The URL with the password replaced by ``***``; safe for logs and error messages.
        A string that is not a parseable URL is returned with anything between ``://user:``
        and ``@`` hidden.
    """
    if not url:
        return str(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", rf"\g<1>{REDACTED}@", str(url))
    rendered = parsed.render_as_string(hide_password=True)
    return _SECRET_QUERY_RE.sub(rf"\g<1>{REDACTED}", rendered)
