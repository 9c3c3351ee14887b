"""Run records when the store falters: an end of run the store refused is written again in
the background (and answered from memory meanwhile), and runs that no process will finish
are marked failed by the maintenance job when an engine starts — no record says
``running`` for ever.

SQLite, so that the test can hold the database's write lock from another connection (as a
long migration or another process's stuck transaction would) and let it go again."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.waiting import wait_until

from flow_engine.errors import RunNotFound
from flow_engine.runs.request import RunRequest
from flow_engine.store.base import RunRecord

WAIT_S = 10.0


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'engine.db'}"


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock until it rolls back."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def get_run_or_none(store: Any, run_id: str) -> RunRecord | None:
    try:
        return store.get_run(run_id)
    except RunNotFound:
        return None


def sample(app: Any, name: str, **labels: str) -> float:
    return app.extensions["flowgate"].metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("key", [pytest.param(None, id="plain"),
                                 pytest.param("end-1", id="keyed")])
def test_an_end_the_store_refused_is_recorded_in_the_background(make_app, auth, defs, caller,
                                                                 tmp_path, key):
    app = make_app(record_retry_s=30)
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201
    runs, store = app.extensions["flowgate"].runs, app.extensions["flowgate"].store
    prepared = runs.prepare("f", RunRequest.from_body({"input_value": "hi"}), caller=caller,
                            idempotency_key=key, trace_id=None)  # a keyed record is inserted
    store.lock_timeout_s = 0.2  # a write waits this long for the lock, then fails (503)
    holder = hold_write_lock(tmp_path / "engine.db")
    try:
        result, _ = runs.run(prepared)
        runs.executor.flush()  # the writer tried: its end cannot be written now
        meanwhile = client.get(f"/api/v1/runs/{prepared.run_id}", headers=auth).get_json()
        assert (meanwhile["status"], meanwhile["output"]) == ("succeeded", result["output"])
    finally:
        holder.rollback()
        holder.close()

    record = wait_until(lambda: (r := get_run_or_none(store, prepared.run_id)) is not None
                        and r.status != "running" and r, "the end of the run to be recorded")
    assert (record.status, record.result["output"]) == ("succeeded", result["output"])
    assert sample(app, "flowgate_engine_run_record_retries_total", outcome="recorded") == 1


@pytest.mark.parametrize("stopping", [pytest.param(False, id="retries-run-out"),
                                      pytest.param(True, id="engine-stops")])
def test_a_plain_run_whose_end_is_never_recorded_leaves_its_record_in_the_log(
        make_app, auth, defs, caller, tmp_path, caplog, stopping):
    """A plain run reaches the store only at its end: when the store refuses that write for
    longer than record_retry_s — or the engine stops while it retries — the error line says
    so and carries the record."""
    app = make_app(record_retry_s=60 if stopping else 0.5)
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201
    runs, store = app.extensions["flowgate"].runs, app.extensions["flowgate"].store
    prepared = runs.prepare("f", RunRequest.from_body({"input_value": "hi"}), caller=caller,
                            idempotency_key=None, trace_id=None)
    store.lock_timeout_s = 0.2
    holder = hold_write_lock(tmp_path / "engine.db")
    try:
        runs.run(prepared)
        if stopping:
            runs.executor.flush()  # the writer tried: the end waits for a retry
            assert runs.executor.unrecorded(prepared.run_id) is not None
            runs.executor.close()  # returns once the retry has logged what it gave up
            assert sample(app, "flowgate_engine_run_record_retries_total",
                          outcome="given_up") == 1
        wait_until(lambda: sample(app, "flowgate_engine_run_record_retries_total",
                                  outcome="given_up") == 1, "the background writer to give up")
    finally:
        holder.rollback()
        holder.close()

    assert get_run_or_none(store, prepared.run_id) is None
    lines = [r for r in caplog.records if getattr(r, "run_id", None) == prepared.run_id
             and r.levelname == "ERROR"]
    assert len(lines) == 1 and "the store never got it" in lines[0].getMessage()
    assert ("as the engine stopped" in lines[0].getMessage()) == stopping
    line = lines[0]
    assert (line.flow_id, line.version, line.run_status) == ("f", 1, "succeeded")
    assert line.tenant == caller.tenant and line.duration_ms > 0


ORPHAN = "0fa1" * 8  # a run id as the engine makes them (32 hex digits)


def test_an_engine_starting_marks_runs_nobody_owns_failed(make_app, auth):
    first = make_app()  # a process that died with a keyed run in progress
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    first.extensions["flowgate"].store.insert_run(RunRecord(
        run_id=ORPHAN, flow_id="f", version=1, status="running", created_at=long_ago,
        idempotency_key="x:orphan", request_hash="h" * 64, heartbeat_at=long_ago,
        tenant=None))

    app = make_app(maintenance_interval_s=300)  # the next engine to start
    client = app.test_client()

    record = wait_until(lambda: (r := client.get(f"/api/v1/runs/{ORPHAN}", headers=auth)
                                 .get_json())["status"] != "running" and r, "the reaper")
    assert (record["status"], record["error"]["code"]) == ("failed", "run_abandoned")
    events = client.get(f"/api/v1/runs/{ORPHAN}/events", headers=auth)
    assert events.status_code == 200
    assert b"event: error" in events.get_data() and b"run_abandoned" in events.get_data()
    assert sample(app, "flowgate_engine_runs_reaped_total") == 1
