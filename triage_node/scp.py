"""The Storage SCP: receives C-STORE/C-ECHO as ``ICHTRIAGE`` and never loses an acknowledged slice.

Shape
-----
``run_scp`` is a small supervisor. It resolves the listening address, then runs
``dicom.processes`` receiving processes that each bind the same port with ``SO_REUSEPORT``
(the kernel spreads associations over them, so every core receives) and restarts one that
dies. Each process builds its engine, spool and :class:`~triage_node.ingest.Recorder` once
and hands them to :class:`StorageSCP`, whose methods use nothing global.

Two receive loops (``[dicom] engine``) feed the same :class:`StorageSCP`: ``native``
(:mod:`triage_node.ulserver`, our own Upper Layer loop) and ``pynetdicom`` (pynetdicom's
association threads and event handlers, kept as the reference). Either writes the dataset
into a file in ``<spool>/.incoming`` as it arrives (no decode, no re-encode) and hands
:meth:`StorageSCP.store` a :class:`~triage_node.ulserver.StoreRequest`.

Per instance (:meth:`StorageSCP.store`): header-only parse and checks -> the record is
written, uncommitted, when the database writer is free (:meth:`Recorder.stage`) -> ``fsync``
of the file (its writeback started while it arrived) -> atomic rename into place -> the
folder's ``fsync`` on a helper thread while the record commits (the staged one in this
thread; otherwise the recorder thread writes it now, in a group commit with concurrent
associations) -> 0x0000 once both are done. Any failure on the way answers a specific
failure status, logs why and leaves nothing recorded. The next C-STORE's file in
``.incoming`` is created meanwhile on the receive loop's helper thread.

SIGTERM: stop listening, give associations ``dicom.shutdown_grace`` seconds to finish,
abort the rest (their unacknowledged instances are re-sent by the scanner), wait for
stores in flight, flush the recorder, exit 0.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from triage_node import header, store
from triage_node.config import Config
from triage_node.domain import EventKind, EventRecord, InstanceRecord, utcnow
from triage_node.errors import DatabaseError, InvalidDatasetError, SpoolError
from triage_node.ingest import Header, Recorder, StagedRecord, instance_record, read_header
from triage_node.logs import setup_logging
from triage_node.spool import Spool
from triage_node.ulserver import NativeServer, ServerSettings, StoreRequest

log = logging.getLogger(__name__)

# DIMSE statuses we answer (PS3.4 B.2.3 / PS3.7 C.4.2); each failure has its own code.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool cannot take it (disk full, I/O error)
STATUS_DB_UNAVAILABLE = 0xA701  # "out of resources" range: could not be recorded
STATUS_SOP_CLASS_MISMATCH = 0xA900  # dataset's SOP Class UID != the request's
STATUS_CANNOT_PARSE = 0xC000  # cannot understand: the dataset does not decode
STATUS_MISSING_IDENTIFIERS = 0xC001  # cannot understand: no Study/Series/SOP Instance UID
STATUS_UID_MISMATCH = 0xC002  # cannot understand: SOP Instance UID != the request's
STATUS_SHUTTING_DOWN = 0xA702  # node is stopping; send again later

# Receive datasets straight to a file instead of decoding them into memory.
_config.STORE_RECV_CHUNKED_DATASET = True


#: Retired JPEG processes (PS3.5 A.4.1) that old modalities still send, and JPIP.
_RETIRED_SYNTAXES = [f"1.2.840.10008.1.2.4.{n}" for n in (*range(52, 57), *range(58, 67), 94, 95)]


def _storage_contexts() -> list[Any]:
    """Every storage SOP class with every transfer syntax we can store as received."""
    syntaxes = list(AllTransferSyntaxes) + _RETIRED_SYNTAXES
    return [(cx.abstract_syntax, syntaxes) for cx in AllStoragePresentationContexts]


def supported_contexts() -> list[PresentationContext]:
    """The presentation contexts the SCP accepts: Verification and every storage class."""
    return [build_context(Verification)] + [
        build_context(abstract, syntaxes) for abstract, syntaxes in _storage_contexts()]


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context of the SCP, or None when ``[dicom.tls]`` is not configured."""
    tls = config.dicom.tls
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key or None)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


