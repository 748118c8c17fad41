"""Our own DICOM Upper Layer receive loop: C-STORE and C-ECHO as an association acceptor.

Why it exists
-------------
pynetdicom runs two to three threads per association (the DUL reader polling with sleeps, the
reactor, the DIMSE queue) and hands every message across queues; on this node that alone caps
a handler that returns at once at about 260 slices/s. Here one thread serves one connection:
it reads each PDU with a few large ``recv_into`` calls into a reused buffer, writes dataset
fragments straight into the ``.incoming`` file and answers once the instance is durable.

What is reused from pynetdicom for conformance: the A-ASSOCIATE-RQ/AC/RJ PDU classes
(:mod:`pynetdicom.pdu`) and presentation context negotiation
(:func:`pynetdicom.presentation.negotiate_as_acceptor`, roles included). What is done here
by hand, because it is small: the P-DATA-TF framing and the implicit VR little endian
command set (PS3.7 E.1: a flat list of group 0000 elements).

The file written per instance is what pynetdicom writes with
``STORE_RECV_CHUNKED_DATASET``: a 128-byte preamble, ``DICM``, the File Meta group from
:func:`pynetdicom.dsutils.create_file_meta` (SOP class and instance from the command, the
context's transfer syntax), then the dataset bytes exactly as received.

Timeouts (``[dicom]``): ``acse_timeout`` from connect (and TLS handshake) to the end of the
A-ASSOCIATE-RQ; ``network_timeout`` for an idle association waiting for its next PDU;
``dimse_timeout`` for the rest of a PDU or message once it has started. A timeout of an
established association aborts it (A-ABORT), like any protocol error.

This module knows nothing of the spool or the database: it calls an
:class:`AssociationHandler` (:class:`triage_node.scp.StorageSCP`) with neutral values.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3)
_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ = 0x01, 0x02, 0x03
_P_DATA_TF, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x04, 0x05, 0x06, 0x07

# DIMSE command fields (PS3.7 E.1)
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_C_ECHO_RQ, _C_ECHO_RSP = 0x0030, 0x8030
_C_CANCEL_RQ = 0x0FFF
_NO_DATASET = 0x0101
#: status answered to a DIMSE request we do not provide (PS3.7 C.4.2 "unrecognized operation")
_UNRECOGNIZED_OPERATION = 0x0211
#: status when the store handler raised unexpectedly (what pynetdicom answers then)
STATUS_HANDLER_FAILED = 0xC211

# A-ABORT source / reason (PS3.8 9.3.8)
_ABORT_SERVICE_USER, _ABORT_PROVIDER = 0x00, 0x02
_REASON_UNRECOGNIZED_PDU, _REASON_UNEXPECTED_PDU, _REASON_INVALID_PARAMETER = 0x01, 0x02, 0x06

_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_HEADER = struct.Struct(">BxL")
_PDV = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
#: a PDU larger than this is refused whatever the peer says (memory is not the peer's to take)
_PDU_CEILING = 64 * 2**20
#: bytes of each received file kept in memory for the header parse
_HEAD_BYTES = 64 * 1024
#: while a dataset arrives, start writing it to disk every this many bytes (if enabled)
WRITEBACK_BYTES = 128 * 1024


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One received C-STORE, as the store logic needs it (no pynetdicom types).

    ``path`` is the complete received file in the spool's ``.incoming`` folder; the handler
    moves it into place or leaves it to be removed. ``head`` saves reading the header back
    from the file (see :func:`triage_node.ingest.read_header`).
    """

    assoc_id: int
    calling_ae: str
    address: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    path: Path
    #: the file's first bytes (File Meta and the start of the dataset), if at hand
    head: bytes = b""
    #: the file's length in bytes, if known (else it is looked up)
    size: int = -1


class AssociationHandler(Protocol):
    """What the receive loop calls; :class:`triage_node.scp.StorageSCP` implements it."""

    def admit(self, ae: str, address: str) -> tuple[int, int, int] | None:
        """None to go on negotiating, else the A-ASSOCIATE-RJ (result, source, reason)."""

    def rejected(self, ae: str, address: str, detail: str) -> None:
        """Audit a rejection made by the association layer itself."""

    def opened(self, assoc_id: int, ae: str, address: str) -> None:
        """An association was accepted."""

    def closed(self, assoc_id: int, ae: str, address: str, *, released: bool) -> None:
        """An established association ended: released normally, or aborted/dropped."""

    def store(self, request: StoreRequest) -> int:
        """Store one instance durably; the DIMSE status to answer."""

    def echo(self) -> int:
        """The C-ECHO status."""

    def unreceivable(self, assoc_id: int, ae: str, address: str, sop_instance_uid: str,
                     why: str) -> int:
        """A C-STORE whose data could not even be written to ``.incoming``: its status."""


