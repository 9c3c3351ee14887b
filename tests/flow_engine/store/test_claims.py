"""Keyed runs' claims written together (flow_engine/runs/claims.py), on both stores."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import OperationalError
from support.waiting import wait_until

from flow_engine.errors import Conflict, RunNotFound
from flow_engine.runs.claims import ClaimWriter
from flow_engine.store.base import RunRecord, StoreError


def claim(run_id: str, key: str, **fields) -> RunRecord:
    now = datetime.now(UTC)
    return RunRecord(run_id=run_id, flow_id="f", version=1, status="running", created_at=now,
                     idempotency_key=key, request_hash="h" * 64, heartbeat_at=now, tenant="t",
                     **fields)


class HeldStore:
    """The store, with its first claim_runs held until released: the claims that arrive
    meanwhile queue up, so the next batch holds all of them (no timing involved)."""

    def __init__(self, store) -> None:
        self.store, self.batches = store, []
        self.entered, self.release = threading.Event(), threading.Event()

    def claim_runs(self, records):
        self.batches.append([r.run_id for r in records])
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        return self.store.claim_runs(records)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_claim_runs_inserts_all_but_those_whose_key_or_run_id_is_taken(store):
    assert store.insert_run(claim("held", "k-held")) is None
    records = [claim("a", "k-a"), claim("b", "k-held"), claim("held", "k-c"), claim("d", "k-a"),
               claim("e", "k-e")]
    assert store.claim_runs(records) == {"a", "e"}
    assert store.get_run("a").idempotency_key == "k-a"
    assert store.get_run("held").idempotency_key == "k-held", "the holder is untouched"
    for skipped in ("b", "d"):
        with pytest.raises(RunNotFound):
            store.get_run(skipped)


def test_claims_waiting_together_share_one_transaction_and_each_gets_its_answer(store):
    held = HeldStore(store)
    writer = ClaimWriter(held, probe_every=1)
    first = claim("r-first", "k-first")
    with ThreadPoolExecutor(32) as pool:
        firsts = pool.submit(writer.claim, first)
        assert held.entered.wait(10)
        others = [claim(f"r{i:02d}", f"k{i:02d}") for i in range(30)]
        others.append(claim("r-dup", "k05"))  # the same key as r05, in the same batch
        futures = [pool.submit(writer.claim, r) for r in others]
        wait_until(lambda: len(writer._queue) == len(others), "every claim queued behind the held batch")
        held.release.set()
        assert firsts.result(10) is None
        answers = [f.result(10) for f in futures]
    assert len(held.batches) == 2, held.batches
    assert sorted(held.batches[1]) == sorted(r.run_id for r in others)
    # r05 and r-dup came together with one key: one holds it (which one is the batch's
    # order), the other is answered with the holder's record, as a lone claim would be
    holder = store.find_run_by_key("k05").run_id
    assert holder in ("r05", "r-dup")
    loser = 30 if holder == "r05" else 5
    assert answers[loser] is not None and answers[loser].run_id == holder
    assert [a for i, a in enumerate(answers) if i != loser] == [None] * 30
    for record in [first, *others]:
        if record.run_id == holder or record.idempotency_key != "k05":
            assert store.get_run(record.run_id).status == "running"
        else:
            with pytest.raises(RunNotFound):
                store.get_run(record.run_id)


def test_a_claim_alone_is_written_at_once(store):
    writer = ClaimWriter(store)
    for i in range(3):  # one after another: three batches of one, each committed before return
        assert writer.claim(claim(f"r{i}", f"k{i}")) is None
        assert store.find_run_by_key(f"k{i}").run_id == f"r{i}"


class Counting:
    def __init__(self, store) -> None:
        self.store, self.batches = store, []

    def claim_runs(self, records):
        self.batches.append(len(records))
        return self.store.claim_runs(records)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_alone_claims_are_written_inline_but_every_eighth_probes_for_company(store):
    counting = Counting(store)
    writer = ClaimWriter(counting, probe_every=8)
    for i in range(17):
        assert writer.claim(claim(f"r{i}", f"k{i}")) is None
    assert counting.batches == [1, 1, 1], "claims 1, 9 and 17 went to the writer"
    assert all(store.find_run_by_key(f"k{i}") is not None for i in range(17))


def test_after_a_batch_with_company_claims_keep_going_to_the_writer(store):
    held = HeldStore(store)
    writer = ClaimWriter(held, probe_every=1000)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(writer.claim, claim("a", "ka"))
        assert held.entered.wait(10)
        rest = [pool.submit(writer.claim, claim(r, f"k{r}")) for r in ("b", "c")]
        wait_until(lambda: len(writer._queue) == 2, "both claims queued behind the held batch")
        held.release.set()
        assert [f.result(10) for f in (first, *rest)] == [None, None, None]
    assert writer.claim(claim("d", "kd")) is None  # the last batch had company: batched
    assert writer.claim(claim("e", "ke")) is None  # the last batch was alone: inline
    assert held.batches == [["a"], ["b", "c"], ["d"]]


def test_a_taken_run_id_is_still_a_conflict(store):
    writer = ClaimWriter(store)
    assert writer.claim(claim("r1", "k1")) is None
    with pytest.raises(Conflict):
        writer.claim(claim("r1", "k2"))


class FailingBatches:
    def __init__(self, store, alone_fails: bool) -> None:
        self.store, self.alone_fails, self.alone = store, alone_fails, []

    def claim_runs(self, records):
        raise StoreError("the flow store is unavailable; retry shortly")

    def insert_run(self, record):
        self.alone.append(record.run_id)
        if self.alone_fails:
            raise StoreError("the flow store is unavailable; retry shortly")
        return self.store.insert_run(record)


def test_a_failed_batch_is_written_claim_by_claim(store):
    failing = FailingBatches(store, alone_fails=False)
    writer = ClaimWriter(failing)
    assert writer.claim(claim("r1", "k1")) is None
    assert failing.alone == ["r1"]
    assert store.get_run("r1").idempotency_key == "k1"


def test_with_the_store_down_each_claim_gets_the_store_error(store):
    writer = ClaimWriter(FailingBatches(store, alone_fails=True))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(writer.claim, claim(f"r{i}", f"k{i}")) for i in range(4)]
        for future in futures:
            with pytest.raises(StoreError):
                future.result(10)
    # the writer survived: the next claim, with the store back, goes through
    assert ClaimWriter(store).claim(claim("after", "k-after")) is None
    writer.store = store
    assert writer.claim(claim("again", "k-again")) is None


class Unreachable:
    """A store whose batches fail as an unreachable database does (the store's own
    wrapping of an OperationalError), counting what is tried."""

    def __init__(self, store) -> None:
        self.store, self.batches, self.alone = store, 0, 0

    def claim_runs(self, records):
        self.batches += 1
        try:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        except OperationalError as exc:
            raise StoreError("the flow store is unavailable; retry shortly") from exc

    def insert_run(self, record):
        self.alone += 1
        return self.store.insert_run(record)


def test_with_the_store_unreachable_a_batch_answers_every_claim_at_once(store):
    unreachable = Unreachable(store)
    writer = ClaimWriter(unreachable, probe_every=1)
    with pytest.raises(StoreError):
        writer.claim(claim("r1", "k1"))
    assert (unreachable.batches, unreachable.alone) == (1, 0), "not tried again alone"


def test_probe_every_one_sends_every_claim_to_the_writer(store):
    counting = Counting(store)
    writer = ClaimWriter(counting, probe_every=1)
    for i in range(3):
        assert writer.claim(claim(f"r{i}", f"k{i}")) is None
    assert counting.batches == [1, 1, 1]


def test_two_batches_sharing_keys_in_opposite_orders_both_finish(store, open_store):
    """Each batch inserts in key order: on PostgreSQL, two transactions inserting the same
    two keys in opposite orders deadlock (one is aborted after deadlock_timeout)."""
    other = open_store()
    first = [claim("a1", "k-x"), claim("a2", "k-y")]
    second = [claim("b1", "k-y"), claim("b2", "k-x")]
    barrier = threading.Barrier(2)

    def batch(target, records):
        barrier.wait(10)
        return target.claim_runs(records)

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(30) for f in [pool.submit(batch, store, first),
                                          pool.submit(batch, other, second)]]
    winners = results[0] | results[1]
    assert len(winners) == 2 and {store.find_run_by_key(k).run_id for k in ("k-x", "k-y")} == winners