#: How long pynetdicom's DUL reader thread sleeps when it finds nothing to do (its default
#: is 1 ms). Each C-STORE waits on it a few times; 0.2 ms costs little CPU when idle.
DUL_POLL_DELAY = 0.0002


class _BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with few large ``recv_into`` calls.

    The stock ``recv`` reads 4 KiB at a time: 128 system calls, each giving up and taking
    back the GIL, per 512 KiB slice; with several associations in one process every
    one of them waits for the GIL.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = self.socket.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return what arrived, as the original does
                view.release()
                del buf[got:]
                return buf
            got += n
        view.release()
        return buf


class _RequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, tuned for a receiver of large datasets."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Responses are small and latency-bound: never let Nagle hold them back.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc.dul._run_loop_delay = DUL_POLL_DELAY
        # Same object, faster reads (the class only overrides ``recv``).
        assoc.dul.socket.__class__ = _BulkReadSocket
        return assoc


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, binding with SO_REUSEPORT so processes share a port."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", _RequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        assert self.socket is not None
        self.socket.listen(64)

    def established_count(self) -> int:
        """Associations currently established."""
        return sum(a.is_established for a in self.ae.active_associations)

    def abort_all(self) -> None:
        """Abort every association, established or not."""
        for assoc in self.ae.active_associations:
            assoc.abort()

    def wait_closed(self, timeout: float) -> bool:
        """Nothing to wait for: pynetdicom's abort returns once the association is down."""
        return True

    def close(self) -> None:
        """Nothing more to release (:meth:`shutdown` closed the socket)."""


@dataclass
class _AssocStats:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    started: float = field(default_factory=time.monotonic)
    series: set[str] = field(default_factory=set)


#: Called with the series an association delivered, once it is released normally.
ReleaseHint = Callable[[set[str], dt.datetime], None]