class _Abort(Exception):
    """Abort the association: a protocol error (or timeout) on our side's reading."""

    def __init__(self, why: str, source: int = _ABORT_PROVIDER,
                 reason: int = _REASON_UNEXPECTED_PDU) -> None:
        super().__init__(why)
        self.source = source
        self.reason = reason


class _Gone(Exception):
    """The peer closed the connection, or it was closed under us."""


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO (at least a microsecond: zero
    would mean no timeout)."""
    micros = max(1, round(seconds * 1e6))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


def _uid(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ")


def decode_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set as ``{tag: value bytes}``.

    Raises
    ------
    ValueError
        If an element runs past the end or is not in group 0000.
    """
    out: dict[int, bytes] = {}
    view = memoryview(data)
    off, end = 0, len(view)
    while off < end:
        if end - off < 8:
            raise ValueError("truncated command element header")
        group, elem, length = _ELEMENT.unpack_from(view, off)
        off += 8
        if group != 0 or length == 0xFFFFFFFF or off + length > end:
            raise ValueError(f"malformed command element ({group:04X},{elem:04X})")
        out[elem] = bytes(view[off:off + length])
        off += length
    return out


def _us(cmd: dict[int, bytes], elem: int) -> int:
    value = cmd.get(elem)
    if value is None or len(value) != 2:
        raise ValueError(f"command element (0000,{elem:04X}) missing or not US")
    return int(struct.unpack("<H", value)[0])


def _encode_element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0, elem, len(value)) + value


def encode_response(command_field: int, message_id: int, status: int, sop_class: str = "",
                    sop_instance: str = "") -> bytes:
    """An implicit VR little endian response command set, group length first."""
    body = b"".join((
        _encode_element(0x0002, sop_class.encode("ascii")) if sop_class else b"",
        _encode_element(0x0100, struct.pack("<H", command_field)),
        _encode_element(0x0120, struct.pack("<H", message_id)),
        _encode_element(0x0800, struct.pack("<H", _NO_DATASET)),
        _encode_element(0x0900, struct.pack("<H", status)),
        _encode_element(0x1000, sop_instance.encode("ascii")) if sop_instance else b"",
    ))
    return _encode_element(0x0000, struct.pack("<L", len(body))) + body


