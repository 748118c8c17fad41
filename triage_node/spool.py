"""The spool: received instances as DICOM files, written atomically and durably.

Layout: ``<root>/<study>/<series>/<sop>.dcm`` with every component sanitised
(:func:`safe_component`), and ``<root>/.incoming/`` for files being received. Both sit on
one file system, so moving a finished file into place is an atomic ``rename``.

Durability protocol for one instance (the SCP acknowledges only after it returns):
``fsync(file)`` -> ``rename(tmp, final)`` -> ``fsync(final's directory)``, plus an
``fsync`` of each parent directory created on the way.

While a large file is still arriving, :meth:`Spool.start_writeback` starts writing what
has arrived so far to disk (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no wait, no
metadata, no cache flush), so the closing ``fsync`` has only the tail left to write. It
is an optimisation only: the protocol above is what makes a file durable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from triage_node.errors import SpoolError

INCOMING = ".incoming"
_SAFE = re.compile(r"[^0-9A-Za-z._-]")
_MAX_COMPONENT = 96


def safe_component(value: str) -> str:
    """Turn a UID (or any string from a peer) into one safe path component.

    A well-formed UID (digits and dots, at most 64 characters) is used unchanged. Anything
    else - ``../../x``, ``1.2/3``, ``ID_abc`` as in the RSNA files, an empty or oversized
    value - keeps its safe characters for readability and gets a hash suffix, so two
    different inputs never map to the same name and the result never leaves its folder.

    Examples
    --------
    >>> safe_component("1.2.840.113619.2.1")
    '1.2.840.113619.2.1'
    >>> safe_component("../../etc/passwd")
    '_.._etc_passwd-3754d6cb3a38e118'
    """
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) and len(value) <= 64:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    cleaned = _SAFE.sub("_", value).lstrip(".")[:_MAX_COMPONENT - 17]
    return f"{cleaned}-{digest}" if cleaned else f"x-{digest}"


#: ``sync_file_range`` flag: start writeback of the range's dirty pages, do not wait
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Atomic, durable storage of received instances under one root directory.

    Parameters
    ----------
    root : Path
        The spool root; created if missing.
    fsync : bool
        Flush files and directories to stable storage before :meth:`commit` returns.
        Only benchmarks turn this off.
    min_free_bytes : int
        :meth:`check_space` fails when less than this is free on the spool's disk.
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self._resolved_root: Path | None = None
        self._checked_dirs: dict[str, Path] = {}
        self.incoming = self.root / INCOMING
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()

    def prepare(self) -> None:
        """Create the folders and prove the spool is writable.

        Raises
        ------
        SpoolError
            If the root cannot be created or written.
        """
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.incoming, prefix="probe-"):
                pass
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not writable: {exc}") from exc

    def relpath_for(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The sanitised path, relative to the root, of one instance."""
        return "/".join(
            (safe_component(study_uid), safe_component(series_uid), safe_component(sop_uid))
        ) + ".dcm"

    def path(self, relpath: str) -> Path:
        """Absolute path of ``relpath``; refuses anything that would leave the root."""
        full = (self.root / relpath).resolve()
        if self._resolved_root is None:
            self._resolved_root = self.root.resolve()
        if self._resolved_root not in full.parents:
            raise SpoolError(f"path {relpath!r} leaves the spool")
        return full

    def _target(self, relpath: str) -> Path:
        """:meth:`path` for a rename into place: the folder part is resolved and checked
        once, then remembered, so the slices of a series need no path resolution each
        (a rename replaces a final symbolic link rather than following it)."""
        folder, _, name = relpath.rpartition("/")
        known = self._checked_dirs.get(folder)
        if known is not None and name not in ("", ".", ".."):
            return known / name
        full = self.path(relpath)
        if len(self._checked_dirs) > 4096:
            self._checked_dirs.clear()
        self._checked_dirs[folder] = full.parent
        return full

    def free_bytes(self) -> int:
        """Bytes available to us on the spool's file system."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self) -> None:
        """Raise :class:`SpoolError` when the disk is below the configured reserve."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise SpoolError(
                f"spool disk nearly full: {self.free_bytes() // 2**20} MiB free, "
                f"reserve is {self.min_free_bytes // 2**20} MiB"
            )

    def open_incoming(self) -> tuple[BinaryIO, Path]:
        """A new temporary file in ``.incoming`` to receive into (caller closes it)."""
        try:
            fd, name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        except OSError as exc:
            raise SpoolError(f"cannot create a file in {self.incoming}: {exc}") from exc
        return os.fdopen(fd, "wb"), Path(name)

    @property
    def writes_back_early(self) -> bool:
        """Whether :meth:`start_writeback` does anything here (fsync on, Linux)."""
        return self.fsync and _sync_file_range is not None

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Start writing ``length`` bytes at ``offset`` of a file being received to disk.

        Returns without waiting (the kernel queues the writes; it blocks only while its
        request queue is full). ``fd`` holds the bytes already (user-space buffers
        flushed). The later :meth:`sync` then has only what arrived since left to write.
        Does nothing when fsync is off or the platform has no ``sync_file_range``; an
        error is left for :meth:`sync` to report.
        """
        if self.fsync and _sync_file_range is not None:
            _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # A new directory entry is durable only once its parent is synced.
            for created in reversed(missing):
                _fsync_dir(created.parent)
        self._known_dirs.add(directory)
        if len(self._known_dirs) > 4096:
            self._known_dirs.clear()

    def commit(self, tmp: Path, relpath: str) -> Path:
        """Durably move a fully written temporary file to its place in the spool.

        A file already at ``relpath`` (a re-sent instance) is replaced atomically. The same
        as :meth:`sync`, :meth:`place`, :meth:`sync_dir` in turn; the SCP calls those
        separately to overlap them with other work.

        Raises
        ------
        SpoolError
            On any OS error (disk full, permissions, I/O); ``tmp`` is removed.
        """
        try:
            self.sync(tmp)
        except SpoolError:
            self.discard(tmp)
            raise
        final = self.place(tmp, relpath)
        self.sync_dir(final.parent, relpath)
        return final

    def sync(self, tmp: Path) -> None:
        """``fsync`` a written temporary file (when fsync is on).

        Raises
        ------
        SpoolError
            On an OS error; ``tmp`` is left for the caller.
        """
        if not self.fsync:
            return
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(f"cannot store {tmp.name}: {self._why(exc)}") from exc

    def place(self, tmp: Path, relpath: str) -> Path:
        """Rename a synced temporary file to ``relpath`` (parents created durably).

        Durable only after :meth:`sync_dir` of the returned path's folder.

        Raises
        ------
        SpoolError
            On any OS error; ``tmp`` is removed.
        """
        try:
            final = self._target(relpath)
            self._ensure_dir(final.parent)
            os.replace(tmp, final)
        except (OSError, SpoolError) as exc:
            self.discard(tmp)
            why = exc if isinstance(exc, SpoolError) else self._why(exc)
            raise SpoolError(f"cannot store {relpath}: {why}") from exc
        return final

    def sync_dir(self, directory: Path, relpath: str = "") -> None:
        """``fsync`` a folder, making the renames into it durable (when fsync is on).

        Raises
        ------
        SpoolError
            On an OS error.
        """
        if not self.fsync:
            return
        try:
            _fsync_dir(directory)
        except OSError as exc:
            raise SpoolError(f"cannot store {relpath or directory}: {self._why(exc)}") from exc

    @staticmethod
    def _why(exc: OSError) -> str:
        return "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)

    def write(self, relpath: str, data: bytes) -> Path:
        """Write ``data`` atomically and durably at ``relpath`` (for non-streamed input)."""
        fh, tmp = self.open_incoming()
        try:
            with fh:
                fh.write(data)
        except OSError as exc:
            self.discard(tmp)
            raise SpoolError(f"cannot write {relpath}: {exc}") from exc
        return self.commit(tmp, relpath)

    def discard(self, tmp: Path) -> None:
        """Remove a temporary file, ignoring one that is already gone."""
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            pass

    def clear_incoming(self) -> int:
        """Remove leftovers of interrupted receptions (never acknowledged); returns a count."""
        n = 0
        if not self.incoming.is_dir():
            return 0
        for entry in os.scandir(self.incoming):
            if entry.is_file():
                self.discard(Path(entry.path))
                n += 1
            elif entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
        return n