class StorageSCP:
    """The store logic, bound to one spool and one recorder; used by both receive engines.

    The neutral methods (:meth:`admit`, :meth:`opened`, :meth:`closed`, :meth:`store`, ...)
    take plain values (AE title, address, :class:`~triage_node.ulserver.StoreRequest`), so
    our own receive loop (:mod:`triage_node.ulserver`) calls them directly; the
    ``handle_*`` methods adapt pynetdicom's events to them.

    Parameters
    ----------
    config : Config
        The effective configuration (``[dicom]`` is used here).
    spool : Spool
        Where instances are written; received files arrive in its ``.incoming`` folder.
    recorder : Recorder
        Commits instance records and audit events.
    on_release : callable, optional
        Told which series a released association delivered (series assembly's hint that
        they may be complete).
    """

    def __init__(self, config: Config, spool: Spool, recorder: Recorder,
                 on_release: ReleaseHint | None = None) -> None:
        self.config = config
        self.spool = spool
        self.recorder = recorder
        self.on_release = on_release
        self._stats: dict[int, _AssocStats] = {}
        self._inflight = 0
        self._cond = threading.Condition()
        #: set on SIGTERM: new associations are rejected, open ones may finish
        self.draining = False
        #: set when the grace is over: stores not yet started are refused, then abort
        self.closing = False
        self._folder_sync: ThreadPoolExecutor | None = None

    def _folder_syncer(self) -> ThreadPoolExecutor:
        """The thread that fsyncs a folder while a handler commits a staged record (a
        process stages one record at a time)."""
        with self._cond:
            if self._folder_sync is None:
                self._folder_sync = ThreadPoolExecutor(1, thread_name_prefix="folder-sync")
            return self._folder_sync

    def close(self) -> None:
        """Release what the store logic holds (call once no handler runs)."""
        with self._cond:
            pool, self._folder_sync = self._folder_sync, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- association life cycle (neutral) ------------------------------------------------

    def admit(self, ae: str, address: str) -> tuple[int, int, int] | None:
        """None to admit a caller, else the A-ASSOCIATE-RJ (result, source, reason); audited."""
        rules = self.config.dicom.allowed_callers
        if self.draining:
            reason, rsd = "node shutting down", (0x02, 0x03, 0x01)  # transient, congestion
        elif rules and not any(r.matches(ae, address) for r in rules):
            reason, rsd = "calling AE title not recognised", (0x01, 0x01, 0x03)
        else:
            return None
        log.warning("association from %s@%s rejected: %s", ae, address, reason)
        self.recorder.audit(EventRecord(EventKind.ASSOCIATION_REJECTED, utcnow(), actor=ae,
                                        peer=address, outcome="rejected", detail=reason))
        return rsd

    def rejected(self, ae: str, address: str, detail: str) -> None:
        """Audit a rejection made by the association layer (limit, called AE, ...)."""
        log.warning("association from %s@%s rejected by the association layer: %s", ae,
                    address, detail)
        self.recorder.audit(EventRecord(EventKind.ASSOCIATION_REJECTED, utcnow(), actor=ae,
                                        peer=address, outcome="rejected", detail=detail))

    def opened(self, assoc_id: int, ae: str, address: str) -> None:
        """Start per-association statistics and audit the association."""
        self._stats[assoc_id] = _AssocStats()
        log.info("association from %s@%s accepted", ae, address)
        self.recorder.audit(EventRecord(EventKind.ASSOCIATION_OPENED, utcnow(), actor=ae,
                                        peer=address, outcome="accepted"))

    def closed(self, assoc_id: int, ae: str, address: str, *, released: bool) -> None:
        """Audit the end of an association; on a release, hint series assembly."""
        st = self._stats.pop(assoc_id, None)
        if st is None:  # never established (a bare TCP connection): nothing to audit
            return
        kind = EventKind.ASSOCIATION_CLOSED if released else EventKind.ASSOCIATION_ABORTED
        seconds = time.monotonic() - st.started
        detail = (f"stored={st.stored} duplicates={st.duplicates} refused={st.refused} "
                  f"seconds={seconds:.2f}")
        outcome = "released" if released else "aborted"
        log.info("association from %s@%s %s: %s", ae, address, outcome, detail)
        self.recorder.audit(EventRecord(kind, utcnow(), actor=ae, peer=address,
                                        outcome=outcome, detail=detail))
        if released and st.series and self.on_release:
            try:
                self.on_release(set(st.series), utcnow())
            except DatabaseError as exc:  # only a hint: stable_seconds still completes them
                log.warning("could not record the release hint for %d series: %s",
                            len(st.series), exc)

    def echo(self) -> int:
        """C-ECHO: always success while running."""
        return STATUS_SUCCESS

    # -- pynetdicom's events ---------------------------------------------------------------

    def _peer(self, event: evt.Event) -> tuple[str, str]:
        assoc = event.assoc
        ae = (assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive
              else assoc.requestor.ae_title) or ""
        return ae.strip(), assoc.requestor.address

    def handle_requested(self, event: evt.Event) -> None:
        """Reject callers not in ``allowed_callers`` (A-ASSOCIATE-RJ, calling AE not recognised)."""
        rsd = self.admit(*self._peer(event))
        if rsd:
            event.assoc.acse.send_reject(*rsd)
            event.assoc.kill()

    def handle_rejected(self, event: evt.Event) -> None:
        """Audit rejections made by pynetdicom itself (association limit, called AE)."""
        self.rejected(*self._peer(event), "limit reached or called AE not recognised")

    def handle_established(self, event: evt.Event) -> None:
        """Start per-association statistics and audit the association."""
        self.opened(id(event.assoc), *self._peer(event))

    def handle_released(self, event: evt.Event) -> None:
        """Audit a normal release; hint series assembly that its series may be complete."""
        self.closed(id(event.assoc), *self._peer(event), released=True)

    def handle_aborted(self, event: evt.Event) -> None:
        """Audit an abort (by either side) with the association's counts."""
        self.closed(id(event.assoc), *self._peer(event), released=False)

    def handle_echo(self, event: evt.Event) -> int:
        """C-ECHO: always success while running."""
        return self.echo()

    def handle_store(self, event: evt.Event) -> int:
        """C-STORE from pynetdicom: the streamed file, as a neutral request."""
        req = cast(C_STORE, event.request)
        ae, address = self._peer(event)
        return self.store(StoreRequest(
            assoc_id=id(event.assoc), calling_ae=ae, address=address,
            sop_class_uid=str(req.AffectedSOPClassUID or ""),
            sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax=str(event.context.transfer_syntax),
            path=Path(event.dataset_path)))

    # -- C-STORE -------------------------------------------------------------------------

    def store(self, request: StoreRequest) -> int:
        """C-STORE: store durably, record, then answer; a specific failure status otherwise."""
        with self._cond:
            self._inflight += 1
        try:
            return self._store(request)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def unreceivable(self, assoc_id: int, ae: str, address: str, sop_instance_uid: str,
                     why: str) -> int:
        """A C-STORE whose data could not be written to ``.incoming``: 0xA700, audited."""
        return self._refuse(assoc_id, ae, address, STATUS_OUT_OF_RESOURCES, why,
                            sop_instance_uid)

    def _refuse(self, assoc_id: int, ae: str, address: str, status: int, why: str,
                sop_uid: str) -> int:
        stats = self._stats.get(assoc_id)
        if stats:
            stats.refused += 1
        log.warning("C-STORE %s from %s@%s refused with 0x%04X: %s", sop_uid, ae, address,
                    status, why)
        self.recorder.audit(EventRecord(EventKind.INSTANCE_REFUSED, utcnow(), actor=ae,
                                        peer=address, outcome=f"0x{status:04X}", detail=why,
                                        sop_instance_uid=sop_uid[:128]))
        return status

    def _store(self, rq: StoreRequest) -> int:
        rq_uid = rq.sop_instance_uid
        refuse = partial(self._refuse, rq.assoc_id, rq.calling_ae, rq.address)
        if self.closing:
            return refuse(STATUS_SHUTTING_DOWN, "node shutting down", rq_uid)
        return self._check_and_record(rq, refuse)

    def _check_and_record(self, rq: StoreRequest,
                          refuse: Callable[[int, str, str], int]) -> int:
        rq_class, rq_uid, tmp = rq.sop_class_uid, rq.sop_instance_uid, rq.path
        # The fields the database needs straight from the received bytes where the encoding
        # is a common one; pydicom reads (and judges) anything else.
        ds: Header | None = header.parse(rq.head, rq.transfer_syntax) if rq.head else None
        if ds is None:
            try:
                ds = read_header(tmp, rq.head)
            except InvalidDatasetError as exc:
                return refuse(STATUS_CANNOT_PARSE, str(exc), rq_uid)

        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class and sop_class != rq_class:
            return refuse(STATUS_SOP_CLASS_MISMATCH,
                          f"dataset SOP class {sop_class} != request's {rq_class}", rq_uid)
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not (study_uid and series_uid and sop_uid):
            missing = [k for k, v in (("StudyInstanceUID", study_uid),
                                      ("SeriesInstanceUID", series_uid),
                                      ("SOPInstanceUID", sop_uid)) if not v]
            return refuse(STATUS_MISSING_IDENTIFIERS, f"missing {', '.join(missing)}", rq_uid)
        if sop_uid != rq_uid.strip():
            return refuse(STATUS_UID_MISMATCH,
                          f"dataset SOP instance UID {sop_uid!r} != request's", rq_uid)

        relpath = self.spool.relpath_for(study_uid, series_uid, sop_uid)
        try:
            self.spool.check_space()
            size = rq.size if rq.size >= 0 else tmp.stat().st_size
            record = instance_record(
                ds,
                sop_class_uid=rq_class,
                transfer_syntax_uid=rq.transfer_syntax,
                file_path=relpath,
                file_size=size,
                calling_ae=rq.calling_ae,
                received_at=utcnow(),
            )
        except (SpoolError, OSError) as exc:
            return refuse(STATUS_OUT_OF_RESOURCES, str(exc), rq_uid)

        audit = EventRecord(EventKind.INSTANCE_STORED, record.received_at, actor=rq.calling_ae,
                            peer=rq.address, outcome=record.state.value,
                            detail=record.reason or "",
                            study_instance_uid=record.study_instance_uid,
                            series_instance_uid=record.series_instance_uid,
                            sop_instance_uid=record.sop_instance_uid)
        # When the writer is free, the record is written now and committed after the
        # rename: the statements run while the disk finishes the file. Otherwise the
        # recorder thread writes it after the rename (group commit). Either way the
        # record commits while the folder is fsynced; success once both are durable.
        try:
            staged = self.recorder.stage(record, (audit,))
        except DatabaseError as exc:
            return refuse(STATUS_DB_UNAVAILABLE, f"not recorded: {exc}", rq_uid)
        try:
            return self._place_and_record(rq, record, audit, relpath, staged, refuse)
        finally:
            if staged is not None:
                staged.rollback()  # nothing once committed; otherwise nothing is recorded

    def _place_and_record(self, rq: StoreRequest, record: InstanceRecord, audit: EventRecord,
                          relpath: str, staged: StagedRecord | None,
                          refuse: Callable[[int, str, str], int]) -> int:
        """fsync the file, rename it into place, then commit the record (the staged one,
        or through the recorder) while the folder is fsynced."""
        rq_uid = rq.sop_instance_uid
        try:
            self.spool.sync(rq.path)  # the file's data is on disk before it takes its name
            final = self.spool.place(rq.path, relpath)
        except SpoolError as exc:
            return refuse(STATUS_OUT_OF_RESOURCES, str(exc), rq_uid)
        dir_error: BaseException | None = None
        if staged is not None:
            folder = self._folder_syncer().submit(self.spool.sync_dir, final.parent, relpath)
            try:
                is_new = staged.commit()
            except DatabaseError as exc:
                folder.exception()  # not answered before the folder's fsync is over
                return refuse(STATUS_DB_UNAVAILABLE, f"not recorded: {exc}", rq_uid)
            dir_error = folder.exception()
        else:
            try:
                recorded = self.recorder.submit(record, (audit,))
            except DatabaseError as exc:
                return refuse(STATUS_DB_UNAVAILABLE, f"not recorded: {exc}", rq_uid)
            try:
                self.spool.sync_dir(final.parent, relpath)
            except SpoolError as exc:
                dir_error = exc
            try:
                is_new = self.recorder.wait(recorded, self.config.dicom.dimse_timeout)
            except DatabaseError as exc:
                return refuse(STATUS_DB_UNAVAILABLE, f"not recorded: {exc}", rq_uid)
        if dir_error is not None:
            return refuse(STATUS_OUT_OF_RESOURCES, str(dir_error), rq_uid)

        stats = self._stats.get(rq.assoc_id)
        if stats:
            stats.stored += 1
            stats.duplicates += not is_new
            stats.series.add(record.series_instance_uid)
        log.debug("stored %s (%s)%s", relpath, record.state.value,
                  "" if is_new else " again (duplicate)")
        return STATUS_SUCCESS

    # -- shutdown -------------------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no C-STORE handler is running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