def _explicit(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2sHL", 2, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


_META_VERSION = _explicit(0x0001, b"OB", b"\x00\x01", b"\x00")
_META_IMPLEMENTATION = (
    _explicit(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\x00")
    + _explicit(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")
)


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta group, as pynetdicom's chunked receive writes them.

    The bytes :func:`pynetdicom.dsutils.create_file_meta` + pydicom's
    ``write_file_meta_info`` give (a test holds them equal), encoded here directly: those
    take half a millisecond per instance.
    """
    body = b"".join((
        _META_VERSION,
        _explicit(0x0002, b"UI", sop_class.encode("ascii", "replace"), b"\x00"),
        _explicit(0x0003, b"UI", sop_instance.encode("ascii", "replace"), b"\x00"),
        _explicit(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
        _META_IMPLEMENTATION,
    ))
    group = struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group + body


# --------------------------------------------------------------- A-ASSOCIATE, common case

#: a UID as the fast path takes it: digits and dots, no padding (anything else: pynetdicom)
_PLAIN_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_ITEM = struct.Struct(">BxH")
_DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


@dataclass(frozen=True, slots=True)
class AssociateRQ:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) as the acceptor needs it, decoded directly.

    Decoding a storescu request (128 presentation contexts) with pynetdicom's PDU classes
    and negotiating with :func:`pynetdicom.presentation.negotiate_as_acceptor` takes about
    14-27 ms of CPU here, with every UID validated several times over; this takes 0.8-1.6 ms.
    :func:`parse_associate_rq` returns one only for the common case.
    """

    #: the AE title fields as received (the A-ASSOCIATE-AC returns them unchanged)
    called_ae_field: bytes
    calling_ae_field: bytes
    application_context: str
    #: (context ID, abstract syntax, proposed transfer syntaxes), in the order received
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]
    #: the requestor's maximum PDU length (0: no limit)
    max_length: int
    #: whether an Asynchronous Operations Window was proposed
    async_window: bool

    @property
    def calling_ae(self) -> str:
        return self.calling_ae_field.decode("ascii").strip()

    @property
    def called_ae(self) -> str:
        return self.called_ae_field.decode("ascii").strip()


def _plain_uid(value: bytes) -> str:
    if len(value) > 64 or not _PLAIN_UID.fullmatch(value):
        raise _Unusual
    return value.decode("ascii")


class _Unusual(Exception):
    """Something :func:`parse_associate_rq` leaves to pynetdicom."""


def parse_associate_rq(body: bytes | bytearray | memoryview) -> AssociateRQ | None:
    """The A-ASSOCIATE-RQ after its 6-byte PDU header, or None to let pynetdicom decode it.

    None for anything outside the common case: SCP/SCU role selection, extended
    negotiation or user identity items, UIDs that are not plain digits and dots (padding
    included), AE titles that are blank or not printable ASCII without backslashes, a
    context ID used twice, or any structure out of place.
    """
    data = bytes(body)
    try:
        if len(data) < 68:
            raise _Unusual
        called, calling = data[4:20], data[20:36]
        for ae in (called, calling):  # what pynetdicom refuses, it refuses
            if not ae.strip(b" ") or not all(0x20 <= b < 0x7F and b != 0x5C for b in ae):
                raise _Unusual
        application = None
        contexts: list[tuple[int, str, tuple[str, ...]]] = []
        ids: set[int] = set()
        max_length, async_window, user_seen = 0, False, False
        for kind, item in _items(data, 68):
            if kind == 0x10 and application is None:
                application = _plain_uid(item)
            elif kind == 0x20:
                contexts.append(_presentation_context(item))
                if contexts[-1][0] in ids:
                    raise _Unusual
                ids.add(contexts[-1][0])
            elif kind == 0x50 and not user_seen:
                user_seen = True
                max_length, async_window = _user_information(item)
            else:
                raise _Unusual
        if application is None or not user_seen:
            raise _Unusual
    except (_Unusual, struct.error, UnicodeDecodeError):
        return None
    return AssociateRQ(called, calling, application, tuple(contexts), max_length,
                       async_window)


def _items(data: bytes, off: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each item from ``off`` on: a type byte, a reserved byte, a 2-byte
    length (PS3.8 9.3.2); one running past the end raises."""
    while off < len(data):
        kind, length = _ITEM.unpack_from(data, off)
        value = data[off + 4:off + 4 + length]
        if len(value) != length:
            raise _Unusual
        off += 4 + length
        yield kind, value


def _presentation_context(item: bytes) -> tuple[int, str, tuple[str, ...]]:
    if len(item) < 4:
        raise _Unusual
    context_id = item[0]
    abstract = None
    syntaxes: list[str] = []
    for kind, value in _items(item, 4):
        if kind == 0x30 and abstract is None and not syntaxes:
            abstract = _plain_uid(value)
        elif kind == 0x40 and abstract is not None:
            syntaxes.append(_plain_uid(value))
        else:
            raise _Unusual
    if abstract is None or not syntaxes or not context_id % 2:
        raise _Unusual
    return context_id, abstract, tuple(syntaxes)


def _user_information(item: bytes) -> tuple[int, bool]:
    max_length, async_window = None, False
    for kind, value in _items(item):
        length = len(value)
        if kind == 0x51 and length == 4 and max_length is None:
            max_length = int.from_bytes(value, "big")
        elif kind == 0x52:
            _plain_uid(value)
        elif kind == 0x53 and length == 4 and not async_window:
            async_window = True
        elif kind == 0x55 and 1 <= length <= 16:
            pass
        else:  # role selection, extended negotiation, user identity, ...: pynetdicom
            raise _Unusual
    if max_length is None:
        raise _Unusual
    return max_length, async_window


def _sub_item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


class Acceptor:
    """Presentation context negotiation and the A-ASSOCIATE-AC, for :class:`AssociateRQ`.

    The same results as :func:`pynetdicom.presentation.negotiate_as_acceptor` for
    contexts without SCP/SCU roles (ours): per proposed context, in context ID order,
    accepted with the first of *our* transfer syntaxes the requestor proposed, else
    rejected as abstract syntax (0x03) or transfer syntaxes (0x04) not supported. The
    A-ASSOCIATE-AC is the one pynetdicom's PDU classes encode (a test holds them equal).
    """

    def __init__(self, contexts: Sequence[PresentationContext], max_pdu_size: int) -> None:
        self.supported = {str(cx.abstract_syntax): tuple(str(t) for t in cx.transfer_syntax)
                          for cx in contexts}
        #: contexts with roles of their own need pynetdicom's role negotiation
        self.usable = all(None in (cx.scu_role, cx.scp_role) for cx in contexts)
        self._user = b"".join((
            _sub_item(0x51, struct.pack(">L", max_pdu_size)),
            _sub_item(0x52, PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
            _sub_item(0x55, PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        ))

    def negotiate(self, rq: AssociateRQ) -> tuple[bytes, dict[int, tuple[str, str]], int]:
        """The A-ASSOCIATE-AC PDU, the accepted contexts ``{id: (abstract, syntax)}`` and
        the requestor's maximum PDU length (as :func:`pynetdicom_accept`)."""
        items = [_sub_item(0x10, rq.application_context.encode("ascii"))]
        accepted: dict[int, tuple[str, str]] = {}
        for context_id, abstract, proposed in sorted(rq.contexts):
            ours = self.supported.get(abstract)
            chosen = None if ours is None else next((t for t in ours if t in proposed), None)
            if chosen is not None:
                result = 0x00
                accepted[context_id] = (abstract, chosen)
            else:
                result = 0x03 if ours is None else 0x04
            ts = _sub_item(0x40, (chosen or proposed[0]).encode("ascii"))
            items.append(_sub_item(0x21, bytes((context_id, 0, result, 0)) + ts))
        user = self._user
        if rq.async_window:  # we perform one operation at a time
            user += _sub_item(0x53, struct.pack(">HH", 1, 1))
        items.append(_sub_item(0x50, user))
        variable = b"".join(items)
        body = (b"\x00\x01\x00\x00" + rq.called_ae_field + rq.calling_ae_field
                + b"\x00" * 32 + variable)
        return _HEADER.pack(_ASSOCIATE_AC, len(body)) + body, accepted, rq.max_length


def decode_associate_rq(pdu: bytes) -> A_ASSOCIATE:
    """A whole A-ASSOCIATE-RQ PDU as pynetdicom's primitive (raises if malformed)."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu)
    return rq.to_primitive()


def pynetdicom_accept(prim: A_ASSOCIATE, contexts: Sequence[PresentationContext],
                      max_pdu_size: int) -> tuple[bytes, dict[int, tuple[str, str]], int]:
    """Negotiate with pynetdicom: the A-ASSOCIATE-AC PDU, the accepted contexts
    ``{id: (abstract, syntax)}`` and the requestor's maximum PDU length."""
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    async_rq = False
    max_len = 0
    for item in prim.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[UID(str(item.sop_class_uid))] = (item.scu_role, item.scp_role)
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            async_rq = True
        elif isinstance(item, MaximumLengthNotification):
            max_len = int(item.maximum_length_received or 0)
    result, ac_roles = negotiate_as_acceptor(
        prim.presentation_context_definition_list, list(contexts), roles or None)
    accepted = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in result if cx.result == 0x00 and cx.context_id is not None
    }
    ac = A_ASSOCIATE()
    ac.application_context_name = prim.application_context_name
    ac.calling_ae_title = prim.calling_ae_title
    ac.called_ae_title = prim.called_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = result
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu_size
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    user: list[Any] = [ml, ic, iv, *ac_roles]
    if async_rq:  # we perform one operation at a time
        aw = AsynchronousOperationsWindowNegotiation()
        aw.maximum_number_operations_invoked = 1
        aw.maximum_number_operations_performed = 1
        user.append(aw)
    ac.user_information = user
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return pdu.encode(), accepted, max_len


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return _HEADER.pack(_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The ``[dicom]`` values the receive loop needs."""

    ae_title: str
    require_called_ae: bool
    max_associations: int
    max_pdu_size: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float


class _Connection:
    """One TCP connection: negotiation, then P-DATA until release or abort (own thread)."""

    def __init__(self, server: NativeServer, sock: socket.socket, address: str) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.address = address
        self.ae = ""
        #: counted against max_associations once an A-ASSOCIATE-RQ arrived
        self.negotiating = False
        self.established = False
        self._send_lock = threading.Lock()
        self._aborted_locally = False
        self._closed = False
        self._buf = bytearray(256 * 1024)
        self._contexts: dict[int, tuple[str, str]] = {}
        self._peer_max = 0
        self.assoc_id = id(self)
        #: plain TCP: a blocking socket with kernel timeouts (SO_RCVTIMEO), read with
        #: MSG_WAITALL - one system call per PDU part, no poll() before each recv
        self._kernel_timeouts = False
        self._timeout: float | None = None

    # -- socket helpers ------------------------------------------------------------------

    def _read(self, n: int, timeout: float) -> memoryview:
        """Exactly ``n`` bytes into the reused buffer (valid until the next read)."""
        if len(self._buf) < n:
            self._buf = bytearray(max(n, 2 * len(self._buf)))
        view = memoryview(self._buf)[:n]
        got = 0
        try:
            self._set_timeout(timeout)
        except OSError as exc:  # closed under us by abort()
            raise _Gone(str(exc)) from exc
        flags = socket.MSG_WAITALL if self._kernel_timeouts else 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got, flags)
            except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO
                raise _Abort(f"no data for {timeout:g} s") from exc
            except (OSError, ValueError) as exc:  # reset, or closed under us by abort()
                raise _Gone(str(exc)) from exc
            if k == 0:
                raise _Gone("connection closed by peer")
            got += k
        return view

    def _set_timeout(self, timeout: float) -> None:
        if timeout == self._timeout:
            return
        if self._kernel_timeouts:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        else:
            self.sock.settimeout(timeout)
        self._timeout = timeout

    def _use_kernel_timeouts(self) -> None:
        """Switch a plain TCP socket to blocking reads with SO_RCVTIMEO (sends give up
        after the DIMSE timeout: SO_SNDTIMEO)."""
        try:
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 _timeval(self.server.settings.dimse_timeout))
        except OSError:
            return
        self._kernel_timeouts = True
        self._timeout = None

    def _read_pdu(self, header_timeout: float) -> tuple[int, memoryview]:
        hdr = self._read(6, header_timeout)
        pdu_type, length = _HEADER.unpack(hdr)
        if length > _PDU_CEILING:
            raise _Abort(f"PDU of {length} bytes", reason=_REASON_INVALID_PARAMETER)
        body = self._read(length, self.server.settings.dimse_timeout) if length else memoryview(b"")
        return pdu_type, body

    def _send(self, data: bytes) -> bool:
        with self._send_lock:
            if self._closed:
                return False
            try:
                self.sock.sendall(data)
            except (OSError, ValueError):
                return False
        return True

    def _send_command(self, context_id: int, command: bytes) -> bool:
        """Send a command set in P-DATA-TF PDUs that fit the peer's maximum length."""
        room = self._peer_max - 6 if self._peer_max else len(command)
        room = max(room, 1)
        out = bytearray()
        for start in range(0, len(command), room):
            chunk = command[start:start + room]
            last = start + room >= len(command)
            out += _HEADER.pack(_P_DATA_TF, len(chunk) + 6)
            out += _PDV.pack(len(chunk) + 2, context_id, 0x03 if last else 0x01)
            out += chunk
        return self._send(bytes(out))

    def abort(self, source: int = _ABORT_SERVICE_USER, reason: int = 0) -> None:
        """Send A-ABORT and close the connection; safe from any thread."""
        with self._send_lock:
            if self._closed:
                return
            self._aborted_locally = True
            with contextlib.suppress(OSError, ValueError):
                self.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00" + bytes((source, reason)))
            self._close_locked()

    def close(self) -> None:
        """Close without a word (a connection that never associated)."""
        with self._send_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes our thread if it is blocked in recv
        with contextlib.suppress(OSError, ValueError):
            self.sock.close()

    # -- the connection's life -----------------------------------------------------------

    def run(self) -> None:
        handler = self.server.handler
        settings = self.server.settings
        released = False
        try:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.server.ssl_context is not None:
                self.sock.settimeout(settings.acse_timeout)
                try:
                    self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.info("TLS handshake with %s failed: %s", self.address, exc)
                    return
            else:
                self._use_kernel_timeouts()
            if not self._negotiate():
                return
            handler.opened(self.assoc_id, self.ae, self.address)
            self.established = True
            released = self._serve()
        except _Abort as exc:
            if not self._closed:
                log.warning("aborting association from %s@%s: %s", self.ae, self.address, exc)
            self.abort(exc.source, exc.reason)
        except _Gone as exc:
            if self.established and not self._aborted_locally:
                log.info("connection from %s@%s lost: %s", self.ae, self.address, exc)
        except Exception:
            log.exception("receive loop for %s@%s failed", self.ae, self.address)
            self.abort(_ABORT_PROVIDER, 0)
        finally:
            self.close()
            self._discard_partial()
            self._discard_spare()
            if self.established:
                try:
                    handler.closed(self.assoc_id, self.ae, self.address, released=released)
                except Exception:
                    log.exception("association close handler failed")
            self.server._forget(self)

    def _negotiate(self) -> bool:
        """A-ASSOCIATE-RQ -> AC, or RJ; False when there is no association."""
        settings = self.server.settings
        deadline = time.monotonic() + settings.acse_timeout
        try:
            pdu_type, body = self._read_pdu(settings.acse_timeout)
        except _Abort:
            log.info("no A-ASSOCIATE-RQ from %s within %g s", self.address, settings.acse_timeout)
            return False
        except _Gone:
            return False  # a port probe
        if time.monotonic() > deadline:
            log.info("A-ASSOCIATE-RQ from %s too slow", self.address)
            return False
        if pdu_type != _ASSOCIATE_RQ:
            raise _Abort(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                         reason=_REASON_UNEXPECTED_PDU if pdu_type <= _ABORT
                         else _REASON_UNRECOGNIZED_PDU)
        # The common case is read and answered directly; anything else (role selection and
        # the like, unusual encodings) by pynetdicom's PDU classes.
        fast = parse_associate_rq(body) if self.server.acceptor.usable else None
        negotiate: Callable[[], tuple[bytes, dict[int, tuple[str, str]], int]]
        if fast is not None:
            ae, application, called = fast.calling_ae, fast.application_context, fast.called_ae
            negotiate = partial(self.server.acceptor.negotiate, fast)
        else:
            try:
                prim = decode_associate_rq(bytes((pdu_type, 0)) + struct.pack(">L", len(body))
                                           + bytes(body))
            except Exception as exc:
                raise _Abort(f"malformed A-ASSOCIATE-RQ: {exc}",
                             reason=_REASON_INVALID_PARAMETER) from exc
            ae = str(prim.calling_ae_title or "").strip()
            application = str(prim.application_context_name)
            called = str(prim.called_ae_title or "").strip()
            negotiate = partial(pynetdicom_accept, prim, self.server.contexts,
                                settings.max_pdu_size)
        self.negotiating = True
        self.ae = ae
        handler = self.server.handler
        rsd = handler.admit(self.ae, self.address)
        if rsd is None:
            layer = self._layer_check(application, called)
            if layer is not None:
                handler.rejected(self.ae, self.address, layer[3])
                rsd = layer[:3]
        if rsd is not None:
            self._reject(rsd)
            return False
        ac, self._contexts, self._peer_max = negotiate()
        if not self._send(ac):
            return False
        if not self._contexts:
            log.info("association from %s@%s: no presentation context accepted", self.ae,
                     self.address)
        return True

    def _layer_check(self, application_context: str,
                     called: str) -> tuple[int, int, int, str] | None:
        """The association layer's own rejections (those pynetdicom's ACSE makes)."""
        settings = self.server.settings
        if application_context != _DICOM_APPLICATION_CONTEXT:
            return (0x01, 0x01, 0x02, "application context name not supported")
        if settings.require_called_ae and called != settings.ae_title.strip():
            return (0x01, 0x01, 0x07, f"called AE title {called!r} not recognised")
        if self.server._negotiating_count() > settings.max_associations:
            return (0x02, 0x03, 0x02, "association limit reached")
        return None

    def _reject(self, rsd: tuple[int, int, int]) -> None:
        self._send(associate_rj(*rsd))
        # The peer closes after reading the reject; give it a moment so it reads it first.
        with contextlib.suppress(OSError, ValueError):
            self._set_timeout(1.0)
            self.sock.recv(1)

    # -- P-DATA ----------------------------------------------------------------------------

    _cmd: bytearray
    _msg: dict[int, bytes] | None
    _file: BinaryIO | None
    _tmp: Path | None
    _sink: bool
    _sink_reason: str = ""
    _head: bytearray
    #: bytes of the receiving file not yet handed to :attr:`NativeServer.start_writeback`
    _unwritten: int = 0
    #: the next C-STORE's ``.incoming`` file, being made ahead (:meth:`_make_spare`)
    _spare: Future[tuple[BinaryIO, Path]] | None = None

    def _discard_partial(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
            self._file = None
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            self.server.discard(tmp)
            self._tmp = None

    def _discard_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.add_done_callback(self.server.discard_spare)

    def _make_spare(self) -> None:
        """Have the next instance's ``.incoming`` file created on the server's helper
        thread while the handler stores this one: creating a file costs 0.1-0.7 ms of CPU
        here (the file system's search for a free inode), which then runs on the other
        core while this thread waits for the disk, instead of after the answer, while the
        peer's next request is arriving."""
        if self._spare is None:
            self._spare = self.server.make_spare()

    def _take_spare(self) -> tuple[BinaryIO, Path]:
        """The file made ahead, else a new one (raises as ``open_incoming`` does)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                return spare.result()
            except Exception:  # e.g. unwritable spool: the direct attempt says why
                pass
        return self.server.open_incoming()

    def _serve(self) -> bool:
        """P-DATA until A-RELEASE (True) or an A-ABORT from the peer (False)."""
        settings = self.server.settings
        self._cmd = bytearray()
        self._msg = None  # command of the message whose dataset is arriving
        self._ctx = 0
        self._file = None
        self._tmp = None
        self._sink = False
        while True:
            mid_message = bool(self._cmd) or self._msg is not None
            pdu_type, body = self._read_pdu(
                settings.dimse_timeout if mid_message else settings.network_timeout)
            if pdu_type == _P_DATA_TF:
                self._p_data(body)
            elif pdu_type == _RELEASE_RQ:
                if mid_message:
                    log.warning("release from %s@%s in the middle of a message", self.ae,
                                self.address)
                self._discard_partial()
                self._send(_RELEASE_RP_PDU)
                return True
            elif pdu_type == _ABORT:
                self._discard_partial()
                return False
            elif pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _RELEASE_RP):
                raise _Abort(f"unexpected PDU type 0x{pdu_type:02X}")
            else:
                raise _Abort(f"unrecognised PDU type 0x{pdu_type:02X}",
                             reason=_REASON_UNRECOGNIZED_PDU)

    def _p_data(self, body: memoryview) -> None:
        off, end = 0, len(body)
        if end == 0:
            raise _Abort("empty P-DATA-TF", reason=_REASON_INVALID_PARAMETER)
        while off < end:
            if end - off < 6:
                raise _Abort("truncated PDV item", reason=_REASON_INVALID_PARAMETER)
            length, ctx, control = _PDV.unpack_from(body, off)
            if length < 2 or off + 4 + length > end:
                raise _Abort("PDV item length out of range", reason=_REASON_INVALID_PARAMETER)
            data = body[off + 6:off + 4 + length]
            off += 4 + length
            if ctx not in self._contexts:
                raise _Abort(f"PDV on presentation context {ctx}, which was not accepted",
                             reason=_REASON_INVALID_PARAMETER)
            if control & 0x01:
                if self._msg is not None:
                    raise _Abort("command fragment while a dataset was expected")
                self._cmd += data
                if control & 0x02:
                    self._command_complete(ctx)
            else:
                if self._msg is None or ctx != self._ctx:
                    raise _Abort("dataset fragment without its command")
                if self._file is not None:
                    if len(self._head) < _HEAD_BYTES:
                        self._head += data[:_HEAD_BYTES - len(self._head)]
                    try:
                        self._file.write(data)
                        self._size += len(data)
                        self._unwritten += len(data)
                        if self._unwritten >= WRITEBACK_BYTES:
                            self._writeback()
                    except OSError as exc:  # disk full: keep reading, answer the failure later
                        self._sink_reason = f"cannot write the received data: {exc}"
                        self._discard_partial()
                        self._sink = True
                if control & 0x02:
                    self._dataset_complete()

    def _writeback(self) -> None:
        """Start the disk writes of the bytes that arrived since the last call."""
        start = self.server.start_writeback
        if start is None or self._file is None:
            return
        self._file.flush()
        start(self._file.fileno(), self._size - self._unwritten, self._unwritten)
        self._unwritten = 0

    def _command_complete(self, ctx: int) -> None:
        try:
            cmd = decode_command(self._cmd)
            field = _us(cmd, 0x0100)
            has_dataset = _us(cmd, 0x0800) != _NO_DATASET
        except ValueError as exc:
            raise _Abort(f"malformed command set: {exc}",
                         reason=_REASON_INVALID_PARAMETER) from exc
        self._cmd = bytearray()
        self._ctx = ctx
        if field & 0x8000 or field == _C_CANCEL_RQ:
            if has_dataset:  # a response to nothing we sent: read past its dataset
                self._msg, self._sink = cmd, True
            return
        try:
            _us(cmd, 0x0110)
        except ValueError as exc:
            raise _Abort(f"request without a Message ID: {exc}",
                         reason=_REASON_INVALID_PARAMETER) from exc
        if not has_dataset:
            self._answer(cmd)
            return
        self._msg = cmd
        self._sink = True
        self._sink_reason = ""
        if field == _C_STORE_RQ:
            sop_class = _uid(cmd.get(0x0002, b""))
            sop_instance = _uid(cmd.get(0x1000, b""))
            try:
                meta = file_meta_bytes(sop_class, sop_instance, self._contexts[ctx][1])
                self._file, self._tmp = self._take_spare()
                self._file.write(meta)
                self._size = len(meta)
                self._unwritten = 0
                self._head = bytearray(meta)
                self._sink = False
            except Exception as exc:  # spool unwritable: answered as out of resources
                self._sink_reason = f"cannot receive into the spool: {exc}"
                self._discard_partial()

    def _dataset_complete(self) -> None:
        cmd = self._msg
        assert cmd is not None
        self._msg = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._sink_reason = f"cannot write the received data: {exc}"
                self._discard_partial()
                self._sink = True
            self._file = None
        field = _us(cmd, 0x0100)
        if field & 0x8000 or field == _C_CANCEL_RQ:
            return
        self._answer(cmd)

    def _answer(self, cmd: dict[int, bytes]) -> None:
        field = _us(cmd, 0x0100)
        message_id = _us(cmd, 0x0110)
        sop_class = _uid(cmd.get(0x0002, b""))
        sop_instance = _uid(cmd.get(0x1000, b""))
        if field == _C_ECHO_RQ:
            rsp = encode_response(_C_ECHO_RSP, message_id, self.server.handler.echo(),
                                  sop_class or "1.2.840.10008.1.1")
        elif field == _C_STORE_RQ:
            status = self._store(sop_class, sop_instance)
            rsp = encode_response(_C_STORE_RSP, message_id, status, sop_class, sop_instance)
        else:
            log.warning("DIMSE command 0x%04X from %s@%s not supported", field, self.ae,
                        self.address)
            rsp = encode_response(field | 0x8000, message_id, _UNRECOGNIZED_OPERATION,
                                  sop_class, sop_instance)
        self._send_command(self._ctx, rsp)

    def _store(self, sop_class: str, sop_instance: str) -> int:
        tmp, self._tmp = self._tmp, None
        if tmp is None or self._sink:
            if tmp is not None:
                self.server.discard(tmp)
            return self.server.handler.unreceivable(
                self.assoc_id, self.ae, self.address, sop_instance,
                self._sink_reason or "could not write the received data")
        request = StoreRequest(self.assoc_id, self.ae, self.address, sop_class, sop_instance,
                               self._contexts[self._ctx][1], tmp, bytes(self._head), self._size)
        self._make_spare()
        try:
            return self.server.handler.store(request)
        except Exception:
            log.exception("C-STORE handler failed for %s", sop_instance)
            return STATUS_HANDLER_FAILED
        finally:
            self.server.discard(tmp)  # gone already when it was moved into place


class NativeServer:
    """Accepts connections on one SO_REUSEPORT socket; one thread per connection.

    Parameters
    ----------
    handler : AssociationHandler
        The store logic.
    settings : ServerSettings
        AE title, limits and timeouts.
    address : (host, port)
        Where to listen (port 0: any free port).
    contexts : sequence of PresentationContext
        The supported presentation contexts (abstract syntax + transfer syntaxes).
    open_incoming, discard : callable
        Create a temporary file to receive into (``(file, path)``); remove one.
    ssl_context : ssl.SSLContext, optional
        Wrap every connection in TLS.
    start_writeback : callable, optional
        Called as ``(fd, offset, length)`` for each :data:`WRITEBACK_BYTES` of a dataset
        that arrived: starts writing them to disk without waiting, so the handler's
        ``fsync`` has less left to do (:meth:`triage_node.spool.Spool.start_writeback`).
    """

    def __init__(self, handler: AssociationHandler, settings: ServerSettings,
                 address: tuple[str, int], contexts: Sequence[PresentationContext],
                 open_incoming: Callable[[], tuple[BinaryIO, Path]],
                 discard: Callable[[Path], None],
                 ssl_context: ssl.SSLContext | None = None,
                 start_writeback: Callable[[int, int, int], None] | None = None) -> None:
        self.handler = handler
        self.settings = settings
        self.contexts = list(contexts)
        self.open_incoming = open_incoming
        self.discard = discard
        self.ssl_context = ssl_context
        self.start_writeback = start_writeback
        self.acceptor = Acceptor(self.contexts, settings.max_pdu_size)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(address)
        self.socket.listen(64)
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._spares = ThreadPoolExecutor(2, thread_name_prefix="spool-create")

    def make_spare(self) -> Future[tuple[BinaryIO, Path]] | None:
        """Start creating an ``.incoming`` file on a helper thread (None once closed)."""
        try:
            return self._spares.submit(self.open_incoming)
        except RuntimeError:  # shut down
            return None

    def discard_spare(self, made: Future[tuple[BinaryIO, Path]]) -> None:
        """Close and remove a file made ahead that will not be used."""
        if made.cancelled() or made.exception() is not None:
            return
        fh, path = made.result()
        with contextlib.suppress(OSError):
            fh.close()
        self.discard(path)

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """Accept until :meth:`shutdown`."""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.socket], [], [], poll_interval)
                if not ready or self._stop.is_set():
                    continue
                try:
                    sock, peer = self.socket.accept()
                except OSError:
                    continue
                conn = _Connection(self, sock, str(peer[0]))
                thread = threading.Thread(target=conn.run, name=f"ul-{peer[0]}:{peer[1]}",
                                          daemon=True)
                with self._lock:
                    self._conns.add(conn)
                    self._threads.add(thread)
                thread.start()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (open connections go on)."""
        self._stop.set()
        self._stopped.wait(5)
        self.socket.close()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._threads.discard(threading.current_thread())

    def _negotiating_count(self) -> int:
        with self._lock:
            return sum(c.negotiating for c in self._conns)

    def established_count(self) -> int:
        """Associations currently established."""
        with self._lock:
            return sum(c.established for c in self._conns)

    def abort_all(self) -> None:
        """A-ABORT every association; close connections that never associated."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()

    def wait_closed(self, timeout: float) -> bool:
        """Wait for the connection threads to finish (their audit events queued)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(min(left, 0.5))

    def close(self) -> None:
        """After :meth:`wait_closed`: stop the threads that make files ahead (the
        connections have removed the files they did not use)."""
        self._spares.shutdown(wait=True)
