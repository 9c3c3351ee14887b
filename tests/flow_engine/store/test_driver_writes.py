"""A run's claim and end on SQLite go straight to the driver (store/engines.py DriverWrites)
and the WAL is checkpointed in the background (Checkpoints): what they write, how they
wait and fail, and that the checkpoints do run — outside the commit, and under gevent in an
operating-system thread."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from support.waiting import wait_until

from flow_engine.errors import RunNotFound
from flow_engine.store import RunRecord, SqlFlowStore, StoreError
from flow_engine.store.engines import WAL_AUTOCHECKPOINT, Checkpoints
from flow_engine.store.schema import FINISH_RUN, INSERT_RUN, runs

LONE = "\ud800"  # half a UTF-16 pair: the driver cannot encode it, the store scrubs it
BERLIN = timezone(timedelta(hours=2))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "flows.db"


@pytest.fixture
def lite(db_path: Path) -> Iterator[SqlFlowStore]:
    """A migrated store on a SQLite file (these tests are about SQLite's write path)."""
    store = SqlFlowStore(f"sqlite:///{db_path}")
    store.migrate()
    yield store
    store.close()


def run(run_id: str, key: str | None = None, **fields: Any) -> RunRecord:
    values: dict[str, Any] = {"flow_id": "rag", "version": 2, "status": "running",
                              "created_at": datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)}
    values.update(fields)
    return RunRecord(run_id=run_id, idempotency_key=key, **values)


# every column in use, with values a conversion could get wrong: zones, unicode, lone
# surrogates in text and in JSON, nested JSON, and every nullable column left empty
ODD = {
    "full": dict(session_id="sé-" + LONE, trace_id="t" * 32, request_hash="h" * 64,
                 created_at=datetime(2025, 6, 1, 12, 0, 0, 5, tzinfo=BERLIN),
                 finished_at=datetime(2025, 6, 1, 12, 0, 1, tzinfo=BERLIN), duration_ms=12.25,
                 result={"output": "ünïcode ✓ 日本 " + LONE, "n": [1, 2.5, None, True],
                         "nested": {"empty": {}, "quote": "\"'"}},
                 error={"code": "llm_error", "message": "x" * 500},
                 heartbeat_at=datetime(2025, 6, 1, 10, 0, tzinfo=UTC), tenant="acme ✓",
                 status="succeeded"),
    "sparse": dict(),  # every nullable column None
    "naive": dict(created_at=datetime(2025, 1, 2, 3, 4, 5)),  # stored by us: UTC
}


def raw_rows(path: Path) -> dict[str, tuple]:
    """Each run's stored values and their SQLite storage classes, keyed by run id, with the
    run id and idempotency key left out (the two writes being compared differ in those)."""
    with sqlite3.connect(path) as conn:
        names = [c[1] for c in conn.execute("PRAGMA table_info(runs)")
                 if c[1] not in ("run_id", "idempotency_key")]
        columns = ", ".join(f"{n}, typeof({n})" for n in names)
        return {row[0]: row[1:] for row in conn.execute(f"SELECT run_id, {columns} FROM runs")}


def by_sqlalchemy(store: SqlFlowStore, statement: Any, values: list[dict[str, Any]]) -> None:
    with store.engine.begin() as conn:
        conn.execute(statement, values)


def values_of(record: RunRecord) -> dict[str, Any]:
    return {c.name: getattr(record, c.name) for c in runs.c}


# -- what is written -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ODD))
def test_run_records_are_stored_as_sqlalchemy_stores_them_byte_for_byte(lite, db_path, case):
    fields = ODD[case]
    lite.insert_run(run("one", "k-one", **fields))
    assert lite.claim_runs([run("claimed", "k-claimed", **fields)]) == {"claimed"}
    lite.record_run_ends([run("ended", **fields)], [])
    by_sqlalchemy(lite, INSERT_RUN, [values_of(run("reference", "k-ref", **fields))])
    rows = raw_rows(db_path)
    assert rows["one"] == rows["claimed"] == rows["ended"] == rows["reference"]