def build_ae(config: Config, scp: StorageSCP) -> tuple[AE, list[Any]]:
    """The pynetdicom AE for ``scp`` and the event handlers to bind."""
    dicom = config.dicom
    ae = AE(ae_title=dicom.ae_title)
    ae.maximum_associations = dicom.max_associations
    ae.maximum_pdu_size = dicom.max_pdu_size
    ae.acse_timeout = dicom.acse_timeout
    ae.dimse_timeout = dicom.dimse_timeout
    ae.network_timeout = dicom.network_timeout
    ae.require_called_aet = dicom.require_called_ae
    ae.add_supported_context(Verification)
    for abstract, syntaxes in _storage_contexts():
        ae.add_supported_context(abstract, syntaxes)
    handlers = [
        (evt.EVT_REQUESTED, scp.handle_requested),
        (evt.EVT_REJECTED, scp.handle_rejected),
        (evt.EVT_ESTABLISHED, scp.handle_established),
        (evt.EVT_RELEASED, scp.handle_released),
        (evt.EVT_ABORTED, scp.handle_aborted),
        (evt.EVT_C_ECHO, scp.handle_echo),
        (evt.EVT_C_STORE, scp.handle_store),
    ]
    return ae, handlers


class _Listener(Protocol):
    """What :class:`RunningSCP` needs of either engine's server."""

    server_address: Any

    def serve_forever(self, poll_interval: float = 0.5) -> None: ...
    def shutdown(self) -> None: ...
    def established_count(self) -> int: ...
    def abort_all(self) -> None: ...
    def wait_closed(self, timeout: float) -> bool: ...
    def close(self) -> None: ...


