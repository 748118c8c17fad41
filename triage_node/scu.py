"""DICOM SCU: verify a peer with C-ECHO and send files to it with C-STORE.

pynetdicom enters the node here and nowhere else on the sending side; its errors and
association outcomes are translated into :mod:`triage_node.errors`:

- the peer cannot be reached, times out, aborts, or rejects *transiently*
  -> :class:`~triage_node.errors.RetryableAssociationError`;
- the peer rejects *permanently* (unknown AE title...) or accepts none of the proposed
  presentation contexts -> :class:`~triage_node.errors.PermanentAssociationError`.

Once an association is up, :func:`send` never raises for what happens to single files: the
:class:`SendReport` says what went through and why the rest did not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from triage_node.errors import (
    AssociationError,
    PermanentAssociationError,
    RetryableAssociationError,
)

__all__ = [
    "DEFAULT_CALLED_AE",
    "DEFAULT_CALLING_AE",
    "MAX_CONTEXTS_PER_ASSOCIATION",
    "AssociationFactory",
    "AssociationRequest",
    "FailedFile",
    "ProposedContext",
    "PynetdicomAssociation",
    "SendReport",
    "StoreAssociation",
    "StoreWarning",
    "associate",
    "collect_files",
    "echo",
    "send",
]

logger = logging.getLogger(__name__)

DEFAULT_CALLED_AE = "ANY-SCP"
DEFAULT_CALLING_AE = "TRIAGE-SCU"
DEFAULT_TIMEOUT = 30.0
#: PS3.8: context IDs are odd numbers 1..255, so at most 128 contexts per association.
MAX_CONTEXTS_PER_ASSOCIATION = 128
#: Maximum PDU we accept (0 = unlimited); what we send is capped by the peer's maximum.
MAX_PDU_RECEIVE = 0

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
#: C-STORE warning statuses (PS3.4 B.2.3): the instance was stored, perhaps changed.
WARNING_STATUSES: frozenset[int] = frozenset({0xB000, 0xB006, 0xB007})
_UNCOMPRESSED_FALLBACKS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True, slots=True)
class FailedFile:
    """A file that did not reach the peer.

    ``status`` is the peer's C-STORE status, or ``None`` when there was no response
    (unreadable file, no usable presentation context, association lost). ``retryable``
    says whether sending it again later may succeed (association lost, peer out of
    resources) as opposed to a problem with the file or the peer's configuration.
    """

    path: Path
    status: int | None
    reason: str
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class StoreWarning:
    """A file the peer stored with a warning status (0xB000, 0xB006 or 0xB007)."""

    path: Path
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendReport:
    """Outcome of :func:`send`: ``sent`` counts files stored, warnings included."""

    sent: int
    failed: tuple[FailedFile, ...] = ()
    warnings: tuple[StoreWarning, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """``True`` when no file failed."""
        return not self.failed


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context to propose: an abstract syntax and its transfer syntaxes."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AssociationRequest:
    """Everything needed to open one association (what an association factory receives)."""

    host: str
    port: int
    called_ae: str
    calling_ae: str
    contexts: tuple[ProposedContext, ...]
    timeout: float = DEFAULT_TIMEOUT
    ssl_context: ssl.SSLContext | None = None

    @property
    def peer(self) -> str:
        """``CALLED_AE@host:port``, for messages and logs."""
        return f"{self.called_ae}@{self.host}:{self.port}"


class StoreAssociation(Protocol):
    """The part of :class:`pynetdicom.association.Association` that :func:`send` uses."""

    @property
    def is_established(self) -> bool:
        """Whether the association is up."""

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        """Accepted contexts; ``transfer_syntax[0]`` is the agreed transfer syntax."""

    @property
    def rejected_contexts(self) -> list[PresentationContext]:
        """Rejected contexts as proposed, with ``result`` set."""

    def send_c_store(self, dataset: str | Path | Dataset, msg_id: int = 1) -> Dataset:
        """Send one C-STORE; an empty Dataset means no response (association lost)."""

    def release(self) -> None:
        """Release the association."""

    def abort(self) -> None:
        """Abort the association."""


#: Opens an established association for a request or raises an ``AssociationError``.
AssociationFactory = Callable[[AssociationRequest], StoreAssociation]


class PynetdicomAssociation:
    """A pynetdicom ``Association`` whose reactor cannot steal responses.

    pynetdicom 3.0 pauses its reactor thread around each request with a flag that can be
    stale: right after one response, the next request may go out while the reactor is
    still waking up, and if the peer answers within that millisecond the reactor takes
    the response ("Received unexpected C-STORE service message") and the request waits
    for the DIMSE timeout. Against a local storescp this hit about one C-STORE in two
    thousand. Here each request first waits until the reactor is really parked.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        An established association, as returned by ``AE.associate``.
    timeout : float
        Seconds to wait for the reactor to park before sending anyway.
    """

    def __init__(self, assoc: Association, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.assoc = assoc
        self._timeout = timeout
        self._gate = _ReactorGate()
        assoc._reactor_checkpoint = self._gate

    @property
    def is_established(self) -> bool:
        """Whether the association is up."""
        return bool(self.assoc.is_established)

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        """Accepted presentation contexts."""
        return self.assoc.accepted_contexts

    @property
    def rejected_contexts(self) -> list[PresentationContext]:
        """Rejected presentation contexts."""
        return self.assoc.rejected_contexts

    def send_c_store(self, dataset: str | Path | Dataset, msg_id: int = 1) -> Dataset:
        """``Association.send_c_store`` once the reactor is parked."""
        self._park_reactor()
        return self.assoc.send_c_store(dataset, msg_id=msg_id)

    def send_c_echo(self, msg_id: int = 1) -> Dataset:
        """``Association.send_c_echo`` once the reactor is parked."""
        self._park_reactor()
        return self.assoc.send_c_echo(msg_id=msg_id)

    def release(self) -> None:
        """``Association.release`` once the reactor is parked."""
        self._park_reactor()
        self.assoc.release()

    def abort(self) -> None:
        """``Association.abort``."""
        self.assoc.abort()

    def _park_reactor(self) -> None:
        """Close the gate and wait until the reactor thread blocks on it."""
        deadline = time.monotonic() + self._timeout
        while not self._gate.close_and_wait_parked(0.05):
            if not self.assoc.is_alive() or time.monotonic() > deadline:
                self._gate.set()  # reactor gone or stuck: let pynetdicom's own logic run
                return


class _ReactorGate(threading.Event):
    """Stand-in for ``Association._reactor_checkpoint`` that knows when the reactor waits."""

    def __init__(self) -> None:
        super().__init__()
        self._gate = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._gate:
            self._open = True
            self._gate.notify_all()

    def clear(self) -> None:
        with self._gate:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._gate:
            if self._open:
                return True
            self._parked = True
            self._gate.notify_all()
            try:
                return self._gate.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False

    def close_and_wait_parked(self, timeout: float) -> bool:
        """Close the gate; ``True`` once the reactor is blocked on it."""
        with self._gate:
            self._open = False
            return self._gate.wait_for(lambda: self._parked, timeout)


def associate(request: AssociationRequest) -> PynetdicomAssociation:
    """Open an association with pynetdicom; the default factory of :func:`send`.

    Parameters
    ----------
    request : AssociationRequest
        Peer address, AE titles, contexts to propose, timeout and optional TLS context
        (the server name checked is ``request.host``).

    Returns
    -------
    PynetdicomAssociation
        An established association (pynetdicom's, with its reactor race fixed, see
        :class:`PynetdicomAssociation`); the caller releases or aborts it.

    Raises
    ------
    RetryableAssociationError
        The peer cannot be resolved temporarily or reached, timed out, aborted, or
        rejected the association transiently.
    PermanentAssociationError
        The host name does not resolve, the peer rejected the association permanently,
        or it accepted none of the proposed presentation contexts.
    """
    # Stream files from disk without decoding them when the transfer syntax matches
    # (pynetdicom's default reads every file fully with dcmread and re-encodes it).
    # Process-wide, but only affects send_c_store(path), which send() uses solely for
    # exact-match contexts: correct in either mode.
    _config.STORE_SEND_CHUNKED_DATASET = True

    ae = AE(ae_title=request.calling_ae)
    ae.acse_timeout = request.timeout
    ae.dimse_timeout = request.timeout
    ae.network_timeout = request.timeout
    ae.connection_timeout = request.timeout
    contexts = [
        build_context(cx.abstract_syntax, list(cx.transfer_syntaxes)) for cx in request.contexts
    ]
    tls_args = (request.ssl_context, request.host) if request.ssl_context else None
    seen = _Negotiation()

    try:
        assoc = ae.associate(
            request.host,
            request.port,
            contexts,
            ae_title=request.called_ae,
            max_pdu=MAX_PDU_RECEIVE,
            tls_args=tls_args,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, seen.on_connect),
                (evt.EVT_PDU_RECV, seen.on_pdu),
            ],
        )
    except socket.gaierror as exc:
        message = f"cannot resolve host {request.host!r} for {request.peer}: {exc}"
        if exc.errno == socket.EAI_AGAIN:
            raise RetryableAssociationError(message) from exc
        raise PermanentAssociationError(message) from exc
    except OSError as exc:
        raise RetryableAssociationError(f"cannot connect to {request.peer}: {exc}") from exc
    if assoc.is_established:
        assoc.unbind(evt.EVT_PDU_RECV, seen.on_pdu)  # only needed during negotiation
        return PynetdicomAssociation(assoc, request.timeout)
    raise _association_failure(assoc, request, seen)


def echo(
    host: str,
    port: int,
    *,
    called_ae: str = DEFAULT_CALLED_AE,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> float:
    """Verify a peer with C-ECHO and return the round trip of the C-ECHO in seconds.

    The time covers the C-ECHO request and response only, not the association set-up
    and release around them.

    Parameters
    ----------
    host : str
        Peer host name or IP address.
    port : int
        Peer TCP port.
    called_ae : str
        The peer's AE title.
    calling_ae : str
        Our AE title.
    timeout : float
        Seconds allowed for connecting, association negotiation and the response.
    ssl_context : ssl.SSLContext, optional
        Client TLS context; plain TCP when omitted.

    Returns
    -------
    float
        Seconds between sending the C-ECHO request and receiving its response.

    Raises
    ------
    RetryableAssociationError
        The peer is unreachable, timed out, aborted, or rejected transiently.
    PermanentAssociationError
        The peer rejected the association permanently (the message gives its reason),
        does not support Verification, or answered with a non-success status.
    ValueError
        An argument is invalid (named in the message).
    """
    _validate_peer_args(host, port, called_ae, calling_ae, timeout)
    request = AssociationRequest(
        host=host,
        port=port,
        called_ae=called_ae,
        calling_ae=calling_ae,
        contexts=(ProposedContext(VERIFICATION_SOP_CLASS, _UNCOMPRESSED_FALLBACKS),),
        timeout=timeout,
        ssl_context=ssl_context,
    )
    assoc = associate(request)
    try:
        assoc._park_reactor()  # not part of the round trip
        start = time.perf_counter()
        status = assoc.assoc.send_c_echo()
        seconds = time.perf_counter() - start
    except BaseException:
        assoc.abort()
        raise
    if "Status" not in status:
        raise RetryableAssociationError(
            f"{request.peer} aborted or did not answer the C-ECHO within {timeout:g} s"
        )
    assoc.release()
    if status.Status != 0x0000:
        raise PermanentAssociationError(
            f"{request.peer} answered the C-ECHO with status 0x{status.Status:04X}"
        )
    logger.info("C-ECHO %s: %.1f ms", request.peer, seconds * 1000)
    return seconds


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Expand files and folders into the DICOM files worth sending.

    Folders are walked recursively (symbolic links to folders are not followed) and
    their files sorted; the given paths keep their order and duplicates are dropped.
    DICOMDIR files (Media Storage Directory Storage, whatever their name) and files that
    are not DICOM Part 10 files (no ``DICM`` prefix or no readable file meta) are
    skipped and logged at INFO with the reason.

    Parameters
    ----------
    paths : iterable of Path
        Files and folders.

    Returns
    -------
    list of Path
        The DICOM files, in a deterministic order.

    Raises
    ------
    ValueError
        A given path does not exist.
    """
    seen: set[Path] = set()
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            candidates = _walk(path)
        elif path.is_file():
            candidates = [path]
        else:
            raise ValueError(f"paths: {path} is neither a file nor a folder")
        for candidate in candidates:
            key = candidate.resolve()
            if key in seen:
                continue
            seen.add(key)
            reason = _skip_reason(candidate)
            if reason is None:
                found.append(candidate)
            else:
                logger.info("skipping %s: %s", candidate, reason)
    return found


