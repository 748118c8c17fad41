"""Results to the PACS: queue a series' SR in the outbox, and deliver the outbox reliably.

Two halves, joined only by the database (so either may restart at any time):

:func:`queue_results_for_delivery`
    Called once a series result is stored. Decides whether the result goes out (flagged,
    or ``[results] send_negative``, or it corrects an SR sent earlier), builds the SR
    (:func:`triage_node.sr.build_sr`) from the key slice's header and the instance list,
    and stores its bytes with one ``pending`` outbox row per ``[[destinations]]`` entry.
    Idempotent: the same stored result is queued once. A recomputed result gets a new SR
    (new SOP Instance UID, next Instance Number, same SR series) naming the earlier one in
    its Predecessor Documents Sequence; earlier rows still pending become ``superseded``.

:func:`run_delivery`
    Loops until ``stop``: claims due rows (:func:`triage_node.store.claim_due`) and sends
    each with :func:`triage_node.scu.send`, always the stored bytes, so a retry carries the
    same SOP Instance UID and the PACS de-duplicates. Outcomes:

    * stored (warnings included) -> ``sent``;
    * retryable (peer down, timeout, abort, transient rejection, 0xA7xx) -> ``pending``
      again after ``backoff_delay`` (exponential, jittered), until ``max_attempts``, then
      ``failed`` and an ERROR log;
    * permanent (association rejected permanently, SOP class refused, other failure
      status, destination gone from the configuration) -> ``failed`` at once with the
      reason, and an ERROR log.

    :func:`triage_node.store.delivery_counts` is the metric (``failed`` = results no PACS
    got).

The association factory is an argument (default :func:`triage_node.scu.associate`), so
tests can inject a fake peer; the tests in ``tests/test_delivery.py`` use dcmtk's storescp.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import random
import ssl
import threading
from collections.abc import Callable, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from sqlalchemy.orm import Session, sessionmaker

from triage_node import __version__, scu, store
from triage_node.config import Config, DestinationConfig, TLSConfig
from triage_node.domain import (
    Delivery,
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceState,
    ResultDocument,
    SeriesResult,
    utcnow,
)
from triage_node.errors import (
    ConfigError,
    DatabaseError,
    InvalidDatasetError,
    NodeStateError,
    PermanentAssociationError,
    RetryableAssociationError,
)
from triage_node.spool import Spool

__all__ = [
    "HeaderReader",
    "backoff_delay",
    "client_ssl_context",
    "default_lease",
    "deliver_due",
    "destination_key",
    "queue_results_for_delivery",
    "run_delivery",
]

log = logging.getLogger(__name__)

#: Reads the header (no pixel data) of one recorded instance.
HeaderReader = Callable[[InstanceRecord], Dataset]

#: Rows claimed per round of the delivery loop.
CLAIM_BATCH = 16

#: SOP classes of the documents we send: the SR (Comprehensive 3D SR, what highdicom's TID
#: 1500 report is) and the key image (Secondary Capture Image Storage).
SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"
SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"


# --------------------------------------------------------------------------- queueing


def destination_key(destination: DestinationConfig) -> str:
    """The outbox's name of a destination: ``AE@host:port``.

    Parameters
    ----------
    destination : DestinationConfig
        One ``[[destinations]]`` entry.

    Returns
    -------
    str
    """
    if not isinstance(destination, DestinationConfig):
        raise TypeError(
            f"destination must be a DestinationConfig, not {type(destination).__name__}"
        )
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _spool_reader(config: Config) -> HeaderReader:
    """Read headers from the local spool at ``[storage] path``."""
    spool = Spool(config.storage.path)

    def read(record: InstanceRecord) -> Dataset:
        path = spool.path(record.file_path)
        try:
            return dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            raise InvalidDatasetError(
                f"cannot read the header of {record.sop_instance_uid} ({path}): {exc}"
            ) from exc

    return read


def _uid_header(record: InstanceRecord) -> Dataset:
    """The four UIDs of an instance, as evidence needs them."""
    ds = Dataset()
    ds.SOPClassUID = record.sop_class_uid
    ds.SOPInstanceUID = record.sop_instance_uid
    ds.StudyInstanceUID = record.study_instance_uid
    ds.SeriesInstanceUID = record.series_instance_uid
    return ds


def _evidence(
    result: SeriesResult, records: Sequence[InstanceRecord], read_header: HeaderReader
) -> list[Dataset]:
    """The key slice's full header, then the UIDs of every classified slice."""
    by_uid = {r.sop_instance_uid: r for r in records}
    key = by_uid.get(result.key_sop_instance_uid)
    if key is None:
        raise NodeStateError(
            f"series {result.series_instance_uid}: key slice {result.key_sop_instance_uid} "
            "is not recorded"
        )
    header = read_header(key)
    if header.get("SOPInstanceUID") != key.sop_instance_uid:
        raise InvalidDatasetError(
            f"the file of {key.sop_instance_uid} holds {header.get('SOPInstanceUID')!r}"
        )
    uids = [uid for uid, _, _ in result.slices] or [
        r.sop_instance_uid for r in records if r.state is InstanceState.STORED
    ]
    others = [_uid_header(by_uid[u]) for u in uids if u in by_uid and u != key.sop_instance_uid]
    return [header, *others]