@dataclass
class RunningSCP:
    """One receiving process's running server; :meth:`stop` drains it."""

    scp: StorageSCP
    server: _Listener
    thread: threading.Thread
    recorder: Recorder
    engine: Any

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.server.server_address[1])

    def stop(self, grace: float) -> None:
        """Stop listening, let associations finish for ``grace`` s, abort the rest, flush."""
        self.scp.draining = True
        self.server.shutdown()  # stops accepting and closes the listening socket
        deadline = time.monotonic() + grace
        # Connections that never sent an A-ASSOCIATE-RQ (port probes, health checks) have
        # nothing in flight: only established associations get the grace period.
        while time.monotonic() < deadline and self.server.established_count():
            time.sleep(0.05)
        self.scp.closing = True
        busy = self.server.established_count()
        if busy:
            log.warning("aborting %d association(s) still open after the %.0f s grace; "
                        "their unacknowledged instances will be re-sent", busy, grace)
        self.server.abort_all()
        timeout = max(30.0, self.scp.config.dicom.dimse_timeout)
        if not self.scp.wait_idle(timeout=timeout):
            log.error("C-STORE handlers still running at exit")
        self.server.wait_closed(timeout=5.0)
        self.server.close()
        self.scp.close()
        self.recorder.close()
        self.engine.dispose()


