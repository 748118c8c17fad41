"""``triage-node``: the command line (imports anything; nothing imports it)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from triage_node import __version__
from triage_node.config import ENV_CONFIG, ENV_DATA_DIR, Config, load_config
from triage_node.domain import EventKind, utcnow
from triage_node.errors import AssociationError, ConfigError, TriageNodeError
from triage_node.logs import setup_logging

log = logging.getLogger("triage_node")


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help=f"config.toml (default: ${ENV_CONFIG}, else built-in defaults)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="override [logging] level")
    common.add_argument("--log-json", action="store_true", default=None,
                        help="one JSON object per log line")

    parser = argparse.ArgumentParser(
        prog="triage-node",
        description="DICOM node that triages head CT for intracranial hemorrhage.",
    )
    parser.add_argument("--version", action="version", version=f"triage-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def listener(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="override [dicom] host")
        p.add_argument("--port", type=int, help="override [dicom] port (0 = any free port)")
        p.add_argument("--ae-title", help="override [dicom] ae_title")
        p.add_argument("--processes", type=int, help="override [dicom] processes")
        p.add_argument("--data-dir", type=Path, help="data directory (spool and SQLite)")

    p = sub.add_parser("serve", parents=[common],
                       help="run everything one machine needs: the Storage SCP and a worker")
    listener(p)
    p = sub.add_parser("scp", parents=[common], help="run the DICOM Storage SCP")
    listener(p)

    p = sub.add_parser("worker", parents=[common],
                       help="run a classification worker (and the series assembler)")
    p.add_argument("--data-dir", type=Path, help="data directory (spool and SQLite)")
    p.add_argument("--no-assembler", action="store_true",
                   help="only classify; another process decides complete series")

    p = sub.add_parser("api", parents=[common],
                       help="run the radiologist worklist API and page (FastAPI + uvicorn)")
    p.add_argument("--api-host", dest="api_host", help="override [api] host")
    p.add_argument("--api-port", dest="api_port", type=int, help="override [api] port")
    p.add_argument("--data-dir", type=Path, help="data directory (spool and SQLite)")

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("upgrade", parents=[common], help="apply schema migrations (idempotent)")
    dbsub.add_parser("current", parents=[common], help="print the schema revision")

    p = sub.add_parser("send", parents=[common], help="send DICOM files/folders by C-STORE")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--to", required=True, type=_hostport, metavar="HOST:PORT")
    p.add_argument("--called-ae", default="ICHTRIAGE")
    p.add_argument("--calling-ae", default="TRIAGE-SCU")

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    p.add_argument("to", type=_hostport, metavar="HOST:PORT")
    p.add_argument("--called-ae", default="ICHTRIAGE")
    p.add_argument("--calling-ae", default="TRIAGE-SCU")

    p = sub.add_parser("series", parents=[common], help="list received series")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--limit", type=int, default=None)

    p = sub.add_parser("demo", parents=[common],
                       help="start the node, send phantom studies, print the worklist, stop")
    p.add_argument("--studies", type=int, default=4, help="phantom studies (default 4)")
    p.add_argument("--slices", type=int, default=24, help="slices per study (default 24)")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the node running (Ctrl-C stops it) to look at the page")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the demo's data goes (default: a new temporary folder)")

    p = sub.add_parser("retention", parents=[common],
                       help="remove images (and rows) of settled series past [retention]")
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be removed; change nothing")

    p = sub.add_parser("audit", parents=[common],
                       help="print the audit trail (associations, instances, results, ...)")
    p.add_argument("--since", type=_since, default=None, metavar="WHEN",
                   help="only events from WHEN on: an ISO 8601 time (UTC if no zone) or an "
                        "age such as 30m, 24h, 7d")
    p.add_argument("--kind", action="append", default=None, metavar="KIND",
                   choices=[k.value for k in EventKind],
                   help="only this kind of event (repeatable): "
                        + ", ".join(k.value for k in EventKind))
    p.add_argument("--limit", type=int, default=None, help="at most this many (oldest first)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("phantom", parents=[common],
                       help="write synthetic head-CT studies (DICOM + RSNA-style labels)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-rate", type=float, default=0.5, metavar="R",
                   help="fraction of studies with hemorrhage (default 0.5)")
    p.add_argument("--slices", type=int, default=32, metavar="K", help="slices per study")
    p.add_argument("--no-quirks", action="store_true",
                   help="omit the RSNA data quirks (unsigned 12-bit, odd spacing, MONOCHROME1)")

    p = sub.add_parser("model", parents=[common], help="model artifacts")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mi = msub.add_parser("info", parents=[common], help="print an artifact's metadata")
    mi.add_argument("path", type=Path, metavar="PATH")
    mi.add_argument("--json", action="store_true", help="JSON output")

    _add_train_commands(sub, common)

    p = sub.add_parser("config", parents=[common], help="print the effective configuration")
    return parser


def _window(value: str) -> tuple[float, float]:
    center, sep, width = value.partition("/")
    try:
        c, w = float(center), float(width)
    except ValueError:
        c = w = math.nan
    if not sep or not (math.isfinite(c) and math.isfinite(w) and w > 0):
        raise argparse.ArgumentTypeError(f"expected CENTER/WIDTH in HU (e.g. 40/80), got {value!r}")
    return c, w


def _add_train_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        common: argparse.ArgumentParser) -> None:
    """``train`` and ``evaluate`` (their code lives in the top-level ``train`` package)."""
    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", type=Path, metavar="DIR",
                       help="folder of the DICOM slices, searched recursively (RSNA: the "
                            "stage_2_train folder of ID_<id>.dcm; generic CSV: a folder holding "
                            "every file it lists, relative paths being relative to the CSV); "
                            "required with --labels, optional with --from-store")
        p.add_argument("--labels", type=Path, metavar="CSV",
                       help="RSNA stage_2_train.csv (ID_<id>_<label>,Label) or a generic CSV "
                            "with a 'path' column and the columns any, epidural, "
                            "intraparenchymal, intraventricular, subarachnoid, subdural")
        p.add_argument("--from-store", nargs="?", const="", default=None,
                       metavar="DATABASE_URL",
                       help="also (or only) use the radiologists' verdicts stored by a node: "
                            "refuted series as slice-level negatives, confirmed ones as "
                            "series-level positives (multiple-instance learning); the newest "
                            "verdict per series counts. Without a URL: the node's own "
                            "database ([database] url of --config, or "
                            "$TRIAGE_NODE_DATABASE_URL), which keeps a password off the "
                            "command line. Read only; never shown with its password")
        p.add_argument("--spool", type=Path, metavar="DIR",
                       help="with --from-store: the node's spool, where the stored slices are "
                            "(default: [storage] path of --config); slices removed by retention "
                            "are skipped and counted")
        p.add_argument("--from-store-since", type=_since, default=None, metavar="WHEN",
                       help="with --from-store: only series whose newest verdict is from WHEN "
                            "on: an ISO 8601 time (UTC if no zone) or an age such as 90d")
        p.add_argument("--label-format", choices=["auto", "rsna", "generic"], default="auto",
                       help="format of --labels (default: from its header)")
        p.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="persistent cache of preprocessed series, one float16 .npy each, "
                            "reusable across runs (default: WORK_DIR/cache, or OUT/cache)")
        p.add_argument("--index", type=Path, metavar="FILE",
                       help="DICOM header index (default CACHE_DIR/index.csv); headers are read "
                            "once and only new or changed files again")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                       help="worker processes for header reading, preprocessing and data "
                            "loading; 0 = in the main process (default: min(8, cores))")
        p.add_argument("--device", default="auto",
                       help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "train", parents=[common], help="train a model artifact on labelled head CT",
        description="Train the ICH classifier and write a model artifact. Data: --data with "
                    "--labels, --from-store, or both. Splits by patient "
                    "(multilabel-stratified), caches preprocessed slices, trains with AdamW "
                    "(warm-up + cosine), the RSNA weighted log loss and augmentations, keeps a "
                    "checkpoint every epoch in --work-dir (continue with --resume), stops early "
                    "on the validation weighted log loss and stores the threshold of 'any' for "
                    "--target-sensitivity. The same command and --seed reproduce the model. "
                    "Confirmed series from --from-store are trained with the maximum over "
                    "their slices, the worker's series score; --resume reuses the store labels "
                    "frozen in WORK_DIR/store_labels.json.")
    data_options(p)
    p.add_argument("--work-dir", required=True, type=Path, metavar="DIR",
                   help="checkpoint.pt, best.pt, metrics.jsonl (one JSON line per epoch) and "
                        "by default the cache and the artifact")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="artifact to write (default WORK_DIR/model.tnm)")
    p.add_argument("--resume", action="store_true",
                   help="continue from WORK_DIR/checkpoint.pt (same data and training settings; "
                        "--epochs and --patience may change)")
    p.add_argument("--architecture", default="efficientnet-b0",
                   help="network: efficientnet-b0 (default), densenet121, resnet18, resnet34, "
                        "resnet50 or small-cnn (tiny; CPU tests and the demo model)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="input side in pixels (default 256)")
    p.add_argument("--context", type=int, default=0, metavar="K",
                   help="2.5D context: neighbouring slices on each side as channels (default 0)")
    p.add_argument("--window", type=_window, action="append", metavar="C/W", dest="windows",
                   help="window CENTER/WIDTH in HU, one channel each, repeatable "
                        "(default 40/80 80/200 40/380)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="slices per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (1e-4)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, metavar="E",
                   help="linear warm-up in epochs before the cosine decay (default 1)")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of patients held out for validation (default 0.2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of split, initialisation, sampling, augmentation (default 0)")
    p.add_argument("--patience", type=int, default=5, metavar="E",
                   help="stop after E epochs without a better validation weighted log loss; "
                        "0 = never (default 5)")
    p.add_argument("--oversample", type=float, default=1.0, metavar="X",
                   help="draw slices positive for 'any' X times as often (default 1 = off)")
    p.add_argument("--no-augment", action="store_true",
                   help="no flips, rotations/affine or intensity jitter")
    p.add_argument("--target-sensitivity", type=float, default=0.95, metavar="S",
                   help="series-level sensitivity of 'any' the stored threshold is chosen for "
                        "on the validation series (default 0.95)")
    p.add_argument("--bag-max-slices", type=int, default=64, metavar="N",
                   help="with --from-store: slices of a confirmed series one training step "
                        "uses (the whole series up to N, else every k-th slice from a random "
                        "offset, the whole head at a coarser spacing; default 64)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--name", default="triage-node-ich", help="model name in the artifact")
    p.add_argument("--model-version", default="", metavar="V",
                   help="version in the artifact (default trained-DATE-seedN)")
    p.add_argument("--note", default="",
                   help="free text recorded in the artifact, e.g. 'phantom-trained, not for "
                        "clinical use'")

    p = sub.add_parser(
        "evaluate", parents=[common], help="evaluate a model artifact on labelled head CT",
        description="Predict every labelled slice with the artifact's own preprocessing, score "
                    "series as the worker does (max over slices) and write metrics.json, ROC "
                    "and calibration PNGs and a self-contained report.html to --out. Data: "
                    "--data with --labels, --from-store (the radiologists' verdicts: "
                    "confirmed series count at the series level only), or both.")
    p.add_argument("--model", required=True, type=Path, metavar="FILE", help="model artifact")
    data_options(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="slices per forward pass (default 64)")


def _load(args: argparse.Namespace) -> Config:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        # On the command line it moves the defaults that live under it (spool, SQLite) too.
        env[ENV_DATA_DIR] = str(args.data_dir)
    config = load_config(args.config, env=env)
    dicom = config.dicom
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "ae_title", "processes")}
    dicom = replace(dicom, **{k: v for k, v in overrides.items() if v is not None})
    api_overrides = {k: getattr(args, f"api_{k}", None) for k in ("host", "port")}
    config = replace(config, api=replace(
        config.api, **{k: v for k, v in api_overrides.items() if v is not None}))
    level = args.log_level or config.logging.level
    as_json = args.log_json if args.log_json is not None else config.logging.json
    return replace(config, dicom=dicom,
                   logging=replace(config.logging, level=level, json=as_json))


def _log_effective(config: Config) -> None:
    log.info("triage-node %s, configuration from %s: %s", __version__, config.source,
             json.dumps(config.redacted(), sort_keys=True))


def _cmd_scp(config: Config) -> int:
    from triage_node.scp import run_scp

    _log_effective(config)
    return run_scp(config, extra_children=_spool_server(config))


def _cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from triage_node import tasks

    _log_effective(config)
    tasks.worker_main(config, assembler=not args.no_assembler)
    return 0


def _cmd_serve(config: Config) -> int:
    from triage_node import tasks
    from triage_node.api import api_main
    from triage_node.api.auth import Authenticator
    from triage_node.scp import run_scp

    _log_effective(config)
    Authenticator(config.api)  # refuse now, not in a child restarted in a loop
    return run_scp(config, extra_children=[("worker", tasks.worker_main), ("api", api_main),
                                           *_spool_server(config)])


def _spool_server(config: Config) -> list[tuple[str, Callable[[Config], None]]]:
    """The spool server child, when ``[storage] http_port`` asks for one."""
    from triage_node.spoolhttp import spool_server_main

    return [("spool-http", spool_server_main)] if config.storage.http_port else []


def _since(text: str) -> dt.datetime:
    """``--since``: an ISO 8601 time (naive = UTC) or an age like ``30m``, ``24h``, ``7d``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return utcnow() - dt.timedelta(seconds=float(m.group(1)) * unit)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time nor an age like 24h") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _cmd_retention(args: argparse.Namespace, config: Config) -> int:
    from triage_node.retention import run_retention

    report = run_retention(config, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for s in report.images_series:
        print(f"{verb} images  {s.series_instance_uid}  {s.state.value}  last received "
              f"{s.last_received_at.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    for s in report.rows_series:
        print(f"{verb} rows    {s.series_instance_uid}  {s.state.value}  last received "
              f"{s.last_received_at.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    r = config.retention
    print(f"{'dry run: ' if args.dry_run else ''}{verb} {report.files} image file(s), "
          f"{report.bytes / 2**20:.1f} MiB, of {len(report.images_series)} series "
          f"(images_days={r.images_days}); rows of {len(report.rows_series)} series"
          + (f" and {report.events} audit event(s)" if not args.dry_run else "")
          + f" (rows_days={r.rows_days})")
    return 0


def _cmd_audit(args: argparse.Namespace, config: Config) -> int:
    from triage_node import store

    engine = store.make_engine(config.database.url)
    try:
        store.upgrade(config.database.url)
        events = store.list_events(
            store.make_session_factory(engine), since=args.since,
            kinds=[EventKind(k) for k in args.kind] if args.kind else None, limit=args.limit)
    finally:
        engine.dispose()
    for e in events:
        if args.json:
            print(json.dumps({
                "at": e.at.isoformat(), "kind": e.kind.value, "actor": e.actor,
                "peer": e.peer, "outcome": e.outcome, "detail": e.detail,
                "study_instance_uid": e.study_instance_uid,
                "series_instance_uid": e.series_instance_uid,
                "sop_instance_uid": e.sop_instance_uid}, sort_keys=True))
        else:
            about = " ".join(f"{name}={uid}" for name, uid in (
                ("series", e.series_instance_uid), ("sop", e.sop_instance_uid)) if uid)
            print("  ".join(part for part in (
                e.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), f"{e.kind.value:<20}",
                f"actor={e.actor or '-'}", f"peer={e.peer or '-'}",
                f"outcome={e.outcome or '-'}", about, e.detail) if part))
    return 0


def _cmd_api(config: Config) -> int:
    from triage_node import store
    from triage_node.api import serve_app

    _log_effective(config)
    store.upgrade(config.database.url)
    try:
        serve_app(config)
    except ConfigError as exc:  # e.g. bound beyond loopback without credentials
        print(f"triage-node: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_db(args: argparse.Namespace, config: Config) -> int:
    from triage_node import store
    from triage_node.logs import redact_url

    if args.db_command == "upgrade":
        store.upgrade(config.database.url)
        print(f"database {redact_url(config.database.url)} at revision "
              f"{store.current_revision(config.database.url)}")
    else:
        print(store.current_revision(config.database.url) or "(empty)")
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    from triage_node import scu

    host, port = args.to
    try:
        files = scu.collect_files(args.paths)
    except ValueError as exc:  # a path that does not exist
        print(f"triage-node: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("no DICOM files found", file=sys.stderr)
        return 2
    report = scu.send(files, host, port, called_ae=args.called_ae, calling_ae=args.calling_ae)
    print(f"sent {report.sent} of {len(files)} file(s) in {report.seconds:.2f} s"
          + (f", {len(report.failed)} failed" if report.failed else ""))
    for failed in report.failed:
        status = f"0x{failed.status:04X}" if failed.status is not None else "-"
        print(f"  FAILED {failed.path}: {status} {failed.reason}", file=sys.stderr)
    return 0 if not report.failed else 1


def _cmd_echo(args: argparse.Namespace) -> int:
    from triage_node import scu

    host, port = args.to
    seconds = scu.echo(host, port, called_ae=args.called_ae, calling_ae=args.calling_ae)
    print(f"C-ECHO {args.called_ae}@{host}:{port}: success in {seconds * 1000:.1f} ms")
    return 0


def _cmd_series(args: argparse.Namespace, config: Config) -> int:
    from triage_node import store

    engine = store.make_engine(config.database.url)
    try:
        store.upgrade(config.database.url)
        factory = store.make_session_factory(engine)
        rows = store.list_series(factory, limit=args.limit)
        results = {r.series_instance_uid: res for r in rows
                   if (res := store.get_result(factory, r.series_instance_uid)) is not None}
    finally:
        engine.dispose()
    if args.json:
        out = []
        for r in rows:
            item: dict[str, object] = {
                "series_instance_uid": r.series_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "patient_id": r.patient_id,
                "accession_number": r.accession_number,
                "modality": r.modality,
                "series_description": r.series_description,
                "instance_count": r.instance_count,
                "state": r.state.value,
                "reason": r.reason,
                "first_received_at": r.first_received_at.isoformat()
                if r.first_received_at else None,
                "last_received_at": r.last_received_at.isoformat()
                if r.last_received_at else None,
                "result": None,
            }
            result = results.get(r.series_instance_uid)
            if result is not None:
                item["result"] = {
                    "probabilities": result.probabilities,
                    "flagged": result.flagged,
                    "threshold": result.threshold,
                    "key_sop_instance_uid": result.key_sop_instance_uid,
                    "slices": [{"sop_instance_uid": u, "position": p,
                                "any": probs[0]} for u, p, probs in result.slices],
                    "model": {"name": result.model_name, "version": result.model_version,
                              "sha256": result.model_sha256},
                    "inference_started_at": result.inference_started_at.isoformat(),
                    "inference_done_at": result.inference_done_at.isoformat(),
                    "stored_at": result.stored_at.isoformat() if result.stored_at else None,
                    "time_to_result_seconds": (result.stored_at - r.last_received_at
                                               ).total_seconds()
                    if result.stored_at and r.last_received_at else None,
                }
            out.append(item)
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print("no series received")
        return 0
    print(f"{'last received (UTC)':<20} {'patient':<16} {'mod':<4} {'n':>5} {'state':<12} "
          "series UID / description")
    for r in rows:
        when = r.last_received_at.strftime("%Y-%m-%d %H:%M:%S") if r.last_received_at else "-"
        print(f"{when:<20} {r.patient_id[:16]:<16} {r.modality[:4]:<4} {r.instance_count:>5} "
              f"{r.state.value:<12} {r.series_instance_uid} {r.series_description}"
              + (f" ({r.reason})" if r.reason else ""))
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from triage_node import phantom

    try:
        truths = phantom.generate(args.out, studies=args.studies, seed=args.seed,
                                  positive_rate=args.positive_rate, n_slices=args.slices,
                                  quirks=not args.no_quirks)
    except ValueError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return 2
    positives = sum(t.positive for t in truths)
    print(f"wrote {len(truths)} studies ({positives} with hemorrhage), "
          f"{sum(len(t.slices) for t in truths)} slices, to {args.out}; labels in "
          f"{args.out / 'stage_2_train.csv'} and {args.out / 'series_labels.csv'}")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    # read_meta never unpickles weights; torch is imported only because model.py needs it.
    import dataclasses

    from triage_node import model

    meta = model.read_meta(args.path)
    if args.json:
        print(json.dumps(dataclasses.asdict(meta), indent=2, sort_keys=True))
    else:
        print(model.describe(meta))
    return 0


def _data_sources(args: argparse.Namespace, config: Config) -> tuple[str | None, Path | None]:
    """Check --data/--labels/--from-store; the store's URL and spool (None without it).

    Raises
    ------
    ValueError
        For a combination that names no data or half of a pair.
    """
    if (args.data is None) != (args.labels is None):
        raise ValueError("--data and --labels go together")
    if args.from_store is None:
        if args.data is None:
            raise ValueError("no data: give --data and --labels, or --from-store (or both)")
        if args.spool is not None or args.from_store_since is not None:
            raise ValueError("--spool and --from-store-since need --from-store")
        return None, None
    return args.from_store or config.database.url, args.spool or config.storage.path


def _masked_argv(argv: Sequence[str], url: str | None) -> list[str]:
    """The command line with the database URL's password hidden (it goes into artifacts)."""
    from triage_node.logs import redact_url

    if not url:
        return list(argv)
    masked = redact_url(url)
    return [a.replace(url, masked) for a in argv]


def _cmd_train(args: argparse.Namespace, argv: Sequence[str], node: Config) -> int:
    import shlex

    try:
        url, spool = _data_sources(args, node)  # before torch is imported: a quick refusal
    except ValueError as exc:
        print(f"triage-node train: {exc}", file=sys.stderr)
        return 2
    from train.loop import TrainConfig, train

    try:
        config = TrainConfig(
            data=args.data, labels=args.labels, from_store=url, spool=spool,
            from_store_since=args.from_store_since, bag_max_slices=args.bag_max_slices,
            work_dir=args.work_dir, out=args.out,
            label_format=args.label_format, cache_dir=args.cache_dir, index=args.index,
            architecture=args.architecture, size=args.size, context=args.context,
            **({"windows": tuple(args.windows)} if args.windows else {}),
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
            val_fraction=args.val_fraction, seed=args.seed, patience=args.patience,
            oversample=args.oversample, augment=not args.no_augment,
            target_sensitivity=args.target_sensitivity, workers=args.workers,
            device=args.device, amp=not args.no_amp, name=args.name,
            version=args.model_version, note=args.note, progress=not args.no_progress)
        result = train(config, resume=args.resume,
                       command=shlex.join(["triage-node", *_masked_argv(argv, url)]))
    except ValueError as exc:
        print(f"triage-node train: {exc}", file=sys.stderr)
        return 2
    m = result.meta.metrics
    slice_loss = m["slice.weighted_log_loss"]
    print(f"wrote {result.artifact} (best epoch {result.best_epoch} of {result.epochs_run}"
          + (", stopped early" if result.stopped_early else "") + ")")
    print("validation: slice weighted log loss "
          + ("n/a" if slice_loss is None else f"{slice_loss:.4f}")
          + f", series AUC (any) {m['series.any.auc']}"
          + (f" ({m['series.bags']} of {m['series.count']} series confirmed by radiologists)"
             if "series.bags" in m else "")
          + f", threshold {m['series.any.threshold']:.4f} -> series sensitivity "
          f"{m['series.any.sensitivity']:.3f}, specificity {m['series.any.specificity']}")
    sources = result.meta.training.get("sources")
    if sources and sources.get("store"):
        st = sources["store"]
        print(f"store {st['source']}: {st['refuted_series_used']} refuted and "
              f"{st['confirmed_series_used']} confirmed series used; "
              f"{st['slices_missing']} slice file(s) missing, "
              f"{st['slices_unreadable'] + st['slices_undecodable']} unreadable, "
              f"{st['series_dropped']} series dropped")
    return 0


def _cmd_evaluate(args: argparse.Namespace, node: Config) -> int:
    try:
        url, spool = _data_sources(args, node)
    except ValueError as exc:
        print(f"triage-node evaluate: {exc}", file=sys.stderr)
        return 2
    from train.evaluate import evaluate, format_summary

    try:
        metrics = evaluate(args.model, args.data, args.labels, args.out, from_store=url,
                           spool=spool, since=args.from_store_since,
                           label_format=args.label_format, cache_dir=args.cache_dir,
                           index=args.index, workers=args.workers, batch_size=args.batch_size,
                           device=args.device, progress=not args.no_progress)
    except ValueError as exc:
        print(f"triage-node evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_summary(metrics))
    print(f"report: {args.out / 'report.html'}, figures: {args.out / 'metrics.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"triage-node: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, json_lines=config.logging.json)
    try:
        if args.command == "scp":
            return _cmd_scp(config)
        if args.command == "serve":
            return _cmd_serve(config)
        if args.command == "worker":
            return _cmd_worker(args, config)
        if args.command == "db":
            return _cmd_db(args, config)
        if args.command == "api":
            return _cmd_api(config)
        if args.command == "send":
            return _cmd_send(args)
        if args.command == "echo":
            return _cmd_echo(args)
        if args.command == "series":
            return _cmd_series(args, config)
        if args.command == "audit":
            return _cmd_audit(args, config)
        if args.command == "retention":
            return _cmd_retention(args, config)
        if args.command == "demo":
            from triage_node.demo import run_demo

            return run_demo(studies=args.studies, slices=args.slices,
                            keep_running=args.keep_running, workdir=args.workdir)
        if args.command == "phantom":
            return _cmd_phantom(args)
        if args.command == "model":
            return _cmd_model(args)
        if args.command == "train":
            return _cmd_train(args, sys.argv[1:] if argv is None else argv, config)
        if args.command == "evaluate":
            return _cmd_evaluate(args, config)
        if args.command == "config":
            print(json.dumps(config.redacted(), indent=2, sort_keys=True))
            return 0
    except AssociationError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return 1
    except TriageNodeError as exc:
        log.error("%s", exc)
        print(f"triage-node: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