def _encode(dataset: Dataset) -> bytes:
    """A DICOM Part 10 file in memory."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def queue_results_for_delivery(
    session_factory: sessionmaker[Session],
    config: Config,
    series_instance_uid: str,
    *,
    read_header: HeaderReader | None = None,
) -> str | None:
    """Build the SR of a series' stored result and queue it for every destination.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.make_session_factory`.
    config : Config
        ``[[destinations]]``, ``[results]`` (``send_negative``, ``disclaimer``) and, for the
        default ``read_header``, ``[storage] path``.
    series_instance_uid : str
        A series whose result is stored (:func:`triage_node.store.store_result`).
    read_header : callable, optional
        Reads one recorded instance's header (the key slice's); by default from the local
        spool. A worker that reads slices over HTTP passes its own.

    Returns
    -------
    str or None
        The SOP Instance UID of the SR queued now, or already queued for this very
        result; ``None`` when nothing is to be sent (no result, no destination, or a
        negative result without ``send_negative`` and no earlier SR to correct).

    Raises
    ------
    InvalidDatasetError
        If the key slice's header cannot be read.
    NodeStateError
        If the key slice is not recorded.
    DatabaseError
        If the database fails.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, not {type(config).__name__}")
    result = store.get_result(session_factory, series_instance_uid)
    if result is None:
        log.warning("series %s has no stored result: no SR queued", series_instance_uid)
        return None
    if not config.destinations:
        log.debug("no [[destinations]]: the result of %s is not sent", series_instance_uid)
        return None
    latest = store.latest_document(session_factory, series_instance_uid, SR_SOP_CLASS_UID)
    if latest is not None and latest.result_stored_at == result.stored_at:
        return latest.sop_instance_uid  # this result is queued already
    if not (result.flagged or config.results.send_negative or latest is not None):
        log.info("series %s is negative (any=%.3f < %.3f): no SR sent (send_negative off)",
                 series_instance_uid, result.probabilities.get("any", 0.0), result.threshold)
        return None
    if result.stored_at is None:  # pragma: no cover - get_result always sets it
        raise NodeStateError(f"series {series_instance_uid}: result without stored_at")

    # highdicom takes half a second to import: only queueing needs it, not the delivery loop.
    from triage_node import sr

    records = store.series_instances(session_factory, series_instance_uid)
    evidence = _evidence(result, records, read_header or _spool_reader(config))
    predecessor = dcmread(io.BytesIO(latest.dataset), stop_before_pixels=True) if latest else None
    document = sr.build_sr(
        evidence,
        result,
        disclaimer=config.results.disclaimer,
        instance_number=latest.instance_number + 1 if latest else 1,
        supersedes=predecessor,
        software_version=__version__,
    )
    sop_instance_uid = str(document.SOPInstanceUID)
    stored = store.add_document(
        session_factory,
        ResultDocument(
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=str(document.SOPClassUID),
            instance_number=int(document.InstanceNumber),
            result_stored_at=result.stored_at,
            supersedes_sop_instance_uid=latest.sop_instance_uid if latest else None,
            created_at=utcnow(),
            dataset=_encode(document),
        ),
        [destination_key(d) for d in config.destinations],
    )
    if not stored:  # another process queued this result meanwhile
        again = store.latest_document(session_factory, series_instance_uid, SR_SOP_CLASS_UID)
        return again.sop_instance_uid if again else None
    log.info("SR %s of series %s queued for %d destination(s)%s", sop_instance_uid,
             series_instance_uid, len(config.destinations),
             f", superseding {latest.sop_instance_uid}" if latest else "")
    return sop_instance_uid


