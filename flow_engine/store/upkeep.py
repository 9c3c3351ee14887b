"""The store's part of upkeep (flow_engine/maintenance.py runs it): run records nobody will
finish, records and chat messages past their retention, and which process does it.

Every statement touches at most ``batch`` rows, in a transaction of its own, so a large
backlog never holds a lock (SQLite's only write lock, PostgreSQL row locks) for long.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from flow_engine.store.schema import chat_messages, jobs, runs


class Upkeep:
    """Mixed into SqlFlowStore (it provides ``_read``, ``_write`` and ``is_sqlite``)."""

    def claim_job(self, name: str, every_s: float, at: datetime) -> bool:
        """Take this turn of job ``name``: True when it last ran ``every_s`` or more before
        ``at`` (or never) — and it is now marked as run at ``at``; False when another
        process ran or is running it. The row's lock makes the check and the mark one step."""
        try:
            with self._write() as conn:
                query = sa.select(jobs.c.last_run_at).where(jobs.c.name == name)
                if not self.is_sqlite:
                    query = query.with_for_update()
                last = conn.execute(query).scalar_one_or_none()
                if last is not None and (at - last).total_seconds() < every_s:
                    return False
                if last is None:
                    conn.execute(jobs.insert().values(name=name, last_run_at=at))
                else:
                    conn.execute(jobs.update().where(jobs.c.name == name).values(last_run_at=at))
        except IntegrityError:  # another process inserted the first row meanwhile
            return False
        return True

    def reap_runs(self, *, stale_before: datetime, running_before: datetime,
                  error: dict[str, Any], at: datetime, batch: int = 500) -> list[Any]:
        """Mark failed (with ``error``, freeing the idempotency key) running runs that no
        process owns any more: keyed runs not marked alive since ``stale_before``, runs
        without a heartbeat created before ``running_before``. At most ``batch`` of them;
        returns their (run_id, flow_id, version)."""
        orphaned = sa.and_(runs.c.status == "running", sa.or_(
            sa.and_(runs.c.heartbeat_at.is_not(None), runs.c.heartbeat_at < stale_before),
            sa.and_(runs.c.heartbeat_at.is_(None), runs.c.created_at < running_before)))
        with self._write(log=True) as conn:
            found = conn.execute(sa.select(runs.c.run_id, runs.c.flow_id, runs.c.version)
                                 .where(orphaned).limit(batch)).all()
            if found:  # the condition again: a run that finished meanwhile keeps its outcome
                conn.execute(runs.update().where(
                    runs.c.run_id.in_([r.run_id for r in found]), orphaned,
                ).values(status="failed", error=error, finished_at=at, idempotency_key=None))
        return list(found)

    def delete_runs_before(self, cutoff: datetime, batch: int = 1000) -> int:
        """Delete up to ``batch`` finished runs created before ``cutoff``; how many."""
        old = sa.select(runs.c.run_id).where(runs.c.created_at < cutoff,
                                             runs.c.status != "running").limit(batch)
        with self._write(log=True) as conn:
            return conn.execute(runs.delete().where(runs.c.run_id.in_(old))).rowcount

    def delete_chat_before(self, cutoff: datetime, batch: int = 1000) -> int:
        """Delete up to ``batch`` chat messages written before ``cutoff``; how many."""
        old = sa.select(chat_messages.c.id).where(chat_messages.c.created_at < cutoff).limit(batch)
        with self._write(log=True) as conn:
            return conn.execute(chat_messages.delete().where(chat_messages.c.id.in_(old))).rowcount
