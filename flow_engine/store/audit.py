"""The audit log: one entry per change to a flow, written by the store inside the
transaction that makes the change — so there is never a change without its entry, nor an
entry without its change (a rolled-back transaction takes both). Entries are never
updated or deleted; a deleted flow keeps its history.

Reading: ``entries(flow_id, limit, before)`` newest first (a flow's history), and
``since(seq, limit)`` oldest first (tailing every flow's changes).

Tailing needs entries to become visible in ``seq`` order: a tailer that has read seq 4 asks
for what is after 4, so a seq 3 committed later would never be seen. ``seq`` is given at
insert, and on PostgreSQL transactions commit in any order — so each writer first takes one
transaction-scoped advisory lock (:data:`PG_LOCK`), held from just before its insert until
its commit: the next writer gets its seq only once the previous entry is committed (or
rolled back). The entry is the last statement of each change, so the lock is held for a
commit's time. SQLite already runs one write transaction at a time.

The wait for that lock is bounded (:data:`LOCK_TIMEOUT`, ``SET LOCAL lock_timeout``, which
ends with the transaction): a transaction stuck between its entry and its commit would
otherwise hold up every flow change on every engine. A change that waits longer fails as
the store being unavailable (StoreError: 503 with Retry-After) and writes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from flow_engine.store.base import AuditEntry, Change
from flow_engine.store.schema import audit_log, aware, now

_log = logging.getLogger("flow_engine.audit")
PG_LOCK = 727273  # pg_advisory_xact_lock key of audit writers (727272: migrations)
LOCK_TIMEOUT = "5s"  # the longest a change waits for PG_LOCK (a PostgreSQL interval)


def write(conn: Any, change: Change, action: str, flow_id: str, *,
          from_version: int | None = None, to_version: int | None = None,
          routing: dict[str, Any] | None = None) -> AuditEntry:
    """Append the entry of a change (inside the change's transaction)."""
    values = {"at": now(), "actor": change.actor, "action": change.action or action,
              "flow_id": flow_id, "from_version": from_version, "to_version": to_version,
              "routing": routing, "reason": change.reason, "message": change.message,
              "trace_id": change.trace_id}
    if conn.dialect.name == "postgresql":
        # SET LOCAL lock_timeout (set_config(..., true) is the same, with a bound value):
        # for the rest of this transaction, the lock below and the insert
        conn.execute(sa.text("SELECT set_config('lock_timeout', :timeout, true)"),
                     {"timeout": LOCK_TIMEOUT})
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK})
    seq = conn.execute(audit_log.insert().values(**values)).inserted_primary_key[0]
    return AuditEntry(seq=seq, **values)


def log(entry: AuditEntry) -> None:
    """Each entry is also one JSON log line (logger ``flow_engine.audit``), once committed."""
    _log.info("flow change", extra={"audit": entry.as_dict(), "flow_id": entry.flow_id,
                                    "actor": entry.actor})


def entries(conn: Any, flow_id: str, limit: int, before: int | None) -> list[AuditEntry]:
    query = sa.select(audit_log).where(audit_log.c.flow_id == flow_id)
    if before is not None:
        query = query.where(audit_log.c.seq < before)
    return [_entry(r) for r in conn.execute(query.order_by(audit_log.c.seq.desc()).limit(limit))]


def since(conn: Any, seq: int, limit: int) -> list[AuditEntry]:
    query = sa.select(audit_log).where(audit_log.c.seq > seq).order_by(audit_log.c.seq)
    return [_entry(r) for r in conn.execute(query.limit(limit))]


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(seq=row.seq, at=aware(row.at), actor=row.actor, action=row.action,
                      flow_id=row.flow_id, from_version=row.from_version,
                      to_version=row.to_version, routing=row.routing, reason=row.reason,
                      message=row.message, trace_id=row.trace_id)
