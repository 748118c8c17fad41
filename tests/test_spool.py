"""The spool: sanitised paths that never leave the root, atomic durable writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triage_node.errors import SpoolError
from triage_node.spool import Spool, safe_component


def test_valid_uid_kept() -> None:
    assert safe_component("1.2.840.113619.2.55.3") == "1.2.840.113619.2.55.3"


@pytest.mark.parametrize(
    "uid", ["../../x", "1.2/3", "..", ".", "", "ID_abc123", "a\\b", "1.2.3\x00", "/etc/passwd",
            "9" * 65, "1..2", "x" * 500]
)
def test_unsafe_uids_are_contained(uid: str) -> None:
    name = safe_component(uid)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".")
    assert name not in (".", "..")
    assert len(name) <= 96


def test_distinct_inputs_distinct_names() -> None:
    assert safe_component("1.2/3") != safe_component("1.2_3")
    assert safe_component("ID_a") != safe_component("ID-a")


@given(st.text(max_size=200))
def test_any_string_stays_in_one_folder(value: str) -> None:
    name = safe_component(value)
    assert "/" not in name and name not in ("", ".", "..") and not name.startswith(".")


def test_commit_places_file_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    rel = spool.relpath_for("1.2.3", "../../evil", "4.5.6")
    path = spool.write(rel, b"DICM-data")
    assert path.read_bytes() == b"DICM-data"
    assert (tmp_path / "spool").resolve() in path.resolve().parents
    assert not any(spool.incoming.iterdir()), "temporary file left behind"
    # A re-sent instance replaces the file in place.
    spool.write(rel, b"again")
    assert path.read_bytes() == b"again"


def test_path_refuses_escape(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError, match="leaves the spool"):
        spool.path("../outside.dcm")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_spool_fails_prepare(tmp_path: Path) -> None:  # pragma: no cover - non-root
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(SpoolError):
        Spool(ro / "spool").prepare()


def test_unwritable_spool_fails_commit(tmp_path: Path) -> None:
    """A spool whose target cannot be created (a file where a folder should be)."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (tmp_path / "spool" / "1.2.3").write_bytes(b"not a folder")
    fh, tmp = spool.open_incoming()
    fh.write(b"x")
    fh.close()
    with pytest.raises(SpoolError, match="cannot store"):
        spool.commit(tmp, spool.relpath_for("1.2.3", "4", "5"))
    assert not tmp.exists(), "failed commit must not leave the temporary file"


def test_space_reserve(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62)
    with pytest.raises(SpoolError, match="nearly full"):
        spool.check_space()
    Spool(tmp_path, min_free_bytes=1).check_space()


def test_clear_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    for _ in range(3):
        fh, _p = spool.open_incoming()
        fh.close()
    assert spool.clear_incoming() == 3
    assert not any(spool.incoming.iterdir())


def _dirty_kib() -> int:
    """The kernel's dirty page-cache (written, not yet on its way to disk), in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Dirty: line in /proc/meminfo")


@pytest.mark.skipif(not Spool(Path(".")).writes_back_early,
                    reason="sync_file_range is Linux-only")
def test_start_writeback_sends_received_bytes_on_their_way_to_disk(tmp_path: Path) -> None:
    """A file still being received starts its disk writes early: 64 MiB written, then
    handed to start_writeback, stop counting as dirty page cache without any fsync (other
    processes dirty pages too, so the check is on a large margin), and the file stays
    writable and whole."""
    spool = Spool(tmp_path)
    spool.prepare()
    fh, tmp = spool.open_incoming()
    chunk = b"a" * 2**20
    for _ in range(64):
        fh.write(chunk)
    fh.flush()
    before = _dirty_kib()
    spool.start_writeback(fh.fileno(), 0, 64 * 2**20)
    deadline = time.monotonic() + 10  # the kernel's own flusher waits 30 s for new pages
    while _dirty_kib() > before - 32 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _dirty_kib()
    assert after < before - 32 * 1024, (
        f"dirty page cache {before} KiB -> {after} KiB: writeback did not start")
    fh.write(b"b")
    fh.close()
    assert tmp.stat().st_size == 64 * 2**20 + 1
    with tmp.open("rb") as f:
        f.seek(64 * 2**20 - 1)
        assert f.read() == b"ab"


def test_start_writeback_does_nothing_without_fsync_or_descriptor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    assert not spool.writes_back_early
    spool.prepare()
    fh, tmp = spool.open_incoming()
    with fh:
        fh.write(b"x")
        fh.flush()
        spool.start_writeback(fh.fileno(), 0, 1)
    assert tmp.read_bytes() == b"x"
    Spool(tmp_path).start_writeback(-1, 0, 1)  # a bad descriptor: no error here either