def test_a_runs_end_is_stored_as_sqlalchemy_stores_it_byte_for_byte(lite, db_path):
    for run_id in ("alone", "batched", "reference"):
        lite.insert_run(run(run_id, f"k-{run_id}"))
    end = {"status": "failed", "duration_ms": 3.5, "result": {"partial": "日本 " + LONE},
           "error": {"code": "timeout", "detail": None}}
    lite.finish_run("alone", **end)
    lite.record_run_ends([], [{"run_id": "batched", **end}])
    at = lite.get_run("alone").finished_at  # finish_run stamps its own time: use it
    by_sqlalchemy(lite, FINISH_RUN, [{"key_run_id": "reference", **end, "finished_at": at}])
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE runs SET finished_at = ? WHERE run_id = 'batched'",
                     conn.execute("SELECT finished_at FROM runs WHERE run_id = 'alone'").fetchone())
    rows = raw_rows(db_path)
    assert rows["alone"] == rows["batched"] == rows["reference"]


@pytest.mark.parametrize("case", list(ODD))
def test_run_records_read_back_as_written(store, case):
    """On both backends: tz-aware UTC datetimes (the same instants), JSON round-tripped,
    None kept, a lone surrogate in a text column scrubbed to U+FFFD (in JSON kept)."""
    fields = ODD[case]
    store.insert_run(run("one", "k-one", **fields))
    store.claim_runs([run("claimed", "k-claimed", **fields)])
    store.record_run_ends([run("ended", **fields)], [])
    expected = run("x", **fields)
    for run_id, key in (("one", "k-one"), ("claimed", "k-claimed"), ("ended", None)):
        got = store.get_run(run_id)
        for name in ("created_at", "finished_at", "heartbeat_at"):
            value, written = getattr(got, name), getattr(expected, name)
            if written is None:
                assert value is None
                continue
            assert value == (written if written.tzinfo else written.replace(tzinfo=UTC))
            assert value.utcoffset() == timedelta(0), f"{name} {value!r} is not aware UTC"
        assert (got.result, got.error, got.duration_ms, got.tenant) == (
            expected.result, expected.error, expected.duration_ms, expected.tenant)
        assert got.session_id == (None if expected.session_id is None
                                  else expected.session_id.replace(LONE, "\ufffd"))
        assert (got.run_id, got.idempotency_key, got.flow_id, got.version) == (run_id, key, "rag", 2)


def test_a_batch_with_a_taken_run_id_writes_nothing_and_the_next_write_goes_through(store):
    store.insert_run(run("taken", "k-taken"))
    with pytest.raises(IntegrityError):
        store.record_run_ends([run("new"), run("taken")],
                              [{"run_id": "taken", "status": "succeeded", "duration_ms": 1.0,
                                "result": None, "error": None}])
    with pytest.raises(RunNotFound):
        store.get_run("new")
    assert store.get_run("taken").status == "running"
    store.record_run_ends([run("new")], [])
    assert store.get_run("new").status == "running"


# -- the write lock --------------------------------------------------------------------------


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another connection (as another process would) holding the write lock until rollback."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.parametrize("write", [
    pytest.param(lambda s: s.insert_run(run("r", "k")), id="insert_run"),
    pytest.param(lambda s: s.claim_runs([run("r", "k")]), id="claim_runs"),
    pytest.param(lambda s: s.record_run_ends([run("r")], []), id="record_run_ends"),
])
def test_a_write_waits_for_the_lock_another_connection_holds(lite, db_path, write):
    holder = hold_write_lock(db_path)
    done = threading.Event()
    errors: list[BaseException] = []

    def writing() -> None:
        try:
            write(lite)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=writing)
    thread.start()
    try:
        assert not done.wait(0.3), f"wrote (or failed: {errors}) while the lock was held"
    finally:
        holder.rollback()
        holder.close()
    thread.join(30)
    assert errors == []
    assert lite.get_run("r").run_id == "r"


