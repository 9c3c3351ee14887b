"""The audit log against real SQLite and PostgreSQL: an entry and its change are one
transaction (neither without the other), and a tailer reading ``since(seq)`` never skips an
entry, however the writers' transactions overlap."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from support.waiting import wait_until

from flow_engine.store import SqlFlowStore, audit
from flow_engine.store.base import Change, StoreError

DEFINITION = {"id": "rag", "nodes": [{"id": "in", "type": "ChatInput"}], "edges": []}
CANARY = {"canary": {"version": 2, "percent": 10}}


class AuditFailed(Exception):
    pass


def two_versions(store: SqlFlowStore) -> None:
    """Flow ``rag`` with versions 1 (live) and 2."""
    store.create_flow("rag", "rag flow", "answers", DEFINITION)
    store.add_version("rag", {"v": 2}, "rag flow", "answers")


CHANGES: dict[str, Callable[[SqlFlowStore], Any]] = {
    "create": lambda s: s.create_flow("other", "other flow", "", DEFINITION),
    "new_version": lambda s: s.add_version("rag", {"v": 3}, "rag flow", "answers"),
    "publish": lambda s: s.publish("rag", 2),
    "routing": lambda s: s.set_routing("rag", CANARY),
    "routing_and_live": lambda s: s.set_routing("rag", None, live=2),
    "rollback": lambda s: s.rollback("rag"),
    "delete": lambda s: s.delete_flow("rag"),
}


def state(store: SqlFlowStore) -> tuple[Any, ...]:
    flows = [(f.id, f.latest_version, f.live_version, f.live_history, f.routing)
             for f in store.list_flows()]
    versions = [(v.flow_id, v.version) for f in store.list_flows()
                for v in store.list_versions(f.id)]
    return flows, versions, [e.seq for e in store.audit_since(0)]


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_whose_audit_entry_fails_is_not_made(store, monkeypatch, change):
    two_versions(store)
    store.publish("rag", 2)
    store.publish("rag", 1)  # something to roll back to
    before = state(store)
    written = []
    real_write = audit.write

    def write_then_fail(conn, *args, **kwargs):
        written.append(real_write(conn, *args, **kwargs))  # the change and its entry are in
        raise AuditFailed("the audit write failed after the change")

    monkeypatch.setattr(audit, "write", write_then_fail)
    with pytest.raises(AuditFailed):
        CHANGES[change](store)
    monkeypatch.undo()

    assert written, "the change never reached its audit write"
    assert state(store) == before  # neither the change nor its entry
    assert written[0].seq not in [e.seq for e in store.audit_since(0)]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_tailer_never_skips_an_entry_that_commits_late(store, open_store, db_url):
    """Writer A gets its seq, then writer B (another connection) changes a flow while A has
    not committed yet. Without ordering, B's higher seq commits first: a tailer reads it,
    asks for what comes after it, and never sees A's entry."""
    two_versions(store)
    tail: list[int] = [e.seq for e in store.audit_since(0)]
    writer_b = open_store()
    b_done = threading.Event()
    b_errors: list[BaseException] = []

    def b() -> None:
        try:
            writer_b.publish("rag", 2, Change(actor="b"))
        except BaseException as exc:  # reported by the assertions below
            b_errors.append(exc)
        finally:
            b_done.set()

    def b_waits_for_the_audit_lock() -> bool:
        with store.engine.connect() as conn:
            return bool(conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :key "
                "AND NOT granted"), {"key": audit.PG_LOCK}).scalar_one())

    def read_tail() -> None:
        tail.extend(e.seq for e in store.audit_since(tail[-1]))

    with store.engine.connect() as a, a.begin():
        mine = audit.write(a, Change(actor="a"), "routing", "rag")
        thread = threading.Thread(target=b, daemon=True)
        thread.start()
        wait_until(lambda: b_done.is_set() or b_waits_for_the_audit_lock(),
                   "writer B finished or waits for writer A's commit")
        read_tail()  # the tailer polls while A has not committed
    # A has committed
    thread.join(timeout=60)
    assert b_done.is_set() and not b_errors, b_errors
    read_tail()

    seqs = [e.seq for e in store.audit_since(0)]
    b_entry = store.list_audit("rag", limit=1)[0]
    assert (b_entry.actor, mine.seq < b_entry.seq) == ("b", True)
    assert tail == seqs, f"the tailer saw {tail}, the log holds {seqs}"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_change_waits_for_the_audit_lock_at_most_the_lock_timeout(store, monkeypatch):
    """A transaction stuck holding the audit lock (here: another real connection, in an open
    transaction) makes a change fail as the store being unavailable once the lock timeout
    passes — not wait for ever — and the change writes nothing; the next change, once the
    lock is free, goes through."""
    two_versions(store)
    before = state(store)
    monkeypatch.setattr(audit, "LOCK_TIMEOUT", "100ms")

    outcome: list[BaseException | None] = []

    def blocked_change() -> None:
        try:
            store.publish("rag", 2, Change(actor="blocked"))
            outcome.append(None)
        except BaseException as exc:  # asserted below
            outcome.append(exc)

    with store.engine.connect() as stuck, stuck.begin():
        stuck.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": audit.PG_LOCK})
        # in a thread, so that a change that waits for ever fails this test, not hangs it
        thread = threading.Thread(target=blocked_change, daemon=True)
        thread.start()
        wait_until(lambda: outcome, "the change waiting for the audit lock gave up")
        failed = outcome[0]
        assert isinstance(failed, StoreError), repr(failed)
        assert (failed.status, failed.code) == (503, "store_unavailable")
        assert state(store) == before  # neither the change nor its entry
    # the stuck transaction ended (rolled back): its lock is free
    thread.join(timeout=60)

    monkeypatch.undo()
    store.publish("rag", 2, Change(actor="after"))
    assert store.get_flow("rag").live_version == 2
    assert [(e.actor, e.action) for e in store.list_audit("rag", limit=1)] == [("after", "publish")]
