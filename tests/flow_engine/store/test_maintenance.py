"""The maintenance job (flow_engine/maintenance.py) on both backends: run records nobody will
finish are marked failed, old runs and chat messages are deleted in batches, and a pass runs
in one process at a time. The clock is injected; the store is real."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from flow_engine.config import Settings
from flow_engine.maintenance import Maintenance
from flow_engine.metrics import EngineMetrics
from flow_engine.rollouts.outcomes import KEEP_S, slot_of
from flow_engine.store import ChatMessage, RunRecord
from flow_engine.store.schema import OUTCOME_BUCKETS, chat_messages

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)


def settings(**values: Any) -> Settings:
    return Settings.load({"maintenance_interval_s": 300, **values}, environ={})


def job(store: Any, *, at: datetime = NOW, batch: int = 1000, **values: Any
        ) -> tuple[Maintenance, EngineMetrics]:
    metrics = EngineMetrics(CollectorRegistry())
    return Maintenance(store, settings(**values), metrics, clock=lambda: at, batch=batch), metrics


def run(run_id: str, *, status: str = "running", age: timedelta = timedelta(0),
        key: str | None = None, beat: timedelta | None = None) -> RunRecord:
    """A run created ``age`` before NOW; keyed runs marked alive ``beat`` before NOW."""
    return RunRecord(run_id=run_id, flow_id="rag", version=1, status=status,
                     created_at=NOW - age, idempotency_key=key, request_hash="h" * 64,
                     heartbeat_at=NOW - beat if beat is not None else None, tenant="t1")


def sample(metrics: EngineMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_runs_no_process_owns_are_marked_failed_and_their_keys_freed(store):
    store.insert_run(run("stale-keyed", key="k1", age=timedelta(minutes=3),
                         beat=timedelta(minutes=2)))
    store.insert_run(run("alive-keyed", key="k2", age=timedelta(hours=5), beat=timedelta(seconds=5)))
    store.insert_run(run("old-unkeyed", age=2 * DAY))
    store.insert_run(run("young-unkeyed", age=timedelta(hours=1)))
    store.insert_run(run("finished", status="succeeded", age=2 * DAY))
    maintenance, metrics = job(store)

    done = maintenance.run_once()

    assert done == {"reaped": 2, "runs": 0, "chat_messages": 0, "outcomes": 0}
    for run_id in ("stale-keyed", "old-unkeyed"):
        record = store.get_run(run_id)
        assert (record.status, record.error["code"]) == ("failed", "run_abandoned"), run_id
        assert record.finished_at == NOW and record.idempotency_key is None
    for run_id, status in (("alive-keyed", "running"), ("young-unkeyed", "running"),
                           ("finished", "succeeded")):
        assert store.get_run(run_id).status == status
    assert store.insert_run(run("retry", key="k1")) is None, "the key is free for a retry"
    assert sample(metrics, "flowgate_engine_runs_reaped_total") == 2
    assert sample(metrics, "flowgate_engine_runs_total", flow="rag", version="1",
                  status="failed") == 2


def test_retention_deletes_old_runs_and_chat_messages_in_batches(store):
    for i in range(5):
        store.insert_run(run(f"old-{i}", status="succeeded", age=8 * DAY))
    store.insert_run(run("recent", status="failed", age=6 * DAY))
    store.insert_run(run("old-but-alive", key="k", age=8 * DAY, beat=timedelta(seconds=1)))
    store.append_chat("t1", "s1", "rag", [ChatMessage("human", "today")])
    with store.log_engine.begin() as conn:
        conn.execute(chat_messages.insert(), [
            {"tenant": "t1", "session_id": "s1", "flow_id": "rag", "role": "human",
             "content": f"old {i}", "created_at": NOW - 31 * DAY} for i in range(3)])
    now_slot = slot_of(NOW.timestamp())
    old_slot = slot_of(NOW.timestamp() - KEEP_S) - 1  # older than any guard window reads
    store.add_outcomes([("rag", 1, old_slot - i, 1, 0, [1] + [0] * (OUTCOME_BUCKETS - 1)) for i in range(3)]
                       + [("rag", 1, now_slot, 4, 1, [5] + [0] * (OUTCOME_BUCKETS - 1))])
    with store.engine.begin() as conn:  # an engine of the 12-bucket layout's: its own to delete
        conn.execute(sa.text("INSERT INTO run_outcomes VALUES ('rag', 1, :slot, 1, 0"
                             + ", 0" * 12 + ")"), {"slot": old_slot})
    maintenance, metrics = job(store, batch=2)

    done = maintenance.run_once()

    assert done == {"reaped": 0, "runs": 5, "chat_messages": 3, "outcomes": 3}
    assert store.read_outcomes("rag", 1, 0, now_slot + 1) == (4, 1, [5] + [0] * (OUTCOME_BUCKETS - 1))
    assert [m.content for m in store.chat_history("t1", "s1", "rag", 10)] == ["today"]
    with store.engine.connect() as conn:
        left = set(conn.execute(sa.text("SELECT run_id FROM runs")).scalars())
        assert left == {"recent", "old-but-alive"}
        assert conn.execute(sa.text("SELECT count(*) FROM run_outcomes")).scalar_one() == 1
    assert sample(metrics, "flowgate_engine_retention_deleted_total", kind="runs") == 5
    assert sample(metrics, "flowgate_engine_retention_deleted_total", kind="chat_messages") == 3
    assert sample(metrics, "flowgate_engine_retention_deleted_total", kind="outcomes") == 3


def test_runs_are_kept_while_their_idempotency_key_is_honoured(store):
    store.insert_run(run("two-hours", status="succeeded", key="k", age=timedelta(hours=2)))
    maintenance, _ = job(store, run_retention_s=3600, idempotency_ttl_s=86_400)

    assert maintenance.run_once()["runs"] == 0
    assert store.find_run_by_key("k").run_id == "two-hours"


def test_a_pass_runs_in_one_process_at_a_time(open_store, store):
    others = [open_store() for _ in range(3)]
    jobs = [job(s)[0] for s in [store, *others]]

    outcomes = run_concurrently([j.run_once for j in jobs])

    assert sum(outcome is not None for outcome in outcomes) == 1, outcomes
    assert job(others[0], at=NOW + timedelta(seconds=100))[0].run_once() is None, \
        "not again within half an interval"
    assert job(others[1], at=NOW + timedelta(seconds=151))[0].run_once() is not None


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))

    def call(fn: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return fn()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, calls))