def test_a_write_whose_lock_never_comes_is_a_store_error_and_leaves_nothing_behind(db_path):
    on_error: list[str] = []
    store = SqlFlowStore(f"sqlite:///{db_path}", on_error=on_error.append, lock_timeout_s=0.2)
    try:
        store.migrate()
        store.insert_run(run("r1", "k1"))
        holder = hold_write_lock(db_path)
        try:
            for write in (lambda: store.insert_run(run("r2", "k2")),
                          lambda: store.finish_run("r1", status="succeeded", duration_ms=1.0,
                                                   result=None, error=None)):
                with pytest.raises(StoreError) as info:
                    write()
                assert isinstance(info.value.__cause__, OperationalError)  # "unavailable"
                assert "locked" in str(info.value.__cause__.orig)
        finally:
            holder.rollback()
            holder.close()
        assert on_error == ["write", "write"]
        store.finish_run("r1", status="succeeded", duration_ms=1.0, result=None, error=None)
        assert store.insert_run(run("r2", "k2")) is None
        assert [store.get_run(r).status for r in ("r1", "r2")] == ["succeeded", "running"]
    finally:
        store.close()


def test_a_connection_that_died_mid_write_is_replaced(lite):
    with pytest.raises(sa.exc.DBAPIError) as info, lite._driver.transaction(1.0) as tx:
        tx._conn.close()  # what a closed database looks like to the driver
        tx.execute(INSERT_RUN, values_of(run("lost")))
    assert info.value.connection_invalidated
    for n in range(8):  # more than the pool holds: none of them is the dead one
        assert lite.insert_run(run(f"r{n}", f"k{n}")) is None


# -- checkpoints -----------------------------------------------------------------------------