def send(
    paths: Sequence[Path],
    host: str,
    port: int,
    *,
    called_ae: str = DEFAULT_CALLED_AE,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    assoc_factory: AssociationFactory | None = None,
) -> SendReport:
    """Send DICOM files to a peer with C-STORE.

    Only the file meta of each file is read to learn its SOP class and transfer syntax.
    One presentation context is proposed per (SOP class, transfer syntax) pair present;
    little endian uncompressed syntaxes (implicit, explicit, deflated) also offer explicit
    and implicit VR little endian as fallbacks, compressed and big endian ones offer only
    themselves. More than 128 contexts are split over several associations.

    A file whose transfer syntax was accepted is streamed from disk unchanged. A file
    whose context was accepted with another transfer syntax is decoded and re-encoded by
    pynetdicom when both are uncompressed with the same byte order; otherwise it fails
    with the reason. Each C-STORE status is checked: 0x0000 is success, 0xB000, 0xB006
    and 0xB007 are warnings (the file counts as sent), anything else is a failure.

    Parameters
    ----------
    paths : sequence of Path
        DICOM files (see :func:`collect_files` for folders). Unreadable and non-DICOM
        files are reported failed, not raised.
    host : str
        Peer host name or IP address.
    port : int
        Peer TCP port.
    called_ae : str
        The peer's AE title.
    calling_ae : str
        Our AE title.
    timeout : float
        Seconds allowed for connecting, negotiation and each C-STORE response.
    ssl_context : ssl.SSLContext, optional
        Client TLS context; plain TCP when omitted.
    assoc_factory : callable, optional
        Opens an established :class:`StoreAssociation` for an :class:`AssociationRequest`
        or raises an :class:`~triage_node.errors.AssociationError`; :func:`associate`
        (pynetdicom) when omitted. Tests inject fakes here.

    Returns
    -------
    SendReport
        Files sent, failures with their status and reason, warnings, elapsed seconds.
        If an association is lost mid-send, the remaining files are failed with a
        retryable reason rather than raised.

    Raises
    ------
    RetryableAssociationError
        The first association could not be opened for a retryable reason (peer down,
        timeout, abort, transient rejection); nothing was sent.
    PermanentAssociationError
        The first association was rejected permanently or accepted none of the proposed
        presentation contexts; nothing was sent.
    ValueError
        An argument is invalid (named in the message).
    """
    _validate_peer_args(host, port, called_ae, calling_ae, timeout)
    if isinstance(paths, str | Path):
        raise TypeError("paths must be a sequence of paths, not a single path")
    start = time.monotonic()
    factory: AssociationFactory = assoc_factory or associate
    failed: list[FailedFile] = []
    warnings: list[StoreWarning] = []
    sent = 0

    items: list[_Item] = []
    for raw_path in paths:
        path = Path(raw_path)
        try:
            items.append(_read_header(path))
        except _UnsendableError as exc:
            failed.append(_fail(path, None, str(exc)))

    batches = _plan_associations(items)
    for number, (contexts, batch) in enumerate(batches):
        request = AssociationRequest(
            host=host,
            port=port,
            called_ae=called_ae,
            calling_ae=calling_ae,
            contexts=contexts,
            timeout=timeout,
            ssl_context=ssl_context,
        )
        batch_start = time.monotonic()
        try:
            assoc = factory(request)
        except AssociationError as exc:
            if number == 0:
                raise
            retryable = isinstance(exc, RetryableAssociationError)
            logger.warning("association %d with %s failed: %s", number + 1, request.peer, exc)
            # A peer that cannot be reached now will not be reachable for the next batch.
            remaining = batch if not retryable else [i for _, b in batches[number:] for i in b]
            failed.extend(_fail(item.path, None, str(exc), retryable) for item in remaining)
            if retryable:
                break
            continue
        outcome = _send_over(assoc, request, batch)
        sent += outcome.sent
        failed.extend(outcome.failed)
        warnings.extend(outcome.warnings)
        logger.info(
            "association with %s: %d files, %d sent, %d failed, %d warnings in %.2f s",
            request.peer,
            len(batch),
            outcome.sent,
            len(outcome.failed),
            len(outcome.warnings),
            time.monotonic() - batch_start,
        )
    return SendReport(
        sent=sent,
        failed=tuple(failed),
        warnings=tuple(warnings),
        seconds=time.monotonic() - start,
    )


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True, slots=True)
class _Item:
    """A file to send and what its file meta says."""

    path: Path
    sop_class: str
    transfer_syntax: str
    streamable: bool  # pynetdicom can send the file bytes as they are (see _read_header)

    @property
    def key(self) -> tuple[str, str]:
        return (self.sop_class, self.transfer_syntax)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What happened over one association."""

    sent: int
    failed: tuple[FailedFile, ...]
    warnings: tuple[StoreWarning, ...]


class _UnsendableError(Exception):
    """A file that cannot be sent at all (not DICOM, unreadable, no SOP class)."""


def _validate_peer_args(
    host: str, port: int, called_ae: str, calling_ae: str, timeout: float
) -> None:
    """Raise TypeError/ValueError naming the first bad argument."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, got {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    for name, title in (("called_ae", called_ae), ("calling_ae", calling_ae)):
        if not isinstance(title, str):
            raise TypeError(f"{name} must be a str, got {type(title).__name__}")
        if not title.strip() or len(title) > 16 or "\\" in title:
            raise ValueError(f"{name} must be 1 to 16 characters without '\\', got {title!r}")
        if not title.isascii() or not title.isprintable():
            raise ValueError(f"{name} must be printable ASCII, got {title!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number, got {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")