def queue_key_image_for_delivery(
    session_factory: sessionmaker[Session],
    config: Config,
    series_instance_uid: str,
    *,
    read_header: HeaderReader | None = None,
) -> str | None:
    """Queue the key-image Secondary Capture of a result whose SR is queued.

    For PACS that cannot show SR (``[results] key_image``): the key slice in brain window
    with the classifier's heatmap, as stored by the worker (``store.get_key_images``), in a
    series of its own in the patient's study. Sent to the same destinations as the SR and
    only with it; a recomputed result gets a new SC that names the earlier one, and the
    earlier one, if not yet sent, is superseded. Idempotent.

    Returns
    -------
    str or None
        The SC's SOP Instance UID (queued now or before), or None when there is none to
        send (option off, no SR queued for this result, no key images stored).
    """
    if not (config.results.key_image and config.destinations):
        return None
    result = store.get_result(session_factory, series_instance_uid)
    report = store.latest_document(session_factory, series_instance_uid, SR_SOP_CLASS_UID)
    if result is None or report is None or report.result_stored_at != result.stored_at:
        return None  # the SC goes only with the SR of the same result
    latest = store.latest_document(session_factory, series_instance_uid, SC_SOP_CLASS_UID)
    if latest is not None and latest.result_stored_at == result.stored_at:
        return latest.sop_instance_uid
    images = store.get_key_images(session_factory, series_instance_uid)
    if images is None or images.sop_instance_uid != result.key_sop_instance_uid:
        log.info("series %s: no key image of this result stored; no SC sent",
                 series_instance_uid)
        return None
    import numpy as np
    from PIL import Image

    from triage_node import sr

    rgb = np.asarray(Image.open(io.BytesIO(images.heatmap_png)).convert("RGB"), np.uint8)
    records = store.series_instances(session_factory, series_instance_uid)
    key = _evidence(result, records, read_header or _spool_reader(config))[0]
    document = sr.build_key_image(
        key, rgb, result, disclaimer=config.results.disclaimer,
        instance_number=latest.instance_number + 1 if latest else 1)
    assert result.stored_at is not None  # get_result always sets it
    uid = str(document.SOPInstanceUID)
    stored = store.add_document(
        session_factory,
        ResultDocument(
            series_instance_uid=series_instance_uid, sop_instance_uid=uid,
            sop_class_uid=str(document.SOPClassUID),
            instance_number=int(document.InstanceNumber),
            result_stored_at=result.stored_at,
            supersedes_sop_instance_uid=latest.sop_instance_uid if latest else None,
            created_at=utcnow(), dataset=_encode(document)),
        [destination_key(d) for d in config.destinations],
    )
    if not stored:
        again = store.latest_document(session_factory, series_instance_uid, SC_SOP_CLASS_UID)
        return again.sop_instance_uid if again else None
    log.info("key image %s of series %s queued for %d destination(s)", uid,
             series_instance_uid, len(config.destinations))
    return uid


# --------------------------------------------------------------------------- delivery


