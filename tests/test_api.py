"""The worklist API against a live uvicorn server and a populated database (SQLite, PostgreSQL)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nodeproc import free_port, wait_port
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker
from worklistdata import (
    PATIENT_NAME,
    PLAN,
    PRIORITY,
    TOKEN,
    live_server,
    make_config,
    png,
    populate,
)

from triage_node import store
from triage_node.api import create_app
from triage_node.api.auth import is_loopback
from triage_node.config import ApiUser, Config
from triage_node.errors import ConfigError

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLAGGED = PLAN[2].uid  # any 0.95, SR delivery failed
RECEIVING = PLAN[5].uid  # no result, no key image


@pytest.fixture
def populated(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    populate(session_factory)
    return session_factory


@pytest.fixture
def config(tmp_path: Path, database_url: str, populated: sessionmaker[Session]) -> Config:
    return make_config(tmp_path, database_url, token=TOKEN)


@pytest.fixture
def api(config: Config, caplog: pytest.LogCaptureFixture) -> Iterator[httpx.Client]:
    caplog.set_level(logging.DEBUG)
    with live_server(config) as base, httpx.Client(base_url=base, timeout=10) as client:
        yield client
    # Nothing the API logged names the patient.
    assert PATIENT_NAME not in caplog.text
    assert "SECRETNAME" not in caplog.text


def _no_patient_name(response: httpx.Response) -> httpx.Response:
    assert "SECRETNAME" not in response.text
    return response


def test_worklist_in_priority_order_with_every_column(api: httpx.Client) -> None:
    r = _no_patient_name(api.get("/api/worklist", headers=AUTH))
    assert r.status_code == 200
    rows = r.json()["rows"]
    # Flagged first by `any` (0.95, 0.80), then by arrival, whatever the state.
    assert [row["series_instance_uid"] for row in rows] == PRIORITY
    top = rows[0]
    assert top["flagged"] is True and top["probabilities"]["any"] == pytest.approx(0.95)
    assert set(top["probabilities"]) == {"any", "epidural", "intraparenchymal",
                                         "intraventricular", "subarachnoid", "subdural"}
    assert top["patient_id"] == "P-C" and top["accession_number"] == "ACC-C"
    assert top["study_instance_uid"] == FLAGGED + ".0"
    assert top["study_description"] == "CT HEAD" and top["series_description"] == "Axial P-C"
    assert top["arrived_at"] and top["state"] == "done"
    assert top["sr_delivery"]["state"] == "failed"
    assert top["sr_delivery"]["last_error"] == "association rejected"
    assert top["time_to_result_seconds"] > 0 and top["inference_seconds"] == pytest.approx(3.0)
    by_uid = {row["series_instance_uid"]: row for row in rows}
    assert by_uid[PLAN[0].uid]["state"] == "failed" and by_uid[PLAN[0].uid]["probabilities"] is None
    assert by_uid[RECEIVING]["state"] == "receiving" and by_uid[RECEIVING]["flagged"] is None
    assert by_uid[PLAN[1].uid]["flagged"] is False and by_uid[PLAN[1].uid]["sr_delivery"] is None


def test_worklist_filters(api: httpx.Client) -> None:
    def uids(**params: object) -> list[str]:
        r = api.get("/api/worklist", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        return [row["series_instance_uid"] for row in r.json()["rows"]]

    assert uids(state="done") == [PLAN[i].uid for i in (2, 4, 1, 3)]
    assert uids(state=["failed", "receiving"]) == [PLAN[0].uid, PLAN[5].uid]
    assert uids(limit=3) == PRIORITY[:3]
    # Series whose last slice arrived at or after the fourth one's first.
    since = PLAN[3].arrived.isoformat()
    assert uids(since=since) == [PLAN[4].uid, PLAN[3].uid, PLAN[5].uid]
    assert uids(until=since) == [PLAN[2].uid, PLAN[0].uid, PLAN[1].uid]
    assert uids(hours=2) == PRIORITY and uids(hours=0.01) == []
    assert api.get("/api/worklist", params={"state": "bogus"}, headers=AUTH).status_code == 422
    assert api.get("/api/worklist", params={"since": "yesterday"},
                   headers=AUTH).status_code == 422


def test_series_detail(api: httpx.Client) -> None:
    r = _no_patient_name(api.get(f"/api/series/{FLAGGED}", headers=AUTH))
    assert r.status_code == 200
    d = r.json()
    assert d["series_instance_uid"] == FLAGGED and d["flagged"] is True
    assert [s["any"] for s in d["slices"]] == pytest.approx([0.2375, 0.475, 0.7125, 0.95])
    assert [s["position"] for s in d["slices"]] == [0.0, 5.0, 10.0, 15.0]
    assert d["key_slices"][0]["key"] is True
    assert d["key_slices"][0]["sop_instance_uid"] == FLAGGED + ".4"
    assert [k["index"] for k in d["key_slices"]] == [3, 2, 1]
    assert d["model"] == {"name": "test-model", "version": "1.2.3", "sha256": "ab" * 32}
    timings = d["timings"]
    assert timings["inference_started_at"] < timings["inference_done_at"]
    assert timings["inference_seconds"] == pytest.approx(3.0)
    assert d["key_image"]["method"] == "gradcam"
    assert [e["kind"] for e in d["audit"]] == ["instance_stored"] * 4 + ["series_viewed"]
    assert d["feedback_history"] == []
    assert api.get("/api/series/1.2.3.404", headers=AUTH).status_code == 404
    receiving = api.get(f"/api/series/{RECEIVING}", headers=AUTH).json()
    assert receiving["slices"] == [] and receiving["model"] is None
    assert receiving["key_image"] is None


def test_key_images(api: httpx.Client) -> None:
    plain = api.get(f"/api/series/{FLAGGED}/key.png", headers=AUTH)
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
    assert plain.content == png(1)
    heat = api.get(f"/api/series/{FLAGGED}/key.png", params={"overlay": "heatmap"},
                   headers=AUTH)
    assert heat.content == png(2, rgb=True)
    assert api.get(f"/api/series/{RECEIVING}/key.png", headers=AUTH).status_code == 404
    assert api.get(f"/api/series/{FLAGGED}/key.png", params={"overlay": "x"},
                   headers=AUTH).status_code == 422


def test_feedback_round_trip_into_training_labels(
    api: httpx.Client, populated: sessionmaker[Session]
) -> None:
    url = f"/api/series/{FLAGGED}/feedback"
    r = api.post(url, headers=AUTH, json={
        "ich": True, "subtypes": {"subdural": True, "epidural": False},
        "comment": "thin SDH left", "user": "dr_one"})
    assert r.status_code == 201, r.text
    assert r.json()["user"] == "dr_one" and r.json()["subtypes"]["subdural"] is True
    # Refuted on another series.
    r = api.post(f"/api/series/{PLAN[1].uid}/feedback", headers=AUTH,
                 json={"ich": False, "user": "dr_two"})
    assert r.status_code == 201, r.text

    row = next(x for x in api.get("/api/worklist", headers=AUTH).json()["rows"]
               if x["series_instance_uid"] == FLAGGED)
    assert row["feedback"]["ich"] is True and row["feedback"]["user"] == "dr_one"
    detail = api.get(f"/api/series/{FLAGGED}", headers=AUTH).json()
    audit = [e for e in detail["audit"] if e["kind"] == "feedback_recorded"]
    assert len(audit) == 1 and audit[0]["actor"] == "dr_one" and audit[0]["outcome"] == "ich"
    assert audit[0]["detail"] == "subtypes: subdural" and audit[0]["peer"] == "127.0.0.1"
    assert detail["feedback_history"][0]["comment"] == "thin SDH left"

    labels = {x.series_instance_uid: x for x in store.worklist.feedback_labels(populated)}
    assert set(labels) == {FLAGGED, PLAN[1].uid}
    sdh = labels[FLAGGED]
    assert sdh.labels == {"any": 1, "epidural": 0, "intraparenchymal": 0,
                          "intraventricular": 0, "subarachnoid": 0, "subdural": 1}
    assert sdh.user == "dr_one" and sdh.patient_id == "P-C"
    assert [uid for uid, _ in sdh.slices] == [f"{FLAGGED}.{k}" for k in (1, 2, 3, 4)]
    assert sdh.slices[0][1] == f"spool/{FLAGGED}/1.dcm"
    assert labels[PLAN[1].uid].labels == dict.fromkeys(sdh.labels, 0)

    # A later verdict replaces the label; the history keeps both.
    assert api.post(url, headers=AUTH, json={"ich": False, "user": "dr_three"}
                    ).status_code == 201
    relabelled = {x.series_instance_uid: x for x in store.worklist.feedback_labels(populated)}
    assert relabelled[FLAGGED].labels["any"] == 0 and relabelled[FLAGGED].user == "dr_three"
    assert len(store.list_feedback(populated, FLAGGED)) == 2


def test_feedback_refused(api: httpx.Client, populated: sessionmaker[Session]) -> None:
    url = f"/api/series/{FLAGGED}/feedback"
    # A subtype confirmed while ICH is refuted; an unknown subtype; no user with the token.
    for body in ({"ich": False, "subtypes": {"subdural": True}, "user": "x"},
                 {"ich": True, "subtypes": {"bogus": True}, "user": "x"},
                 {"ich": True},
                 {"ich": "maybe", "user": "x"}):
        r = api.post(url, headers=AUTH, json=body)
        assert r.status_code == 422, (body, r.text)
    assert api.post("/api/series/1.2.3.404/feedback", headers=AUTH,
                    json={"ich": True, "user": "x"}).status_code == 404
    assert api.post(url, json={"ich": True, "user": "x"}).status_code == 401
    assert store.list_feedback(populated, FLAGGED) == []


def test_auth_refusal(api: httpx.Client) -> None:
    for path in ("/api/worklist", f"/api/series/{FLAGGED}", f"/api/series/{FLAGGED}/key.png",
                 "/api/session", "/metrics"):
        r = api.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "P-C" not in r.text
        assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.get(path, headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401
    # The page and the health check carry no patient data: open.
    assert api.get("/").status_code == 200 and "worklist" in api.get("/").text
    assert api.get("/static/worklist.js").status_code == 200
    assert api.get("/healthz").status_code in (200, 503)
    assert api.get("/api/session", headers=AUTH).json()["method"] == "token"


def test_basic_auth_users(tmp_path: Path, database_url: str,
                          populated: sessionmaker[Session]) -> None:
    digest = hashlib.sha256(b"pass word").hexdigest()
    config = make_config(tmp_path, database_url,
                         users=[{"name": "dr_basic", "password_sha256": digest}])
    good = "Basic " + base64.b64encode(b"dr_basic:pass word").decode()
    bad = "Basic " + base64.b64encode(b"dr_basic:nope").decode()
    with live_server(config) as base, httpx.Client(base_url=base) as client:
        r = client.get("/api/worklist")
        assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
        page = client.get("/api/worklist", headers={"X-Requested-With": "triage-node"})
        assert "Basic" not in page.headers["www-authenticate"]  # no browser dialog
        assert client.get("/api/worklist", headers={"Authorization": bad}).status_code == 401
        assert client.get("/api/session", headers={"Authorization": good}).json() == {
            "method": "basic", "user": "dr_basic", "labels": list(store.worklist.LABELS),
            "subtypes": list(store.worklist.SUBTYPES)}
        # The signed-in user is recorded, whatever the body says.
        r = client.post(f"/api/series/{FLAGGED}/feedback", headers={"Authorization": good},
                        json={"ich": True, "user": "someone else"})
        assert r.status_code == 201 and r.json()["user"] == "dr_basic"
    assert store.list_feedback(populated, FLAGGED)[0].user == "dr_basic"


def test_refuses_to_start_without_credentials_beyond_loopback(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    create_app(config)  # loopback, no credentials: fine
    for api in (dataclasses.replace(config.api, host="0.0.0.0"),
                dataclasses.replace(config.api, auth="required")):
        with pytest.raises(ConfigError, match="no credentials"):
            create_app(dataclasses.replace(config, api=api))
    beyond = dataclasses.replace(config.api, host="0.0.0.0", users=(ApiUser("a", "0" * 64),))
    create_app(dataclasses.replace(config, api=beyond))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "triage_node.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def test_cli_api_refuses_and_serves(tmp_path: Path, database_url: str,
                                    populated: sessionmaker[Session]) -> None:
    path = tmp_path / "c.toml"
    port = free_port()
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n[database]\nurl = "{database_url}"\n'
                    f'[api]\nhost = "0.0.0.0"\nport = {port}\n')
    refused = _cli("api", "--config", str(path))
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "no credentials" in out, out

    proc = _cli("api", "--config", str(path), "--api-host", "127.0.0.1",
                env={"TRIAGE_NODE_API_TOKEN": TOKEN})
    try:
        wait_port(port, None, timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/api/worklist").status_code == 401
            rows = client.get("/api/worklist", headers=AUTH).json()["rows"]
            assert [r["series_instance_uid"] for r in rows] == PRIORITY
            client.get(f"/api/series/{FLAGGED}", headers=AUTH)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "GET /api/worklist" in out  # the access log...
    assert TOKEN not in out and "SECRETNAME" not in out  # ...without secrets or names


def _healthz(client: httpx.Client) -> tuple[int, dict[str, dict[str, object]]]:
    r = client.get("/healthz")
    return r.status_code, r.json()["checks"]


def test_healthz(tmp_path: Path, config: Config, populated: sessionmaker[Session]) -> None:
    with live_server(config) as base, httpx.Client(base_url=base, timeout=10) as client:
        status, checks = _healthz(client)
        assert status == 503 and checks["database"]["ok"] is True
        assert checks["broker"]["ok"] is False and checks["worker"]["ok"] is False
        # The embedded broker's file appears and a worker starts beating.
        config.data_dir.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(config.data_dir / "queue.db").close()
        stop = threading.Event()
        beat = threading.Thread(target=store.worklist.run_heartbeat,
                                args=(populated, stop), kwargs={"name": "w1"})
        beat.start()
        try:
            for _ in range(200):
                if store.heartbeats(populated):
                    break
                stop.wait(0.05)
            status, checks = _healthz(client)
            assert status == 200, checks
            assert checks["worker"]["alive"] == ["w1"]
        finally:
            stop.set()
            beat.join(10)
        assert store.heartbeats(populated) == []  # a clean stop removes the row
        assert _healthz(client)[0] == 503


def test_healthz_redis_broker(tmp_path: Path, config: Config) -> None:
    for url, ok in (("redis://127.0.0.1:6379/0", True), (f"redis://127.0.0.1:{free_port()}/0",
                                                          False)):
        cfg = dataclasses.replace(config, queue=dataclasses.replace(config.queue,
                                                                    broker_url=url))
        with live_server(cfg) as base, httpx.Client(base_url=base, timeout=10) as client:
            broker = _healthz(client)[1]["broker"]
        assert broker["ok"] is ok and broker["kind"] == "redis", broker


def _metrics(client: httpx.Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics(config: Config, populated: sessionmaker[Session]) -> None:
    redis_url = "redis://127.0.0.1:6379/14"
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete("celery")
    client.lpush("celery", "a", "b", "c")
    cfg = dataclasses.replace(config, queue=dataclasses.replace(config.queue,
                                                                broker_url=redis_url))
    try:
        with live_server(cfg) as base, httpx.Client(base_url=base, timeout=10) as http:
            m = _metrics(http)
    finally:
        client.delete("celery")
        client.close()
    assert m["triage_node_database_up"][()] == 1
    assert m["triage_node_instances_received_total"][()] == 24
    assert m["triage_node_series"][(("state", "done"),)] == 4
    assert m["triage_node_series"][(("state", "failed"),)] == 1
    assert m["triage_node_series"][(("state", "receiving"),)] == 1
    assert m["triage_node_series_flagged"][()] == 2
    assert m["triage_node_queue_depth"][()] == 3
    assert m["triage_node_inference_seconds_count"][()] == 4
    assert m["triage_node_inference_seconds_bucket"][(("le", "2.0"),)] == 0
    assert m["triage_node_inference_seconds_bucket"][(("le", "5.0"),)] == 4
    assert m["triage_node_inference_seconds_sum"][()] == pytest.approx(12.0)
    assert m["triage_node_time_to_result_seconds_count"][()] == 4
    assert m["triage_node_sr_delivery_failures_total"][()] == 1
    assert m["triage_node_sr_deliveries"][(("state", "failed"),)] == 1
    assert m["triage_node_workers_alive"][()] == 0


def test_metrics_embedded_queue_depth(config: Config) -> None:
    """The embedded transport's waiting messages are counted from its SQLite file."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(config.data_dir / "queue.db") as conn:
        conn.executescript(
            "CREATE TABLE kombu_queue (id INTEGER PRIMARY KEY, name VARCHAR(200));"
            "CREATE TABLE kombu_message (id INTEGER PRIMARY KEY, visible BOOLEAN,"
            " queue_id INTEGER, payload TEXT);"
            "INSERT INTO kombu_queue VALUES (1, 'celery'), (2, 'other');"
            "INSERT INTO kombu_message VALUES (1, 1, 1, 'x'), (2, 0, 1, 'y'), (3, 1, 2, 'z');")
    conn.close()
    with live_server(config) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert _metrics(http)["triage_node_queue_depth"][()] == 1