class _Negotiation:
    """What pynetdicom's events told us while an association was being negotiated."""

    def __init__(self) -> None:
        self.connected = False
        self.rejection: A_ASSOCIATE_RJ | None = None

    def on_connect(self, event: Event) -> None:
        """TCP (and TLS) connection up: switch Nagle off."""
        self.connected = True
        # pynetdicom leaves Nagle on: each small PDU after a write then waits for the
        # peer's delayed ACK (~40 ms per C-STORE on Linux).
        raw = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if raw is not None:
            with contextlib.suppress(OSError):  # a speed-up only
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_pdu(self, event: Event) -> None:
        """Keep an A-ASSOCIATE-RJ: pynetdicom may lose it (see _association_failure)."""
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.rejection = event.pdu


def _association_failure(
    assoc: Association, request: AssociationRequest, seen: _Negotiation
) -> AssociationError:
    """Translate a failed pynetdicom association request into our error."""
    # When the peer closes the connection right after its A-ASSOCIATE-RJ (dcmtk does),
    # pynetdicom 3.0 can see the closed socket before the reject and reports an abort
    # (is_rejected False, no acceptor primitive); the PDU seen on the wire is the truth.
    answer = assoc.acceptor.primitive
    rejection: A_ASSOCIATE_RJ | A_ASSOCIATE | None = seen.rejection
    if rejection is None and assoc.is_rejected:
        rejection = answer
    if rejection is not None and rejection.result in (0x01, 0x02):
        permanent = rejection.result == 0x01
        result = "rejected-permanent" if permanent else "rejected-transient"
        reason = rejection.reason_str
        message = (
            f"{request.peer} rejected the association ({result}, source: "
            f"{rejection.source_str.lower()}): {reason[:1].lower()}{reason[1:]}"
        )
        if permanent:
            return PermanentAssociationError(message)
        return RetryableAssociationError(message)
    if answer is not None and answer.result == 0x00:
        rejected = "; ".join(
            f"{UID(cx.abstract_syntax or '').name} ({cx.status.lower()})"
            for cx in assoc.rejected_contexts
        )
        return PermanentAssociationError(
            f"{request.peer} accepted none of the {len(request.contexts)} proposed "
            f"presentation contexts: {rejected}"
        )
    if not seen.connected:
        tls = " or TLS handshake failed" if request.ssl_context else ""
        return RetryableAssociationError(
            f"cannot connect to {request.peer}: connection refused, host unreachable or "
            f"timed out after {request.timeout:g} s{tls}"
        )
    return RetryableAssociationError(
        f"{request.peer} aborted the association request or did not answer within "
        f"{request.timeout:g} s"
    )