def _native_server(config: Config, scp: StorageSCP, address: tuple[str, int]) -> NativeServer:
    dicom = config.dicom
    settings = ServerSettings(
        ae_title=dicom.ae_title, require_called_ae=dicom.require_called_ae,
        max_associations=dicom.max_associations, max_pdu_size=dicom.max_pdu_size,
        acse_timeout=dicom.acse_timeout, dimse_timeout=dicom.dimse_timeout,
        network_timeout=dicom.network_timeout)
    return NativeServer(scp, settings, address, supported_contexts(), scp.spool.open_incoming,
                        scp.spool.discard, ssl_context=server_ssl_context(config),
                        start_writeback=(scp.spool.start_writeback
                                         if scp.spool.writes_back_early else None))


def serve_scp(config: Config, *, host: str | None = None, port: int | None = None) -> RunningSCP:
    """Start one receiving server in this process (non-blocking) and return it.

    Builds the engine, spool and recorder once; ``[dicom] engine`` picks the receive loop:
    ``native`` (:mod:`triage_node.ulserver`) or ``pynetdicom``. Either way received data
    lands in the spool's ``.incoming`` folder, so a file is moved into place by a rename,
    never copied.
    """
    spool = Spool(config.storage.path, fsync=config.storage.fsync,
                  min_free_bytes=config.storage.min_free_mb * 2**20)
    spool.prepare()
    engine = store.make_engine(config.database.url)
    factory = store.make_session_factory(engine)
    recorder = Recorder(store.InstanceWriter(factory))
    scp = StorageSCP(config, spool, recorder, on_release=partial(store.mark_release_hint, factory))
    address = (host if host is not None else config.dicom.host,
               port if port is not None else config.dicom.port)
    server: _Listener
    if config.dicom.engine == "native":
        server = _native_server(config, scp, address)
    else:
        # pynetdicom streams into a NamedTemporaryFile in the default temporary directory
        tempfile.tempdir = str(spool.incoming)
        ae, handlers = build_ae(config, scp)
        pyn = ae.make_server(address, evt_handlers=handlers,
                             ssl_context=server_ssl_context(config),
                             server_class=ReusePortServer)
        ae._servers.append(pyn)
        server = cast(ReusePortServer, pyn)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="scp-accept", daemon=True)
    thread.start()
    log.info("receive engine: %s", config.dicom.engine)
    return RunningSCP(scp, server, thread, recorder, engine)


# ----------------------------------------------------------------------------- processes