def backoff_delay(attempts: int, base: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (exponential, jittered).

    ``min(maximum, base * 2**(attempts - 1))``, of which a uniformly random part of up to
    half is dropped ("equal jitter"): senders that failed together do not retry together,
    and the delay never falls below half the nominal one.

    Parameters
    ----------
    attempts : int
        Attempts made so far (>= 1).
    base, maximum : float
        The first delay and the cap, seconds (> 0).
    rng : random.Random
        Source of the jitter.

    Returns
    -------
    float
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise TypeError(f"attempts must be an int, not {type(attempts).__name__}")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base}")
    if not maximum > 0:
        raise ValueError(f"maximum must be > 0, got {maximum}")
    nominal = min(maximum, base * 2.0 ** min(attempts - 1, 62))
    return nominal / 2 + rng.uniform(0, nominal / 2)


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Client TLS context for a destination; ``None`` (plain TCP) without cert and ca.

    ``ca`` verifies the destination's certificate (system CAs when empty); ``cert`` and
    ``key`` are our client certificate.

    Raises
    ------
    ConfigError
        If a file cannot be loaded.
    """
    if not (tls.cert or tls.ca):
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert:
            ctx.load_cert_chain(tls.cert, tls.key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destinations tls: cannot load {tls.cert or tls.ca}: {exc}") from exc
    return ctx


def default_lease(config: Config) -> float:
    """Seconds a claimed delivery stays with its sender: ``4 * [results] timeout + 30``.

    Longer than one send can take (connect, negotiate, C-STORE, release); a sender that
    died holding a claim delays that delivery by at most this long.
    """
    return 4 * config.results.timeout + 30


class _Outcome:
    """What one send attempt came to."""

    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"


def _send_one(
    config: Config,
    destination: DestinationConfig,
    data: bytes,
    delivery: Delivery,
    associate: scu.AssociationFactory,
) -> tuple[str, str]:
    """Send one document once: (outcome, reason)."""
    work = config.data_dir / "outbox"
    try:
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{delivery.id}-{delivery.attempts}.dcm"
        path.write_bytes(data)
    except OSError as exc:
        return _Outcome.RETRY, f"cannot write the document to {work}: {exc}"
    try:
        report = scu.send(
            [path],
            destination.host,
            destination.port,
            called_ae=destination.ae_title,
            calling_ae=config.dicom.ae_title,
            timeout=config.results.timeout,
            ssl_context=client_ssl_context(destination.tls),
            assoc_factory=associate,
        )
    except RetryableAssociationError as exc:
        return _Outcome.RETRY, str(exc)
    except (PermanentAssociationError, ConfigError, ValueError, TypeError) as exc:
        return _Outcome.FAILED, str(exc)
    finally:
        path.unlink(missing_ok=True)
    if report.ok and report.sent:
        for warning in report.warnings:
            log.warning("SR %s stored by %s with a warning: %s", delivery.sop_instance_uid,
                        delivery.destination, warning.reason)
        return _Outcome.SENT, ""
    if not report.failed:  # pragma: no cover - send() reports every file
        return _Outcome.RETRY, "nothing was sent"
    failure = report.failed[0]
    return (_Outcome.RETRY if failure.retryable else _Outcome.FAILED), failure.reason


def deliver_due(
    config: Config,
    session_factory: sessionmaker[Session],
    *,
    associate: scu.AssociationFactory = scu.associate,
    rng: random.Random | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
    limit: int = CLAIM_BATCH,
    lease_seconds: float | None = None,
) -> int:
    """Claim the deliveries due now and attempt each once; one round of the loop.

    Parameters
    ----------
    config : Config
        ``[[destinations]]``, ``[results]`` (retry policy, timeout), ``[dicom] ae_title``
        (our calling AE title) and ``data_dir`` (where the file to send is written).
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.make_session_factory`.
    associate : callable, optional
        The association factory handed to :func:`triage_node.scu.send`.
    rng : random.Random, optional
        Jitter source (a fresh one when omitted).
    clock : callable, optional
        Returns the current aware UTC datetime.
    limit : int, optional
        At most this many deliveries.
    lease_seconds : float, optional
        How long a claimed row stays ours (see :func:`triage_node.store.claim_due`);
        by default four ``[results] timeout`` plus 30 s, longer than one send can take.

    Returns
    -------
    int
        The number of deliveries attempted.

    Raises
    ------
    DatabaseError
        If the database fails.
    """
    rng = rng or random.Random()
    policy = config.results
    destinations = {destination_key(d): d for d in config.destinations}
    now = _now(clock)
    lease = default_lease(config) if lease_seconds is None else lease_seconds
    claimed = store.claim_due(session_factory, now=now, lease_seconds=lease, limit=limit)
    for delivery, data in claimed:
        destination = destinations.get(delivery.destination)
        if destination is None:
            outcome, reason = _Outcome.FAILED, (
                f"destination {delivery.destination} is no longer configured"
            )
        else:
            outcome, reason = _send_one(config, destination, data, delivery, associate)
        done = _now(clock)
        if outcome == _Outcome.SENT:
            store.mark_sent(session_factory, delivery, at=done)
            _audit(session_factory, config, delivery, EventKind.RESULT_DELIVERED, done,
                   "sent", f"attempt {delivery.attempts}")
            log.info("SR %s of series %s delivered to %s (attempt %d)",
                     delivery.sop_instance_uid, delivery.series_instance_uid,
                     delivery.destination, delivery.attempts)
        elif outcome == _Outcome.RETRY and delivery.attempts < policy.max_attempts:
            delay = backoff_delay(delivery.attempts, policy.backoff_base_seconds,
                                  policy.backoff_max_seconds, rng)
            store.mark_retry(session_factory, delivery, error=reason,
                             next_attempt_at=done + _seconds(delay), at=done)
            log.warning("SR %s to %s: attempt %d of %d failed, retrying in %.2f s: %s",
                        delivery.sop_instance_uid, delivery.destination, delivery.attempts,
                        policy.max_attempts, delay, reason)
        else:
            if outcome == _Outcome.RETRY:
                reason = f"gave up after {delivery.attempts} attempts: {reason}"
            store.mark_failed(session_factory, delivery, error=reason, at=done)
            _audit(session_factory, config, delivery, EventKind.RESULT_DELIVERY_FAILED, done,
                   "failed", reason)
            log.error("delivery failed: SR %s of series %s to %s: %s",
                      delivery.sop_instance_uid, delivery.series_instance_uid,
                      delivery.destination, reason)
    return len(claimed)


def _audit(session_factory: sessionmaker[Session], config: Config, delivery: Delivery,
           kind: EventKind, at: dt.datetime, outcome: str, detail: str) -> None:
    """The audit event of a delivery's end (sent, or given up)."""
    store.record_events(session_factory, [EventRecord(
        kind, at, actor=config.dicom.ae_title, peer=delivery.destination, outcome=outcome,
        detail=detail[:2000], series_instance_uid=delivery.series_instance_uid,
        sop_instance_uid=delivery.sop_instance_uid)])


def run_delivery(
    config: Config,
    session_factory: sessionmaker[Session],
    stop: threading.Event,
    *,
    associate: scu.AssociationFactory = scu.associate,
    rng: random.Random | None = None,
    lease_seconds: float | None = None,
    wake: threading.Event | None = None,
) -> None:
    """Deliver the outbox until ``stop`` is set (run it in a thread of a long-lived process).

    Each round claims what is due and sends it (:func:`deliver_due`); when nothing was due
    it waits ``[results] poll_seconds``. Database failures are logged and retried after the
    same wait, so a database restart does not end the loop. Everything it knows is in the
    database: stopped or killed at any point, a new loop (in this or another process)
    carries on; a row claimed by a process that died is due again when its lease
    (:func:`default_lease`) has run out.

    Parameters
    ----------
    config : Config
        See :func:`deliver_due`.
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.make_session_factory`.
    stop : threading.Event
        Set it to end the loop (after the send in progress).
    associate : callable, optional
        The association factory (default: pynetdicom via :func:`triage_node.scu.associate`).
    rng : random.Random, optional
        Jitter source.
    lease_seconds : float, optional
        See :func:`deliver_due`.
    wake : threading.Event, optional
        Set it (e.g. right after queuing an SR in the same process) to look for due rows
        at once instead of after ``poll_seconds``.
    """
    if not isinstance(stop, threading.Event):
        raise TypeError(f"stop must be a threading.Event, not {type(stop).__name__}")
    rng = rng or random.Random()
    log.info("delivery loop started: %d destination(s): %s", len(config.destinations),
             ", ".join(destination_key(d) for d in config.destinations) or "none")
    while not stop.is_set():
        try:
            busy = deliver_due(config, session_factory, associate=associate, rng=rng,
                               lease_seconds=lease_seconds)
        except DatabaseError as exc:
            log.warning("delivery loop: %s; retrying in %.1f s", exc,
                        config.results.poll_seconds)
            busy = 0
        if not busy:
            if wake is None:
                stop.wait(config.results.poll_seconds)
            else:
                wake.wait(config.results.poll_seconds)
                wake.clear()
    log.info("delivery loop stopped")


def _now(clock: Callable[[], dt.datetime]) -> dt.datetime:
    """The clock's time, checked."""
    value = clock()
    if not isinstance(value, dt.datetime):
        raise TypeError(f"clock must return a datetime, not {type(value).__name__}")
    return value


def _seconds(value: float) -> dt.timedelta:
    """``value`` seconds as a timedelta."""
    return dt.timedelta(seconds=value)