def _walk(folder: Path) -> list[Path]:
    """All files below ``folder``, sorted, without following folder symlinks."""
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root, name) for name in names)
    return sorted(files)


def _skip_reason(path: Path) -> str | None:
    """Why ``path`` is not worth sending, or ``None`` if it is a sendable DICOM file."""
    try:
        with path.open("rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if len(head) < 132 or head[128:] != b"DICM":
        return "not a DICOM Part 10 file (no DICM prefix)"
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        return f"unreadable file meta ({exc})"
    if meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY_STORAGE:
        return "DICOMDIR (media storage directory), not an instance"
    if not meta.get("TransferSyntaxUID"):
        return "file meta has no Transfer Syntax UID"
    return None


def _read_header(path: Path) -> _Item:
    """Read SOP class and transfer syntax from the file meta (dataset as a fallback)."""
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as exc:
        raise _UnsendableError(f"no such file: {path}") from exc
    except InvalidDicomError as exc:
        raise _UnsendableError("not a DICOM Part 10 file (no DICM prefix)") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise _UnsendableError(f"cannot read file meta: {exc}") from exc
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not transfer_syntax:
        raise _UnsendableError("file meta has no Transfer Syntax UID")
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY_STORAGE:
        raise _UnsendableError("DICOMDIR (media storage directory), not an instance")
    # pynetdicom streams the bytes after the file meta as they are; an odd length (seen in
    # deflated files) makes PDV fragments odd, which dcmtk aborts on. Those are decoded
    # and re-encoded instead (preamble and file meta are of even length).
    try:
        even = path.stat().st_size % 2 == 0
    except OSError as exc:
        raise _UnsendableError(f"cannot read the file: {exc}") from exc
    streamable = bool(sop_class and meta.get("MediaStorageSOPInstanceUID")) and even
    if not sop_class:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            raise _UnsendableError(f"cannot read the dataset header: {exc}") from exc
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if not sop_class:
            raise _UnsendableError("no SOP Class UID in file meta or dataset")
    return _Item(path, sop_class, transfer_syntax, streamable)


def _is_little_endian_uncompressed(transfer_syntax: str) -> bool:
    """Implicit/explicit/deflated little endian: convertible into one another."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:  # private or unknown: treat as opaque
        return False
    return not uid.is_compressed and uid.is_little_endian


def _proposed_syntaxes(transfer_syntax: str) -> tuple[str, ...]:
    """The file's own transfer syntax first, then the fallbacks it can be converted to."""
    if not _is_little_endian_uncompressed(transfer_syntax):
        return (transfer_syntax,)
    return (transfer_syntax, *(ts for ts in _UNCOMPRESSED_FALLBACKS if ts != transfer_syntax))


def _plan_associations(
    items: Sequence[_Item],
) -> list[tuple[tuple[ProposedContext, ...], list[_Item]]]:
    """Group files into associations of at most 128 contexts, keeping file order."""
    keys = list(dict.fromkeys(item.key for item in items))
    plans: list[tuple[tuple[ProposedContext, ...], list[_Item]]] = []
    for first in range(0, len(keys), MAX_CONTEXTS_PER_ASSOCIATION):
        chunk = keys[first : first + MAX_CONTEXTS_PER_ASSOCIATION]
        wanted = set(chunk)
        contexts = tuple(ProposedContext(sop, _proposed_syntaxes(ts)) for sop, ts in chunk)
        plans.append((contexts, [item for item in items if item.key in wanted]))
    return plans


def _send_over(
    assoc: StoreAssociation, request: AssociationRequest, items: Sequence[_Item]
) -> _Outcome:
    """Send ``items`` over an established association, then release it."""
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    # pynetdicom numbers the proposed contexts 1, 3, 5... in request order; a rejected
    # context no longer carries the transfer syntax we proposed, only its ID.
    proposed = {
        2 * index + 1: (cx.abstract_syntax, cx.transfer_syntaxes[0])
        for index, cx in enumerate(request.contexts)
    }
    rejected = {
        proposed[cx.context_id]: cx.status.lower()
        for cx in assoc.rejected_contexts
        if cx.context_id in proposed
    }
    sent = 0
    failed: list[FailedFile] = []
    warnings: list[StoreWarning] = []
    try:
        for index, item in enumerate(items):
            if not assoc.is_established:
                lost = f"association with {request.peer} was lost before sending (retryable)"
                failed.extend(_fail(rest.path, None, lost, True) for rest in items[index:])
                break
            how = _how_to_send(item, accepted.get(item.sop_class, set()), rejected)
            if isinstance(how, str):
                failed.append(_fail(item.path, None, how))
                continue
            status = _store_one(assoc, item, convert=how, msg_id=index % 65535 + 1)
            if isinstance(status, FailedFile):
                failed.append(status)
                continue
            if "Status" not in status:
                lost = (
                    f"association with {request.peer} was aborted or timed out before the "
                    f"C-STORE response (retryable)"
                )
                failed.extend(_fail(rest.path, None, lost, True) for rest in items[index:])
                break
            code = int(status.Status)
            if code == 0x0000:
                sent += 1
            elif code in WARNING_STATUSES:
                sent += 1
                warnings.append(StoreWarning(item.path, code, _status_text(code, status)))
            else:
                retryable = 0xA700 <= code <= 0xA7FF or code == 0x0213
                failed.append(_fail(item.path, code, _status_text(code, status), retryable))
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
    return _Outcome(sent, tuple(failed), tuple(warnings))


def _how_to_send(
    item: _Item, accepted_syntaxes: set[str], rejected: dict[tuple[str, str], str]
) -> bool | str:
    """``False``: stream as is; ``True``: decode and convert; a str: why it cannot go."""
    if item.transfer_syntax in accepted_syntaxes:
        return not item.streamable
    if _is_little_endian_uncompressed(item.transfer_syntax) and any(
        _is_little_endian_uncompressed(ts) for ts in accepted_syntaxes
    ):
        return True
    sop_name = UID(item.sop_class).name
    ts_name = UID(item.transfer_syntax).name
    if item.key in rejected or not accepted_syntaxes:
        why = rejected.get(item.key, "not accepted")
        return f"peer rejected {sop_name} in {ts_name} ({why})"
    others = ", ".join(sorted(UID(ts).name for ts in accepted_syntaxes))
    return (
        f"peer accepted {sop_name} only in {others}, not in {ts_name}; compressed and "
        "big endian data are not converted"
    )


def _store_one(
    assoc: StoreAssociation, item: _Item, *, convert: bool, msg_id: int
) -> Dataset | FailedFile:
    """One C-STORE; problems with the file itself become a FailedFile."""
    try:
        if convert:
            # pynetdicom re-encodes a decoded dataset into the accepted transfer syntax.
            return assoc.send_c_store(dcmread(item.path), msg_id=msg_id)
        return assoc.send_c_store(item.path, msg_id=msg_id)
    except FileNotFoundError:
        return _fail(item.path, None, "file disappeared before it was sent")
    except (OSError, InvalidDicomError, EOFError) as exc:
        return _fail(item.path, None, f"cannot read the file: {exc}")
    except (ValueError, AttributeError) as exc:
        # pynetdicom: no matching context, missing UIDs, or the dataset cannot be encoded.
        return _fail(item.path, None, f"cannot send the file: {exc}")
    except RuntimeError:
        # The association went down between our check and the request.
        return Dataset()


def _status_text(code: int, status: Dataset) -> str:
    """``0xA700 (Refused: Out of Resources): comment`` for a C-STORE status."""
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    text = f"C-STORE status 0x{code:04X} ({description})"
    comment = status.get("ErrorComment")
    if comment:
        text += f": {comment}"
    return text


def _fail(path: Path, status: int | None, reason: str, retryable: bool = False) -> FailedFile:
    """Record and log one failed file."""
    logger.warning("not sent: %s: %s", path, reason)
    return FailedFile(path, status, reason, retryable)
