"""Retention: remove spooled images of settled series after ``[retention] images_days``, and
their database rows after ``rows_days`` (0 = never).

Never before a series is settled (:mod:`triage_node.store.retention`): done with every SR
delivered, or not triaged. Rows of series with radiologist feedback are kept (training
labels); their images go like any other's. Each removal is an audit event. ``triage-node retention
--dry-run`` reports what a run would remove and changes nothing; the systemd timer
(``systemd/triage-node-retention.timer``) runs it daily.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from triage_node import store
from triage_node.config import Config
from triage_node.domain import EventKind, EventRecord, utcnow
from triage_node.spool import Spool
from triage_node.store.retention import SettledSeries, prune_events, prune_series, settled_series

log = logging.getLogger(__name__)

__all__ = ["RetentionReport", "run_retention"]


@dataclass
class RetentionReport:
    """What a retention run removed (or, dry, would remove)."""

    dry_run: bool
    images_series: list[SettledSeries] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    rows_series: list[SettledSeries] = field(default_factory=list)
    events: int = 0


def run_retention(config: Config, *, dry_run: bool, now: dt.datetime | None = None
                  ) -> RetentionReport:
    """Apply ``[retention]`` once; see the module docstring."""
    now = now or utcnow()
    rules = config.retention
    report = RetentionReport(dry_run)
    engine = store.make_engine(config.database.url)
    try:
        store.upgrade(config.database.url)
        factory = store.make_session_factory(engine)
        spool = Spool(config.storage.path)
        if rules.images_days:
            cutoff = now - dt.timedelta(days=rules.images_days)
            for series in settled_series(factory, older_than=cutoff):
                present = [(rel, size) for rel, size in series.files
                           if spool.path(rel).is_file()]
                if not present:
                    continue  # removed by an earlier run
                report.images_series.append(series)
                report.files += len(present)
                report.bytes += sum(size for _, size in present)
                if dry_run:
                    continue
                for rel, _ in present:
                    path = spool.path(rel)
                    path.unlink(missing_ok=True)
                    _remove_empty_parents(path.parent, spool.root)
                log.info("retention: removed %d image(s) of series %s (%s, last received %s)",
                         len(present), series.series_instance_uid, series.state.value,
                         series.last_received_at.isoformat())
                store.record_events(factory, [EventRecord(
                    EventKind.IMAGES_REMOVED, utcnow(), actor="retention", outcome="removed",
                    detail=f"{len(present)} file(s), images_days={rules.images_days}",
                    series_instance_uid=series.series_instance_uid)])
        if rules.rows_days:
            cutoff = now - dt.timedelta(days=rules.rows_days)
            report.rows_series = settled_series(factory, older_than=cutoff,
                                                keep_labelled=True)
            if not dry_run:
                for series in report.rows_series:  # their images went at images_days
                    for rel, _ in series.files:
                        spool.path(rel).unlink(missing_ok=True)
                prune_series(factory, [s.series_instance_uid for s in report.rows_series])
                report.events = prune_events(factory, older_than=cutoff)
                if report.rows_series or report.events:
                    log.info("retention: pruned %d series and %d audit event(s) older than "
                             "%d days", len(report.rows_series), report.events,
                             rules.rows_days)
    finally:
        engine.dispose()
    return report


def _remove_empty_parents(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``root`` while empty."""
    d, top = directory, root.resolve()
    while d.resolve() != top and top in d.resolve().parents:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): stop
            return
        d = d.parent
