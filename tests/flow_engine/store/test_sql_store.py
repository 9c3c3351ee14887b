"""SqlFlowStore against real SQLite and PostgreSQL: the same tests on both backends."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from support.procs import free_port

from flow_engine.errors import Conflict, FlowNotFound, NotFound, RunNotFound
from flow_engine.store import ChatMessage, FlowRecord, RunRecord, SqlFlowStore, StoreError
from flow_engine.store.sql import MIGRATIONS, schema_version

DEFINITION = {"id": "rag", "nodes": [{"id": "in", "type": "ChatInput"}], "edges": []}


def make_flow(store: SqlFlowStore, versions: int = 1, flow_id: str = "rag") -> FlowRecord:
    """A flow with ``versions`` versions (definition ``{"v": n}`` for n > 1); version 1 live."""
    store.create_flow(flow_id, f"{flow_id} flow", "answers questions", DEFINITION)
    for n in range(2, versions + 1):
        store.add_version(flow_id, {"v": n}, f"{flow_id} flow", "answers questions")
    return store.get_flow(flow_id)


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Start every call at the same moment, one thread each; each call's result or exception."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0), f"{value!r} is not timezone-aware UTC"


def schema_rows(store: SqlFlowStore) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(schema_version.c.version).order_by("version")).scalars())


# -- migrate ---------------------------------------------------------------------------------


def test_migrate_twice_keeps_the_version_and_records_each_migration_once(store):
    assert store.migrate() == len(MIGRATIONS)
    assert store.migrate() == len(MIGRATIONS)
    assert schema_rows(store) == list(range(1, len(MIGRATIONS) + 1))
    make_flow(store)  # the schema works after re-migrating


def test_concurrent_migrate_from_four_stores_on_one_database_all_succeed(open_store):
    stores = [open_store() for _ in range(4)]
    outcomes = run_concurrently([s.migrate for s in stores])
    assert outcomes == [len(MIGRATIONS)] * 4
    assert schema_rows(stores[0]) == list(range(1, len(MIGRATIONS) + 1))
    make_flow(stores[1])
    assert stores[2].get_flow("rag").live_version == 1


# -- create and get flows --------------------------------------------------------------------


def test_create_flow_makes_version_1_live(store):
    flow = store.create_flow("rag", "RAG bot", "answers questions", DEFINITION)
    assert (flow.id, flow.name, flow.description) == ("rag", "RAG bot", "answers questions")
    assert (flow.latest_version, flow.live_version, flow.live_history) == (1, 1, ())
    assert flow.routing is None
    assert_utc(flow.created_at)
    assert_utc(flow.updated_at)
    assert store.get_version("rag", 1).definition == DEFINITION
    assert [f.id for f in store.list_flows()] == ["rag"]


@pytest.mark.parametrize(("flow_id", "name", "message_names"), [
    pytest.param("rag", "another name", ["PUT /flows/rag"], id="duplicate-id"),
    pytest.param("other", "RAG bot", ["rag", "RAG bot"], id="duplicate-name"),
    pytest.param("rag", "RAG bot", ["PUT /flows/rag"], id="duplicate-both"),
])
def test_create_flow_with_a_taken_id_or_name_is_a_conflict(store, flow_id, name, message_names):
    original = store.create_flow("rag", "RAG bot", "", DEFINITION)
    with pytest.raises(Conflict) as info:
        store.create_flow(flow_id, name, "", {"other": True})
    assert info.value.status == 409
    for part in message_names:
        assert part in info.value.message
    assert store.get_flow("rag") == original
    assert store.get_version("rag", 1).definition == DEFINITION
    assert [f.id for f in store.list_flows()] == ["rag"]


@pytest.mark.parametrize("key", [pytest.param("rag", id="by-id"), pytest.param("RAG bot", id="by-name")])
def test_get_flow_by_id_or_name(store, key):
    created = store.create_flow("rag", "RAG bot", "", DEFINITION)
    assert store.get_flow(key) == created


@pytest.mark.parametrize("key", [pytest.param("nope", id="unknown"), pytest.param("RAG", id="wrong-case"),
                                 pytest.param("", id="empty")])
def test_get_flow_unknown_is_flow_not_found(store, key):
    store.create_flow("rag", "RAG bot", "", DEFINITION)
    with pytest.raises(FlowNotFound) as info:
        store.get_flow(key)
    assert info.value.status == 404


# -- versions --------------------------------------------------------------------------------


def test_add_version_increments_and_does_not_move_live(store):
    store.create_flow("rag", "RAG bot", "v1", DEFINITION)
    v2 = store.add_version("rag", {"v": 2}, "RAG bot", "v2")
    v3 = store.add_version("rag", {"v": 3}, "RAG bot 3", "v3")
    assert (v2.version, v3.version) == (2, 3)
    assert v3.definition == {"v": 3}
    assert_utc(v3.created_at)
    flow = store.get_flow("rag")
    assert (flow.latest_version, flow.live_version, flow.live_history) == (3, 1, ())
    assert (flow.name, flow.description) == ("RAG bot 3", "v3")
    listed = store.list_versions("rag")
    assert [(v.version, v.definition) for v in listed] == [(1, DEFINITION), (2, {"v": 2}), (3, {"v": 3})]


def test_add_version_to_unknown_flow_or_with_another_flows_name_fails(store):
    make_flow(store, flow_id="a")
    make_flow(store, flow_id="b")
    with pytest.raises(FlowNotFound):
        store.add_version("nope", {}, "nope", "")
    with pytest.raises(Conflict):
        store.add_version("a", {"v": 2}, "b flow", "")
    assert store.get_flow("a").latest_version == 1
    assert [v.version for v in store.list_versions("a")] == [1]


@pytest.mark.parametrize(("flow_id", "version"), [
    pytest.param("rag", 3, id="past-latest"),
    pytest.param("rag", 0, id="zero"),
    pytest.param("rag", -1, id="negative"),
    pytest.param("nope", 1, id="unknown-flow"),
])
def test_get_version_missing_is_not_found(store, flow_id, version):
    make_flow(store, versions=2)
    with pytest.raises(NotFound) as info:
        store.get_version(flow_id, version)
    assert info.value.status == 404


def test_list_versions_of_unknown_flow_is_flow_not_found(store):
    with pytest.raises(FlowNotFound):
        store.list_versions("nope")


@pytest.mark.parametrize("definition", [
    pytest.param({"a": {"b": [1, {"c": [None, True, False, [], {}]}]}, "z": "last", "m": 0}, id="nested"),
    pytest.param({"text": "héllo wörld – 日本語 – emoji 🚀👩‍👩‍👧 – e\u0301", "ключ": "значение"},
                 id="unicode"),
    pytest.param({"escapes": "quote \" backslash \\ tab \t newline \n nul \u0000 bell \u0007"},
                 id="control-chars"),
    pytest.param({"floats": [0.1, 0.30000000000000004, 1e-300, 5e-324, 1.7976931348623157e308,
                             -0.0, 123456789.12345679, 2.5, -1.5e-7]}, id="floats"),
    pytest.param({"ints": [0, -1, 2**53, 2**53 + 1, 2**63 - 1, -(2**63)]}, id="big-ints"),
])
def test_definitions_round_trip_exactly(store, definition):
    store.create_flow("rag", "RAG bot", "", definition)
    store.add_version("rag", definition, "RAG bot", "")
    for version in (store.get_version("rag", 1), store.get_version("rag", 2), store.list_versions("rag")[1]):
        # json.dumps compares key order, -0.0 and every float digit, which == would not
        assert json.dumps(version.definition) == json.dumps(definition)


# -- publish, rollback, routing --------------------------------------------------------------


def test_publish_moves_live_and_records_history(store):
    make_flow(store, versions=3)
    flow = store.publish("rag", 3)
    assert (flow.live_version, flow.live_history, flow.latest_version) == (3, (1,), 3)
    flow = store.publish("rag", 2)
    assert (flow.live_version, flow.live_history) == (2, (1, 3))
    assert store.get_flow("rag") == flow


def test_publishing_the_live_version_again_adds_no_history(store):
    make_flow(store, versions=2)
    store.publish("rag", 2)
    flow = store.publish("rag", 2)
    assert (flow.live_version, flow.live_history) == (2, (1,))


@pytest.mark.parametrize(("flow_id", "version", "error"), [
    pytest.param("rag", 4, NotFound, id="past-latest"),
    pytest.param("rag", 0, NotFound, id="zero"),
    pytest.param("rag", -2, NotFound, id="negative"),
    pytest.param("nope", 1, FlowNotFound, id="unknown-flow"),
])
def test_publishing_a_missing_version_is_not_found_and_changes_nothing(store, flow_id, version, error):
    make_flow(store, versions=3)
    store.publish("rag", 2)
    store.set_routing("rag", {"canary": {"version": 3, "percent": 10}})
    before = store.get_flow("rag")
    with pytest.raises(error) as info:
        store.publish(flow_id, version)
    assert info.value.status == 404
    assert store.get_flow("rag") == before


def test_rollback_returns_to_the_previously_live_version_repeatedly(store):
    make_flow(store, versions=3)
    store.publish("rag", 2)
    store.publish("rag", 3)
    flow = store.rollback("rag")
    assert (flow.live_version, flow.live_history) == (2, (1,))
    flow = store.rollback("rag")
    assert (flow.live_version, flow.live_history) == (1, ())
    with pytest.raises(Conflict) as info:
        store.rollback("rag")
    assert info.value.status == 409
    assert store.get_flow("rag") == flow


def test_rollback_of_a_new_flow_is_a_conflict_and_of_an_unknown_flow_not_found(store):
    make_flow(store)
    with pytest.raises(Conflict):
        store.rollback("rag")
    with pytest.raises(FlowNotFound):
        store.rollback("nope")


@pytest.mark.parametrize("move", [
    pytest.param(lambda s: s.publish("rag", 3), id="publish"),
    pytest.param(lambda s: s.publish("rag", 2), id="publish-same"),
    pytest.param(lambda s: s.rollback("rag"), id="rollback"),
])
def test_publish_and_rollback_clear_routing(store, move):
    make_flow(store, versions=3)
    store.publish("rag", 2)
    store.set_routing("rag", {"canary": {"version": 3, "percent": 10}})
    assert move(store).routing is None
    assert store.get_flow("rag").routing is None


@pytest.mark.parametrize("routing", [
    pytest.param({"canary": {"version": 2, "percent": 12.5}}, id="canary"),
    pytest.param({"split": [{"version": 1, "weight": 0.75}, {"version": 2, "weight": 0.25}],
                  "note": "ünïcode"}, id="split"),
    pytest.param(None, id="none"),
])
def test_set_routing_stores_and_returns_json(store, routing):
    make_flow(store, versions=2)
    store.set_routing("rag", {"previous": True})
    flow = store.set_routing("rag", routing)
    assert flow.routing == routing
    assert store.get_flow("rag").routing == routing
    assert flow.live_version == 1  # routing does not move live


def test_set_routing_of_unknown_flow_is_flow_not_found(store):
    with pytest.raises(FlowNotFound):
        store.set_routing("nope", {"canary": {}})


# -- atomicity under concurrency -------------------------------------------------------------


def test_concurrent_publishes_leave_a_consistent_live_pointer_and_history(store):
    make_flow(store, versions=5)
    existing = {1, 2, 3, 4, 5}
    targets = [5, 6, 4, 7, 3, 8, 2, 1]  # 6, 7 and 8 do not exist
    outcomes = run_concurrently([lambda v=v: store.publish("rag", v) for v in targets])
    for version, outcome in zip(targets, outcomes, strict=True):
        if version in existing:
            assert isinstance(outcome, FlowRecord), f"publish {version}: {outcome!r}"
        else:
            assert isinstance(outcome, NotFound), f"publish {version}: {outcome!r}"
    flow = store.get_flow("rag")
    assert flow.live_version in existing
    assert set(flow.live_history) <= existing
    # Serialised publishes append the outgoing live version each time, so the chain of live
    # versions names every version published; a lost update would drop one.
    chain = [*flow.live_history, flow.live_version]
    assert set(chain) == existing
    assert all(a != b for a, b in pairwise(chain))


def test_concurrent_add_version_gives_each_thread_its_own_consecutive_number(store):
    make_flow(store)
    outcomes = run_concurrently(
        [lambda i=i: store.add_version("rag", {"thread": i}, "rag flow", "") for i in range(8)])
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert errors == []
    assert sorted(o.version for o in outcomes) == list(range(2, 10))
    for thread, record in enumerate(outcomes):
        assert store.get_version("rag", record.version).definition == {"thread": thread}
    assert store.get_flow("rag").latest_version == 9
    assert [v.version for v in store.list_versions("rag")] == list(range(1, 10))


# -- a crash mid-write leaves the old state --------------------------------------------------


def crash_on(store: SqlFlowStore, statement_prefix: str) -> list[str]:
    """Make the next statement starting with ``statement_prefix`` fail as a dropped connection
    would; earlier statements of the same transaction have run. Returns the on_error calls."""
    dbapi_error = store.engine.dialect.loaded_dbapi.OperationalError

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def crash(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(statement_prefix):
            sa.event.remove(store.engine, "before_cursor_execute", crash)
            raise dbapi_error("simulated crash mid-transaction")

    calls: list[str] = []
    store._on_error = calls.append
    return calls


@pytest.mark.parametrize(("write", "failing_statement"), [
    pytest.param(lambda s: s.add_version("rag", {"v": 3}, "renamed", "changed"), "UPDATE FLOWS",
                 id="add_version-after-version-insert"),
    pytest.param(lambda s: s.create_flow("new", "new flow", "", DEFINITION), "INSERT INTO FLOW_VERSIONS",
                 id="create_flow-after-flow-insert"),
    pytest.param(lambda s: s.publish("rag", 2), "UPDATE FLOWS", id="publish"),
    pytest.param(lambda s: s.rollback("rag"), "UPDATE FLOWS", id="rollback"),
    pytest.param(lambda s: s.delete_flow("rag"), "DELETE FROM FLOWS",
                 id="delete_flow-after-versions-delete"),
])
def test_a_crash_mid_write_rolls_back_to_the_old_state(store, write, failing_statement):
    make_flow(store, versions=2)
    store.publish("rag", 2)
    store.publish("rag", 1)  # live 1, history (1, 2): every write below has something to change
    flow_before, versions_before = store.get_flow("rag"), store.list_versions("rag")
    on_error = crash_on(store, failing_statement)
    with pytest.raises(StoreError) as info:
        write(store)
    assert info.value.status == 503
    assert on_error == ["write"]
    assert store.get_flow("rag") == flow_before
    assert store.list_versions("rag") == versions_before
    assert [f.id for f in store.list_flows()] == ["rag"]
    # the rolled-back write can be done again; nothing half-written is in its way
    write(store)


def test_an_exception_inside_a_write_transaction_rolls_it_back(store):
    make_flow(store)
    before = store.get_flow("rag")
    with pytest.raises(RuntimeError), store._write() as conn:
        conn.execute(sa.text("INSERT INTO flow_versions (flow_id, version, definition, created_at) "
                             "VALUES ('rag', 2, '{}', :at)"), {"at": datetime.now(UTC)})
        conn.execute(sa.text("UPDATE flows SET latest_version = 2 WHERE id = 'rag'"))
        raise RuntimeError("the process died before commit")
    assert store.get_flow("rag") == before
    with pytest.raises(NotFound):
        store.get_version("rag", 2)
    assert store.add_version("rag", {"v": 2}, "rag flow", "").version == 2


# -- delete ----------------------------------------------------------------------------------


def test_delete_flow_removes_its_versions_and_frees_the_id(store):
    make_flow(store, versions=3)
    store.delete_flow("rag")
    with pytest.raises(FlowNotFound):
        store.get_flow("rag")
    with pytest.raises(FlowNotFound):
        store.list_versions("rag")
    for version in (1, 2, 3):
        with pytest.raises(NotFound):
            store.get_version("rag", version)
    reborn = store.create_flow("rag", "rag flow", "", {"reborn": True})
    assert (reborn.latest_version, reborn.live_version, reborn.live_history) == (1, 1, ())
    assert store.get_version("rag", 1).definition == {"reborn": True}
    with pytest.raises(NotFound):
        store.get_version("rag", 2)


def test_delete_unknown_flow_is_flow_not_found(store):
    with pytest.raises(FlowNotFound):
        store.delete_flow("nope")


# -- runs ------------------------------------------------------------------------------------


def make_run(run_id: str = "run-1", key: str | None = None, **fields: Any) -> RunRecord:
    values: dict[str, Any] = {"flow_id": "rag", "version": 1, "status": "running",
                              "created_at": datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
                              "session_id": "s1", "trace_id": "t" * 32, "request_hash": "h" * 64}
    values.update(fields)
    return RunRecord(run_id=run_id, idempotency_key=key, **values)


def test_insert_run_returns_none_and_get_run_reads_it_back(store):
    record = make_run(key="key-1")
    assert store.insert_run(record) is None
    assert store.get_run("run-1") == record


def test_insert_run_with_a_taken_idempotency_key_returns_the_existing_run(store):
    first = make_run("run-1", key="key-1")
    store.insert_run(first)
    existing = store.insert_run(make_run("run-2", key="key-1", session_id="other"))
    assert existing == first
    with pytest.raises(RunNotFound):
        store.get_run("run-2")


def test_insert_run_duplicate_run_id_without_key_is_a_conflict(store):
    store.insert_run(make_run("run-1"))
    with pytest.raises(Conflict) as info:
        store.insert_run(make_run("run-1", status="succeeded"))
    assert info.value.status == 409
    assert store.get_run("run-1").status == "running"


def test_insert_run_duplicate_run_id_with_a_new_key_is_a_conflict(store, monkeypatch):
    store.insert_run(make_run("run-1", key="key-1"))
    original, calls = store.insert_run, []

    def bounded_insert_run(record: RunRecord) -> RunRecord | None:
        calls.append(record.run_id)
        if len(calls) > 5:
            raise AssertionError("insert_run retried itself 5 times; it would recurse until RecursionError")
        return original(record)

    monkeypatch.setattr(store, "insert_run", bounded_insert_run)
    with pytest.raises(Conflict):
        store.insert_run(make_run("run-1", key="key-2"))


@pytest.mark.parametrize(("status", "result", "error"), [
    pytest.param("succeeded", {"output": "ünïcode ✓", "usage": {"total_tokens": 12}, "score": 0.1},
                 None, id="succeeded"),
    pytest.param("failed", None, {"code": "llm_error", "message": "upstream 500", "node": "llm"},
                 id="failed"),
    pytest.param("cancelled", None, None, id="cancelled"),
])
def test_finish_run_stores_status_duration_result_and_error(store, status, result, error):
    store.insert_run(make_run())
    store.finish_run("run-1", status=status, duration_ms=1234.5, result=result, error=error)
    run = store.get_run("run-1")
    assert (run.status, run.duration_ms, run.result, run.error) == (status, 1234.5, result, error)
    assert_utc(run.finished_at)
    assert run.finished_at > run.created_at
    assert (run.flow_id, run.session_id, run.trace_id) == ("rag", "s1", "t" * 32)


def test_get_run_unknown_is_run_not_found(store):
    with pytest.raises(RunNotFound) as info:
        store.get_run("nope")
    assert info.value.status == 404


def test_find_run_by_key(store):
    store.insert_run(make_run("run-1", key="key-1"))
    store.insert_run(make_run("run-2", key="key-2"))
    assert store.find_run_by_key("key-2").run_id == "run-2"
    assert store.find_run_by_key("key-3") is None


def test_delete_run_removes_it_and_frees_its_idempotency_key(store):
    store.insert_run(make_run("run-1", key="key-1"))
    store.delete_run("run-1")
    with pytest.raises(RunNotFound):
        store.get_run("run-1")
    assert store.find_run_by_key("key-1") is None
    assert store.insert_run(make_run("run-2", key="key-1")) is None
    assert store.find_run_by_key("key-1").run_id == "run-2"


def test_run_timestamps_come_back_timezone_aware_utc(store):
    store.insert_run(make_run())
    store.finish_run("run-1", status="succeeded", duration_ms=1.0, result=None, error=None)
    run = store.get_run("run-1")
    assert run.created_at == datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    assert_utc(run.created_at)
    assert_utc(run.finished_at)


def test_a_run_created_at_in_another_zone_keeps_its_instant_and_comes_back_utc(store):
    berlin_noon = datetime(2025, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    store.insert_run(make_run(created_at=berlin_noon))
    created_at = store.get_run("run-1").created_at
    assert created_at == berlin_noon  # the same instant: 10:00 UTC
    assert_utc(created_at)


def test_postgres_timestamps_are_utc_whatever_the_server_time_zone(postgres_url):
    store = SqlFlowStore(postgres_url + "%20-cTimeZone%3DAsia/Tokyo")
    try:
        store.migrate()
        flow = make_flow(store)
        store.insert_run(make_run())
        for value in (flow.created_at, store.get_version("rag", 1).created_at,
                      store.get_run("run-1").created_at):
            assert_utc(value)
    finally:
        store.close()


# -- chat memory -----------------------------------------------------------------------------


def chat(*texts: str) -> list[ChatMessage]:
    return [ChatMessage("human" if i % 2 == 0 else "ai", text) for i, text in enumerate(texts)]


def test_append_chat_then_read_back_in_order(store):
    store.append_chat("t1", "s1", "rag", chat("hi", "hello, how can I help?"))
    store.append_chat("t1", "s1", "rag", [])
    store.append_chat("t1", "s1", "rag", chat("refunds?", "5 days — ünïcode ✓"))
    assert store.chat_history("t1", "s1", "rag", limit=100) == chat(
        "hi", "hello, how can I help?", "refunds?", "5 days — ünïcode ✓")


@pytest.mark.parametrize(("limit", "expected"), [
    pytest.param(0, [], id="zero"),
    pytest.param(1, ["m5"], id="one"),
    pytest.param(3, ["m3", "m4", "m5"], id="three"),
    pytest.param(6, ["m0", "m1", "m2", "m3", "m4", "m5"], id="exactly-all"),
    pytest.param(50, ["m0", "m1", "m2", "m3", "m4", "m5"], id="more-than-all"),
])
def test_chat_history_limit_keeps_the_most_recent_in_chronological_order(store, limit, expected):
    for i in range(0, 6, 2):
        store.append_chat("t1", "s1", "rag", chat(f"m{i}", f"m{i + 1}"))
    assert [m.content for m in store.chat_history("t1", "s1", "rag", limit=limit)] == expected


def test_chat_sessions_and_flows_are_isolated(store):
    store.append_chat("t1", "s1", "rag", chat("s1 rag"))
    store.append_chat("t1", "s2", "rag", chat("s2 rag"))
    store.append_chat("t1", "s1", "faq", chat("s1 faq"))
    assert store.chat_history("t1", "s1", "rag", 10) == chat("s1 rag")
    assert store.chat_history("t1", "s2", "rag", 10) == chat("s2 rag")
    assert store.chat_history("t1", "s1", "faq", 10) == chat("s1 faq")
    assert store.chat_history("t1", "s2", "faq", 10) == []


def test_chat_history_is_per_tenant(store):
    store.append_chat("t1", "order-1001", "rag", chat("t1's question", "t1's answer"))
    store.append_chat("t2", "order-1001", "rag", chat("t2's question"))

    assert store.chat_history("t1", "order-1001", "rag", 10) == chat("t1's question", "t1's answer")
    assert store.chat_history("t2", "order-1001", "rag", 10) == chat("t2's question")
    assert store.chat_history("t3", "order-1001", "rag", 10) == []


def test_runs_keep_their_tenant(store):
    store.create_flow("f", "f", "", {"nodes": []})
    store.insert_run(RunRecord(run_id="r1", flow_id="f", version=1, status="running",
                               created_at=datetime.now(UTC), tenant="orders-app"))
    assert store.get_run("r1").tenant == "orders-app"


# -- an unreachable database -----------------------------------------------------------------


@pytest.mark.parametrize("unreachable_url", [
    pytest.param(lambda tmp: f"sqlite:///{tmp / 'no' / 'such' / 'dir' / 'flows.db'}", id="sqlite"),
    pytest.param(lambda tmp: f"postgresql://postgres@127.0.0.1:{free_port()}/test", id="postgres"),
])
def test_an_unreachable_database_raises_store_error_and_calls_on_error(unreachable_url, tmp_path):
    on_error: list[str] = []
    store = SqlFlowStore(unreachable_url(tmp_path), on_error=on_error.append)
    try:
        for op, call in [("read", store.ping), ("read", lambda: store.get_flow("rag")),
                         ("write", lambda: store.create_flow("rag", "rag", "", {})),
                         ("write", lambda: store.insert_run(make_run(key="key-1"))),
                         ("write", lambda: store.record_run_ends([make_run()], [])),
                         ("write", store.migrate)]:
            with pytest.raises(StoreError) as info:
                call()
            assert (info.value.status, info.value.code) == (503, "store_unavailable")
            assert not isinstance(info.value, SQLAlchemyError)
            assert isinstance(info.value.__cause__, SQLAlchemyError)  # translated once, at the boundary
            assert on_error[-1] == op
        assert len(on_error) == 6
    finally:
        store.close()


# -- PostgreSQL connections: commit mode, idle pings ---------------------------------------------


def _setting(engine: sa.Engine, name: str) -> str:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"SHOW {name}").scalar_one()


def test_postgres_run_records_commit_without_waiting_for_the_wal_and_flows_wait(postgres_url):
    store = SqlFlowStore(postgres_url)
    try:
        store.migrate()
        assert _setting(store.log_engine, "synchronous_commit") == "off"
        assert _setting(store.engine, "synchronous_commit") == "on"
        make_flow(store)
        store.insert_run(make_run(key="key-1"))
        store.append_chat("t1", "s1", "rag", chat("hi"))
        # what went through the log pool is visible to the other at once
        assert store.get_run("run-1").idempotency_key == "key-1"
        assert store.chat_history("t1", "s1", "rag", 5) == chat("hi")
        # and the unique key still holds across pools and stores
        other = SqlFlowStore(postgres_url)
        try:
            assert other.insert_run(make_run("run-2", key="key-1")).run_id == "run-1"
        finally:
            other.close()
    finally:
        store.close()


def test_postgres_connections_killed_while_idle_are_replaced_not_failed(
        postgres_url, postgres_admin, monkeypatch):
    """A database restart (here: every backend of the test's pools terminated) must not fail
    the next requests: a connection idle longer than PING_IDLE_S is pinged and replaced."""
    import flow_engine.store.sql as sql_module

    monkeypatch.setattr(sql_module, "PING_IDLE_S", 0.0)
    store = SqlFlowStore(postgres_url + "%20-capplication_name%3Dflowgate-idle-test")
    try:
        store.migrate()
        make_flow(store)
        store.insert_run(make_run(key="key-1"))
        killed = postgres_admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'flowgate-idle-test'").fetchone()[0]
        assert killed >= 2  # a connection of each pool sat idle
        store.insert_run(make_run("run-2", key="key-2"))  # log pool
        assert store.get_flow("rag").id == "rag"  # flow pool
        assert store.get_run("run-2").status == "running"
    finally:
        store.close()


@pytest.mark.parametrize(("op", "call"), [
    pytest.param("read", lambda store: store.get_flow("rag").id == "rag", id="read"),
    pytest.param("write", lambda store: store.add_version("rag", {"v": 2}, "rag flow", "")
                 .version == 2, id="write-flows"),
    pytest.param("write", lambda store: store.insert_run(make_run("run-2", key="key-2")) is None,
                 id="write-run-records"),
])
def test_postgres_a_connection_killed_while_idle_costs_the_caller_nothing(
        postgres_url, postgres_admin, op, call):
    """A backend terminated less than PING_IDLE_S ago is not pinged at checkout: its first
    statement fails, and runs again on a fresh connection — for a write too, since nothing
    had run on the dead one. The caller sees no error."""
    reconnects: list[str] = []
    store = SqlFlowStore(postgres_url + "%20-capplication_name%3Dflowgate-first-use",
                         on_reconnect=reconnects.append)
    try:
        store.migrate()
        make_flow(store)
        store.insert_run(make_run(key="key-1"))  # each pool holds an idle connection now
        killed = postgres_admin.execute(  # (the timeout: wait until they are gone)
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE application_name = 'flowgate-first-use'").fetchone()[0]
        assert killed >= 2

        assert call(store)
        assert reconnects == [op]
        assert store.get_run("run-1").idempotency_key == "key-1"
    finally:
        store.close()


# -- keyed runs: heartbeats and abandoning a run whose engine stopped ----------------------------


def test_a_schema_from_before_heartbeats_is_upgraded(open_store, db_url):
    """A database made by migration 1 alone (runs without heartbeat_at) gains the column."""
    old = open_store()
    old.migrate()
    with old.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_runs_running"))  # (from migration 4, on heartbeat_at)
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN heartbeat_at"))
        conn.execute(schema_version.delete().where(schema_version.c.version > 1))
    fresh = open_store()  # a new process: its own connections see the old shape
    assert fresh.migrate() == len(MIGRATIONS)
    assert schema_rows(fresh) == list(range(1, len(MIGRATIONS) + 1))
    beat = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)
    fresh.insert_run(make_run(key="k", heartbeat_at=beat))
    assert fresh.get_run("run-1").heartbeat_at == beat


def test_a_schema_from_before_tenants_is_upgraded(open_store):
    """A database at schema 2 (no tenant columns; chat read by session and flow) gains the
    tenant columns and the index by tenant; its old chat rows belong to no tenant."""
    old = open_store()
    old.migrate()
    with old.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_chat_tenant_session"))
        for index in ("ix_runs_tenant_created", "ix_runs_tenant_flow_created"):  # schema 8's
            conn.execute(sa.text(f"DROP INDEX {index}"))
        conn.execute(sa.text("ALTER TABLE chat_messages DROP COLUMN tenant"))
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN tenant"))
        conn.execute(sa.text("CREATE INDEX ix_chat_session ON chat_messages "
                             "(session_id, flow_id, id)"))
        conn.execute(sa.text("INSERT INTO chat_messages (session_id, flow_id, role, content, "
                             "created_at) VALUES ('s1', 'rag', 'human', 'old', :at)"),
                     {"at": datetime(2025, 1, 1, tzinfo=UTC)})
        conn.execute(schema_version.delete().where(schema_version.c.version > 2))
    fresh = open_store()
    assert fresh.migrate() == len(MIGRATIONS)
    indexes = {ix["name"] for ix in sa.inspect(fresh.engine).get_indexes("chat_messages")}
    assert "ix_chat_tenant_session" in indexes and "ix_chat_session" not in indexes
    runs_indexes = {ix["name"] for ix in sa.inspect(fresh.engine).get_indexes("runs")}
    assert {"ix_runs_tenant_created", "ix_runs_tenant_flow_created"} <= runs_indexes
    assert fresh.chat_history("t1", "s1", "rag", 10) == []  # nobody's any more
    fresh.append_chat("t1", "s1", "rag", chat("new"))
    assert fresh.chat_history("t1", "s1", "rag", 10) == chat("new")
    fresh.insert_run(make_run("r-tenant", tenant="t1"))
    assert fresh.get_run("r-tenant").tenant == "t1"


def test_heartbeat_touches_only_running_runs(store):
    store.insert_run(make_run("a", key="ka", heartbeat_at=None))
    store.insert_run(make_run("b", key="kb", heartbeat_at=None))
    store.finish_run("b", status="succeeded", duration_ms=1.0, result={}, error=None)
    store.heartbeat(["a", "b", "missing"])
    assert_utc(store.get_run("a").heartbeat_at)
    assert store.get_run("b").heartbeat_at is None
    store.heartbeat([])  # nothing to do, no statement


def test_abandon_run_fails_it_and_frees_its_key_once(store):
    beat = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)
    store.insert_run(make_run("old", key="k", heartbeat_at=beat))
    error = {"status": 503, "code": "run_abandoned", "message": "its engine stopped"}
    assert store.abandon_run("old", beat, error) is True
    gone = store.get_run("old")
    assert (gone.status, gone.error, gone.idempotency_key) == ("failed", error, None)
    assert_utc(gone.finished_at)
    assert store.abandon_run("old", beat, error) is False  # not running any more
    assert store.insert_run(make_run("new", key="k")) is None  # the key is free again


def test_abandon_run_loses_to_a_fresh_heartbeat(store):
    beat = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)
    store.insert_run(make_run("live", key="k", heartbeat_at=beat))
    store.heartbeat(["live"])  # its owner is alive after all
    assert store.abandon_run("live", beat, {"code": "run_abandoned"}) is False
    assert store.get_run("live").status == "running"
    assert store.find_run_by_key("k").run_id == "live"


def test_only_one_of_two_concurrent_abandons_wins(open_store, store):
    beat = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)
    store.insert_run(make_run("old", key="k", heartbeat_at=beat))
    other = open_store()
    outcomes = run_concurrently([lambda s=s: s.abandon_run("old", beat, {"code": "x"})
                                 for s in (store, other)])
    assert sorted(outcomes) == [False, True]
