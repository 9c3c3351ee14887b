"""Ends of runs written in batches (flow_engine/runs/record_writer.py), on both stores."""

from __future__ import annotations

import contextlib
import threading
from datetime import UTC, datetime

from flow_engine.errors import Conflict
from flow_engine.runs.record_writer import RecordWriter, RunEnd
from flow_engine.store.base import RunRecord


def record(run_id: str, **fields) -> RunRecord:
    return RunRecord(run_id=run_id, flow_id="f", version=1, status="succeeded",
                     created_at=datetime.now(UTC), finished_at=datetime.now(UTC),
                     duration_ms=1.5, result={"output": run_id}, tenant="t", **fields)


class Alone:
    """write_alone: what the executor does with an end a batch could not write."""

    def __init__(self, store) -> None:
        self.store = store
        self.ends: list[str] = []

    def __call__(self, end: RunRecord):
        def write() -> None:
            self.ends.append(end.run_id)
            with contextlib.suppress(Conflict):  # the duplicate: committed earlier
                self.store.insert_run(end)
        return write


def test_many_ends_go_in_one_transaction_and_say_which_were_written(store):
    written: list[str] = []
    calls = []
    real = store.record_run_ends

    def counting(inserts, finishes):
        calls.append((len(inserts), len(finishes)))
        real(inserts, finishes)

    store.record_run_ends = counting
    writer = RecordWriter(store, on_written=written.extend, batch_s=0)
    alone = Alone(store)
    ends = [record(f"r{i:02d}") for i in range(40)]
    for end in ends:
        writer.submit(RunEnd(end.run_id, end, None, alone(end)))
    writer.flush()

    assert sum(n for n, _ in calls) == 40 and len(calls) < 40  # batched
    assert sorted(written) == sorted(e.run_id for e in ends)
    assert alone.ends == []
    assert {store.get_run(e.run_id).result["output"] for e in ends} == {e.run_id for e in ends}


def test_a_keyed_runs_end_updates_its_claim(store):
    claim = record("keyed", idempotency_key="t/k1", request_hash="h")
    claim.status, claim.result, claim.finished_at = "running", None, None
    store.insert_run(claim)
    writer = RecordWriter(store, on_written=lambda ids: None, batch_s=0)

    writer.submit(RunEnd("keyed", None, {"run_id": "keyed", "status": "failed",
                                         "duration_ms": 9.0, "result": None,
                                         "error": {"code": "llm_error"}}, lambda: None))
    writer.flush()

    stored = store.get_run("keyed")
    assert (stored.status, stored.error, stored.duration_ms) == ("failed", {"code": "llm_error"}, 9.0)
    assert stored.finished_at is not None and stored.idempotency_key == "t/k1"


def test_one_bad_end_costs_the_others_nothing(store):
    store.insert_run(record("dup"))  # already stored: the batch's insert of it fails
    written: list[str] = []
    writer = RecordWriter(store, on_written=written.extend, batch_s=0)
    alone = Alone(store)
    ends = [record("a"), record("dup"), record("b")]
    for end in ends:
        writer.submit(RunEnd(end.run_id, end, None, alone(end)))
    writer.flush()

    assert written == []  # the batch failed as a whole ...
    assert alone.ends == ["a", "dup", "b"]  # ... and each end was written on its own
    assert store.get_run("a").status == store.get_run("b").status == "succeeded"


def test_the_background_writer_writes_without_a_flush(store):
    done = threading.Event()
    written: list[str] = []

    def on_written(ids):
        written.extend(ids)
        if len(written) == 3:
            done.set()

    writer = RecordWriter(store, on_written=on_written, batch_s=0.002)
    for name in ("x", "y", "z"):
        end = record(name)
        writer.submit(RunEnd(name, end, None, lambda: None))

    assert done.wait(10), written
    assert writer.pending() == 0
    assert store.get_run("z").status == "succeeded"