def _child_main(config: Config, port: int, index: int, listening: Any = None) -> None:
    """Entry point of one receiving process: serve until SIGTERM/SIGINT, then drain.
    ``listening`` (a multiprocessing Event) is set once this process accepts associations."""
    setup_logging(config.logging.level, json_lines=config.logging.json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = serve_scp(config, port=port)
    log.info("receiver %d (pid %d) listening on %s:%d", index, os.getpid(), config.dicom.host,
             running.port)
    if listening is not None:
        listening.set()
    stop.wait()
    log.info("receiver %d stopping", index)
    running.stop(config.dicom.shutdown_grace)
    log.info("receiver %d stopped", index)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) an SO_REUSEPORT socket: resolves port 0 and holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def prepare(config: Config) -> None:
    """Start-up work done once, before any receiver: schema upgrade and spool check."""
    store.upgrade(config.database.url)
    spool = Spool(config.storage.path, fsync=config.storage.fsync)
    spool.prepare()
    stale = spool.clear_incoming()
    if stale:
        log.info("removed %d unacknowledged partial file(s) from %s", stale, spool.incoming)


def run_scp(config: Config, *, on_ready: Callable[[int], None] | None = None,
            extra_children: Sequence[tuple[str, Callable[[Config], None]]] = ()) -> int:
    """Run the SCP until SIGTERM/SIGINT; returns the process exit code (0 on clean stop).

    Parameters
    ----------
    config : Config
        Effective configuration.
    on_ready : callable, optional
        Called with the bound port once the receivers have been started.
    extra_children : sequence of (name, function), optional
        Further processes to run and supervise beside the receivers (``serve`` adds the
        worker); each function gets the config and runs until SIGTERM.
    """
    prepare(config)
    n = config.dicom.effective_processes
    holder = _reserve_port(config.dicom.host, config.dicom.port)
    port = int(holder.getsockname()[1])
    if n == 1 and not extra_children:
        holder.close()
        _run_single(config, port, on_ready)
        return 0

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctx = multiprocessing.get_context("spawn")
    per_process = -(-config.dicom.max_associations // n)
    child_config = _with_max_associations(config, per_process)
    listening = [ctx.Event() for _ in range(n)]
    specs: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
        (f"scp-{i}", _child_main, (child_config, port, i, listening[i])) for i in range(n)
    ] + [(name, fn, (config,)) for name, fn in extra_children]
    log.info("starting %d receiving processes", n)
    procs: list[Any] = []
    for name, target, child_args in specs:
        p = ctx.Process(target=target, args=child_args, name=name)
        p.start()
        procs.append(p)
    # Ready once every receiver accepts associations (one that died starting is restarted
    # by the loop below and not waited for here).
    while not stop.is_set() and not all(ev.is_set() or not p.is_alive()
                                        for ev, p in zip(listening, procs, strict=False)):
        stop.wait(0.02)
    if not stop.is_set():
        log.info("%s listening on %s:%d with %d receiving processes", config.dicom.ae_title,
                 config.dicom.host, port, n)
        if on_ready:
            on_ready(port)
    restarts = 0
    while not stop.wait(0.5):
        for i, p in enumerate(procs):
            if not p.is_alive() and not stop.is_set():
                restarts += 1
                name, target, child_args = specs[i]
                log.error("%s exited with %s; restarting (restart #%d)", name, p.exitcode,
                          restarts)
                time.sleep(min(5.0, 0.2 * restarts))
                procs[i] = ctx.Process(target=target, args=child_args, name=name)
                procs[i].start()
    log.info("stopping %d processes", len(procs))
    for p in procs:
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGTERM)
    code = 0
    for p in procs:
        p.join(config.dicom.shutdown_grace + 60)
        if p.is_alive():
            log.error("receiver pid %s did not stop; killing it", p.pid)
            p.kill()
            code = 1
        elif p.exitcode == -signal.SIGTERM:
            # killed by our SIGTERM before it set its handler: it was still starting and
            # had received nothing
            log.info("%s stopped while starting", p.name)
        elif p.exitcode not in (0, None):
            code = 1
    holder.close()
    log.info("stopped")
    return code


def _with_max_associations(config: Config, value: int) -> Config:
    return replace(config, dicom=replace(config.dicom, max_associations=value))


def _run_single(config: Config, port: int, on_ready: Callable[[int], None] | None) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = serve_scp(config, port=port)
    log.info("%s listening on %s:%d", config.dicom.ae_title, config.dicom.host, running.port)
    if on_ready:
        on_ready(running.port)
    stop.wait()
    log.info("stopping")
    running.stop(config.dicom.shutdown_grace)
    log.info("stopped")
