"""The worklist API and page (FastAPI), built once per process by :func:`create_app`.

Routes (all JSON unless said otherwise; ``/api/*`` and ``/metrics`` need credentials when
auth is on, the page and ``/healthz`` do not - they hold no patient data):

=========================================  ==================================================
``GET /``                                  the worklist page (static HTML + JS)
``GET /api/session``                       who the caller is (the page's login probe)
``GET /api/worklist``                      rows in priority order; ``state`` (repeatable),
                                           ``since``/``until`` (ISO 8601), ``hours``, ``limit``
``GET /api/series/{uid}``                  detail: row, per-slice ``any`` curve, key slices,
                                           timings, model, audit trail, feedback history
``GET /api/series/{uid}/key.png``          key slice PNG; ``?overlay=heatmap`` with heatmap
``POST /api/series/{uid}/feedback``        a verdict: ``{"ich", "subtypes", "comment",
                                           "user"}`` (``user`` only with the shared token)
``GET /healthz``                           database, broker, worker heartbeat; 200 or 503
``GET /metrics``                           Prometheus text
=========================================  ==================================================

No response, URL or log line carries a patient name: rows identify patients by Patient ID
only, and URLs carry UIDs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from importlib.resources import files
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from triage_node import store
from triage_node.api.auth import Authenticator, Principal
from triage_node.api.health import NodeCollector, health
from triage_node.config import Config
from triage_node.domain import LABELS, EventKind, EventRecord, SeriesState, utcnow
from triage_node.errors import DatabaseError
from triage_node.store.worklist import SUBTYPES, FeedbackRecord, WorklistRow

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: Most rows one worklist request returns.
MAX_LIMIT = 5000
#: The page polls the worklist; its views are audited at most this often per user and host.
WORKLIST_AUDIT_SECONDS = 600.0
#: Key slices listed in the detail: the key slice and the next-highest ``any``.
KEY_SLICES = 3


class FeedbackIn(BaseModel):
    """Body of ``POST /api/series/{uid}/feedback``."""

    ich: bool
    subtypes: dict[str, bool] = Field(default_factory=dict)
    comment: str = Field(default="", max_length=4000)
    #: who judges; required with the shared token, ignored with basic auth
    user: str = Field(default="", max_length=128)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _feedback_json(f: FeedbackRecord | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {"user": f.user, "ich": f.ich, "subtypes": f.subtypes, "comment": f.comment,
            "at": _iso(f.created_at), "result_stored_at": _iso(f.result_stored_at)}


def _row_json(row: WorklistRow) -> dict[str, Any]:
    delivery = None
    if row.delivery is not None:
        delivery = {"state": row.delivery.state.value, "destinations": row.delivery.counts,
                    "last_error": row.delivery.last_error}
    return {
        "series_instance_uid": row.series_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "patient_id": row.patient_id,
        "accession_number": row.accession_number,
        "study_description": row.study_description,
        "series_description": row.series_description,
        "modality": row.modality,
        "instance_count": row.instance_count,
        "state": row.state.value,
        "reason": row.reason,
        "arrived_at": _iso(row.first_received_at),
        "last_received_at": _iso(row.last_received_at),
        "probabilities": row.probabilities,
        "flagged": row.flagged,
        "threshold": row.threshold,
        "sr_delivery": delivery,
        "result_stored_at": _iso(row.result_stored_at),
        "inference_seconds": row.inference_seconds,
        "time_to_result_seconds": row.time_to_result_seconds,
        "feedback": _feedback_json(row.feedback),
        "has_key_images": row.has_key_images,
    }


def _event_json(e: EventRecord) -> dict[str, Any]:
    return {"at": _iso(e.at), "kind": e.kind.value, "actor": e.actor, "peer": e.peer,
            "outcome": e.outcome, "detail": e.detail, "sop_instance_uid": e.sop_instance_uid}


def _parse_time(value: str | None, name: str) -> dt.datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise HTTPException(422, f"{name}: not an ISO 8601 time: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _principal(request: Request) -> Principal:
    """The caller, or 401 (the dependency of every protected route)."""
    auth: Authenticator = request.app.state.auth
    who = auth.check(request.headers.get("authorization"))
    if who is None:
        challenge = 'Bearer realm="triage-node"'
        if auth.basic and request.headers.get("x-requested-with") != "triage-node":
            # The page has its own sign-in form: no browser dialog for its requests.
            challenge += ', Basic realm="triage-node"'
        raise HTTPException(401, "authentication required",
                            headers={"WWW-Authenticate": challenge})
    return who


Caller = Annotated[Principal, Depends(_principal)]


def _page() -> str:
    return (files("triage_node.api") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(config: Config, *, engine: Engine | None = None) -> FastAPI:
    """Build the API for ``config``: engine, session factory and auth made once, here.

    Parameters
    ----------
    config : Config
        The effective configuration (``[api]``, ``[database]``, ``[queue]``).
    engine : sqlalchemy.Engine, optional
        Use this engine instead of one made from ``[database] url`` (it is not disposed).

    Returns
    -------
    fastapi.FastAPI
        The application; serve it with uvicorn (see :func:`triage_node.api.api_main`).

    Raises
    ------
    ConfigError
        If credentials are required (``[api] host`` not loopback, or ``auth = "required"``)
        and none is configured.
    DatabaseError
        If the database URL is invalid.
    """
    auth = Authenticator(config.api)
    own_engine = engine is None
    engine = engine if engine is not None else store.make_engine(config.database.url)
    factory: sessionmaker[Session] = store.make_session_factory(engine)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(config, factory))

    app = FastAPI(title="triage-node worklist", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.config = config
    app.state.auth = auth
    app.state.session_factory = factory
    if own_engine:
        app.router.on_shutdown.append(engine.dispose)

    @app.exception_handler(DatabaseError)
    async def _database_down(_request: Request, exc: DatabaseError) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(packages=[("triage_node.api", "static")]), name="static")

    @app.get("/api/session")
    def session(who: Caller) -> dict[str, Any]:
        return {"method": who.method, "user": who.user, "labels": list(LABELS),
                "subtypes": list(SUBTYPES)}

    viewed: dict[tuple[str, str], float] = {}  # (user, peer) -> last worklist audit time

    def _audit(kind: EventKind, who: Principal, request: Request, detail: str = "",
               series_uid: str | None = None) -> None:
        store.record_events(factory, [EventRecord(
            kind, utcnow(), actor=who.user or f"({who.method})",
            peer=request.client.host if request.client else "", outcome="viewed",
            detail=detail, series_instance_uid=series_uid)])

    @app.get("/api/worklist")
    def worklist(
        _who: Caller,
        request: Request,
        state: Annotated[list[str] | None, Query()] = None,
        since: str | None = None,
        until: str | None = None,
        hours: Annotated[float | None, Query(gt=0)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 500,
    ) -> dict[str, Any]:
        try:
            states = [SeriesState(s) for s in state] if state else None
        except ValueError as exc:
            known = ", ".join(s.value for s in SeriesState)
            raise HTTPException(422, f"state: {exc} (known: {known})") from exc
        start = _parse_time(since, "since")
        if hours is not None:
            recent = utcnow() - dt.timedelta(hours=hours)
            start = recent if start is None else max(start, recent)
        rows = store.list_worklist(factory, states=states, since=start,
                                   until=_parse_time(until, "until"), limit=limit)
        key = (_who.user or _who.method, request.client.host if request.client else "")
        if time.monotonic() - viewed.get(key, -WORKLIST_AUDIT_SECONDS) >= \
                WORKLIST_AUDIT_SECONDS:  # the page polls: one event per user per 10 min
            viewed[key] = time.monotonic()
            _audit(EventKind.WORKLIST_VIEWED, _who, request, f"{len(rows)} rows")
        return {"rows": [_row_json(r) for r in rows], "count": len(rows),
                "at": _iso(utcnow())}

    def _row_or_404(series_uid: str) -> WorklistRow:
        if not series_uid or len(series_uid) > 128:
            raise HTTPException(404, "unknown series")
        row = store.worklist_row(factory, series_uid)
        if row is None:
            raise HTTPException(404, "unknown series")
        return row

    @app.get("/api/series/{series_uid}")
    def series(series_uid: str, _who: Caller, request: Request) -> dict[str, Any]:
        row = _row_or_404(series_uid)
        _audit(EventKind.SERIES_VIEWED, _who, request, series_uid=series_uid)
        result = store.get_result(factory, series_uid)
        out = _row_json(row)
        out["slices"] = []
        out["key_slices"] = []
        out["model"] = None
        if result is not None:
            out["slices"] = [{"sop_instance_uid": uid, "position": pos, "any": probs[0]}
                             for uid, pos, probs in result.slices]
            ranked = sorted(range(len(result.slices)), key=lambda i: -result.slices[i][2][0])
            out["key_slices"] = [
                {"index": i, "sop_instance_uid": result.slices[i][0],
                 "position": result.slices[i][1],
                 "probabilities": dict(zip(LABELS, result.slices[i][2], strict=True)),
                 "key": result.slices[i][0] == result.key_sop_instance_uid}
                for i in ranked[:KEY_SLICES]]
            out["model"] = {"name": result.model_name, "version": result.model_version,
                            "sha256": result.model_sha256}
        out["timings"] = {
            "arrived_at": _iso(row.first_received_at),
            "last_received_at": _iso(row.last_received_at),
            "inference_started_at": _iso(result.inference_started_at) if result else None,
            "inference_done_at": _iso(result.inference_done_at) if result else None,
            "result_stored_at": _iso(row.result_stored_at),
            "inference_seconds": row.inference_seconds,
            "time_to_result_seconds": row.time_to_result_seconds,
        }
        images = store.get_key_images(factory, series_uid)
        out["key_image"] = None if images is None else {
            "sop_instance_uid": images.sop_instance_uid, "method": images.method,
            "model_sha256": images.model_sha256, "created_at": _iso(images.created_at)}
        out["audit"] = [_event_json(e) for e in store.series_events(factory, series_uid)]
        out["feedback_history"] = [_feedback_json(f)
                                   for f in store.list_feedback(factory, series_uid)]
        return out

    @app.get("/api/series/{series_uid}/key.png")
    def key_png(series_uid: str, _who: Caller, overlay: str = "none") -> Response:
        if overlay not in ("none", "heatmap"):
            raise HTTPException(422, "overlay: expected none or heatmap")
        images = store.get_key_images(factory, series_uid) if series_uid else None
        if images is None:
            raise HTTPException(404, "no key image for this series")
        data = images.heatmap_png if overlay == "heatmap" else images.plain_png
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=60"})

    @app.post("/api/series/{series_uid}/feedback", status_code=201)
    def feedback(series_uid: str, body: FeedbackIn, who: Caller,
                 request: Request) -> dict[str, Any]:
        user = who.user if who.user is not None else body.user.strip()
        if not user:
            raise HTTPException(422, "user: name the radiologist giving the verdict")
        peer = request.client.host if request.client else ""
        try:
            record = store.record_feedback(
                factory, series_uid, user=user, ich=body.ich, subtypes=body.subtypes,
                comment=body.comment, peer=peer)
        except LookupError as exc:
            raise HTTPException(404, "unknown series") from exc
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
        log.info("feedback on series %s by %s: %s", series_uid, user,
                 "ICH" if record.ich else "no ICH")
        out = _feedback_json(record)
        assert out is not None
        return out

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        report = health(config, factory)
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get("/metrics")
    def metrics(_who: Caller) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