def test_database_down_is_503(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1"
    config = make_config(tmp_path, url, token=TOKEN)
    with live_server(config) as base, httpx.Client(base_url=base, timeout=20) as client:
        r = client.get("/api/worklist", headers=AUTH)
        assert r.status_code == 503 and r.json() == {"detail": "database unavailable"}
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["checks"]["database"]["ok"] is False
        assert _metrics(client)["triage_node_database_up"][()] == 0


def test_serving_never_imports_torch(tmp_path: Path, sqlite_url: str) -> None:
    """Building the app and answering every route leaves torch and monai unimported."""
    store.upgrade(sqlite_url)
    code = f"""
import sys
from fastapi.testclient import TestClient
from triage_node.api import create_app
from triage_node.config import build_config
config = build_config({{"data_dir": {str(tmp_path)!r}, "database": {{"url": {sqlite_url!r}}},
                       "api": {{"token": "t"}}}}, env={{}})
client = TestClient(create_app(config))
auth = {{"Authorization": "Bearer t"}}
for path in ("/", "/api/worklist", "/api/series/1.2.3", "/healthz", "/metrics"):
    client.get(path, headers=auth)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_views_are_audited(api: httpx.Client, populated: sessionmaker[Session]) -> None:
    """Opening a series is an audit event every time; the polled worklist once per user
    and host per WORKLIST_AUDIT_SECONDS."""
    from triage_node.domain import EventKind

    for _ in range(3):
        assert api.get("/api/worklist", headers=AUTH).status_code == 200
    assert api.get(f"/api/series/{FLAGGED}", headers=AUTH).status_code == 200
    listed = store.list_events(populated, kinds=[EventKind.WORKLIST_VIEWED])
    assert len(listed) == 1 and listed[0].peer == "127.0.0.1"
    [opened] = store.list_events(populated, kinds=[EventKind.SERIES_VIEWED])
    assert opened.series_instance_uid == FLAGGED and opened.actor == "(token)"
