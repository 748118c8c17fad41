"""Slices for workers that do not see the SCP's spool: a small HTTP server and its client.

A worker on the SCP host, or on a host that mounts the spool, reads ``[storage] path``
directly. A worker elsewhere sets ``[queue] spool_url`` to the SCP host's spool server
(``[storage] http_port``, run by ``triage-node scp`` and ``serve``) and fetches the slices it
needs over HTTP into a local cache, once per slice. The spool stays the only copy of record;
the broker carries only UIDs, never pixels, so Redis memory does not grow with image sizes.

The server answers ``GET /spool/<path relative to the spool root>`` with the file's bytes,
only for paths inside the spool (never ``.incoming``), and requires
``Authorization: Bearer <[storage] http_token>`` when a token is set. The client checks the
length against the size the database recorded, so a truncated transfer is never used.
"""

from __future__ import annotations

import hmac
import http.server
import logging
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from triage_node.config import Config
from triage_node.errors import SpoolError
from triage_node.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["RemoteSpool", "SpoolServer", "serve_spool", "spool_server_main"]

_PREFIX = "/spool/"
_CHUNK = 1 << 20


def _relpath(url_path: str) -> str | None:
    """The spool-relative path a request names, or None when it is not a stored file's."""
    if not url_path.startswith(_PREFIX):
        return None
    rel = urllib.parse.unquote(url_path[len(_PREFIX):])
    parts = PurePosixPath(rel).parts
    if (not parts or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
        return None
    return rel


class _Handler(http.server.BaseHTTPRequestHandler):
    server: SpoolServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        token = self.server.token
        if token:
            sent = self.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                self._status(401, "a bearer token is required")
                return
        rel = _relpath(urllib.parse.urlsplit(self.path).path)
        if rel is None:
            self._status(404, "not a spool path")
            return
        path = self.server.spool.path(rel)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                shutil.copyfileobj(f, self.wfile, _CHUNK)
        except FileNotFoundError:
            self._status(404, "no such instance in the spool")
        except OSError as exc:
            log.warning("spool server: cannot send %s: %s", rel, exc)
            self.close_connection = True

    def _status(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("spool server %s: " + format, self.address_string(), *args)


class SpoolServer(http.server.ThreadingHTTPServer):
    """HTTP server handing out spooled instances (see the module docstring)."""

    daemon_threads = True

    def __init__(self, spool: Spool, host: str, port: int, token: str = "") -> None:
        self.spool = spool
        self.token = token
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self.server_address[1])


def serve_spool(spool: Spool, host: str, port: int, token: str = "") -> SpoolServer:
    """Start a :class:`SpoolServer` in a daemon thread; ``shutdown()`` stops it."""
    server = SpoolServer(spool, host, port, token)
    threading.Thread(target=server.serve_forever, name="spool-http", daemon=True).start()
    log.info("spool server on http://%s:%d/spool/%s", host, server.port,
             " (bearer token required)" if token else "")
    return server


class RemoteSpool:
    """Fetches spooled instances from a :class:`SpoolServer` into a local cache.

    Parameters
    ----------
    url : str
        The server, e.g. ``http://scp-host:11113``.
    cache : Path
        Local folder for fetched files (created on demand).
    token : str
        Bearer token, when the server requires one.
    timeout : float
        Seconds to wait for the server.
    """

    def __init__(self, url: str, cache: Path, *, token: str = "", timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.cache = Path(cache)
        self.token = token
        self.timeout = timeout

    def path(self, relpath: str, size: int) -> Path:
        """A local copy of ``relpath`` (``size`` bytes, as recorded), fetched if needed.

        Raises
        ------
        SpoolError
            If the server cannot be reached, refuses, or sends a different length.
        """
        if _relpath(_PREFIX + relpath) is None:
            raise SpoolError(f"not a spool path: {relpath!r}")
        local = self.cache / relpath
        if local.is_file() and local.stat().st_size == size:
            return local
        request = urllib.request.Request(f"{self.url}{_PREFIX}{urllib.parse.quote(relpath)}")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response, \
                    tmp.open("wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
            got = tmp.stat().st_size
            if got != size:
                raise SpoolError(f"{relpath}: got {got} bytes from {self.url}, recorded {size}")
            tmp.replace(local)
        except urllib.error.HTTPError as exc:
            raise SpoolError(f"{relpath}: spool server {self.url} answered {exc.code} "
                             f"{exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SpoolError(f"{relpath}: cannot fetch from {self.url}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def discard(self, relpaths: list[str]) -> None:
        """Remove cached copies (after their series is classified)."""
        for rel in relpaths:
            (self.cache / rel).unlink(missing_ok=True)


def spool_server_main(config: Config) -> None:
    """Run the spool server of ``config`` until SIGTERM/SIGINT (a supervised child process)."""
    import signal

    from triage_node.logs import setup_logging

    setup_logging(config.logging.level, json_lines=config.logging.json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    st = config.storage
    server = serve_spool(Spool(st.path), st.http_host, st.http_port, st.http_token)
    stop.wait()
    server.shutdown()
    server.server_close()