def runs_in_database_file(path: Path, tmp_path: Path) -> int:
    """Runs in the database file itself, the WAL left out: what checkpoints copied there."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(path, copy)
    try:
        with sqlite3.connect(copy) as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.DatabaseError:  # copied mid-checkpoint
        return -1
    finally:
        copy.unlink()


def test_commits_leave_checkpoints_to_the_background_and_it_runs_them(lite, db_path, tmp_path):
    with lite.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == WAL_AUTOCHECKPOINT
    with sqlite3.connect(db_path) as conn:  # the schema into the file: a copy can be read
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    lite._checkpoints = Checkpoints(str(db_path), every=1000)
    for n in range(5):
        lite.insert_run(run(f"r{n}", f"k{n}"))
    assert runs_in_database_file(db_path, tmp_path) == 0, "the commits checkpointed"
    lite._checkpoints = Checkpoints(str(db_path), every=5)
    for n in range(5, 10):
        lite.insert_run(run(f"r{n}", f"k{n}"))
    wait_until(lambda: runs_in_database_file(db_path, tmp_path) == 10,
               "the background checkpoint to copy the runs into the database file")


def test_every_write_transaction_counts_towards_a_checkpoint_and_reads_do_not(lite, db_path):
    lite._checkpoints = counting = Checkpoints(str(db_path), every=1000)
    lite.insert_run(run("r1", "k1"))  # the driver's
    lite.finish_run("r1", status="succeeded", duration_ms=1.0, result=None, error=None)
    lite.create_flow("rag", "rag flow", "", {"nodes": []})  # SQLAlchemy's
    lite.heartbeat(["r1"])
    with lite.engine.connect() as conn:  # the knowledge store's (its own transactions)
        write = conn.execution_options(flowgate_write=True)
        with write.begin():
            write.exec_driver_sql("CREATE TABLE other (x)")
    for _ in range(3):
        lite.get_run("r1"), lite.get_flow("rag"), lite.list_runs(tenant=None, flow_id=None, limit=5)
    assert counting._commits == 5


def test_a_failed_checkpoint_is_told_and_costs_the_writes_nothing(lite, tmp_path, caplog):
    lite._checkpoints = failing = Checkpoints(str(tmp_path / "no" / "such.db"), every=1)
    lite.insert_run(run("r1", "k1"))
    wait_until(lambda: failing.failure is not None, "the checkpoint to fail")
    with caplog.at_level(logging.WARNING, logger="flow_engine.store.engines"):
        lite.insert_run(run("r2", "k2"))
    assert "sqlite checkpoint failed" in caplog.text
    assert [lite.get_run(r).run_id for r in ("r1", "r2")] == ["r1", "r2"]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:",
                                 "sqlite:///file:x?mode=memory&cache=shared&uri=true"])
def test_an_in_memory_database_has_no_checkpoints(url):
    assert Checkpoints.for_engine(sa.create_engine(url, poolclass=sa.pool.NullPool)) is None


def test_checkpoints_open_the_file_the_engine_opens(db_path):
    plain = Checkpoints.for_engine(sa.create_engine(f"sqlite:///{db_path}"))
    assert (plain.path, plain.uri) == (str(db_path), False)
    uri = Checkpoints.for_engine(sa.create_engine(f"sqlite:///file:{db_path}?uri=true&cache=private"))
    assert (uri.path, uri.uri) == (f"file:{db_path}?cache=private", True)


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, shutil, sqlite3, sys, threading
    from datetime import UTC, datetime
    import gevent
    from flow_engine.store import RunRecord, SqlFlowStore
    from flow_engine.store.engines import Checkpoints

    real_event = monkey.get_original("threading", "Event")
    started, release = real_event(), real_event()
    threads = []
    checkpoint = Checkpoints.checkpoint

    def held(self):  # blocks its thread, as a checkpoint's fsyncs do, until released
        threads.append(threading.get_native_id())
        started.set()
        release.wait(20)
        checkpoint(self)

    Checkpoints.checkpoint = held
    store = SqlFlowStore("sqlite:///" + sys.argv[1])
    store.migrate()
    store._checkpoints = Checkpoints(sys.argv[1], every=3)

    def write(n):
        store.insert_run(RunRecord(run_id=f"r{n}", flow_id="f", version=1, status="running",
                                   created_at=datetime.now(UTC), idempotency_key=f"k{n}"))

    for n in range(3):  # the third starts a checkpoint
        write(n)
    for _ in range(1000):
        if started.is_set():
            break
        gevent.sleep(0.01)
    for n in range(3, 8):  # the worker goes on while the checkpoint is blocked
        write(n)
    written_while_held = not release.is_set() and len(threads) == 1
    release.set()
    for _ in range(2000):  # bounded: the subprocess's timeout is the backstop
        if not store._checkpoints._running:
            break
        gevent.sleep(0.01)
    shutil.copyfile(sys.argv[1], sys.argv[1] + ".copy")  # the file without its WAL
    in_file = sqlite3.connect(sys.argv[1] + ".copy").execute("SELECT count(*) FROM runs")
    print(json.dumps({"threads": threads, "main": threading.get_native_id(),
                      "written_while_held": written_while_held,
                      "checkpoint_error": repr(store._checkpoints.failure),
                      "runs_in_file": in_file.fetchone()[0]}))
    """
)


def test_under_gevent_a_checkpoint_runs_in_an_os_thread_and_the_worker_goes_on(db_path):
    done = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, str(db_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["written_while_held"]
    assert report["threads"] and report["threads"][0] != report["main"]
    assert report["checkpoint_error"] == "None"
    assert report["runs_in_file"] >= 3  # those written before it started, at least


def test_a_checkpoint_after_the_file_was_deleted_creates_no_empty_database(tmp_path):
    gone = tmp_path / "gone.db"
    sqlite3.connect(gone).close()
    checkpoints = Checkpoints(str(gone))
    gone.unlink()
    checkpoints.checkpoint()
    assert not gone.exists()
    assert checkpoints.failure is not None  # told at the next start, like any failure


def test_a_value_its_column_cannot_take_is_a_store_error_and_writes_nothing(lite):
    """A conversion that fails on the driver path (a result JSON cannot hold) is said as
    SQLAlchemy says it: a StoreError at the boundary, counted, not a bare TypeError."""
    errors: list[str] = []
    lite._on_error = errors.append
    with pytest.raises(StoreError):
        lite.record_run_ends([run("r1", result={"output": object()})], [])
    assert errors == ["write"]
    with pytest.raises(RunNotFound):
        lite.get_run("r1")
