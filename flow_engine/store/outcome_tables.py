"""Run outcomes per flow version and time slot, and the flows whose rollouts are guarded (a
part of :class:`~flow_engine.store.sql.SqlFlowStore`; the rollout controller's data when the
engine has no Redis — flow_engine/rollouts/outcomes.py), in the table ``run_outcome_slots``
(64 buckets; engines of the 12-bucket layout use ``run_outcomes``, which this one never
touches: flow_engine/store/schema.py, migration 9).

Each engine process adds its counts of a slot with one upsert per (flow, version, slot), so
the table holds the sum over every process; nothing is ever read back and rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from flow_engine.store.base import FlowRecord
from flow_engine.store.flow_tables import _flow
from flow_engine.store.schema import OUTCOME_BUCKETS, flows, run_outcome_slots

_COUNTS = ("ok", "failed", *(f"h{i}" for i in range(OUTCOME_BUCKETS)))


class OutcomeTables:
    """Mixed into SqlFlowStore (it provides ``_read``, ``_write``, ``is_sqlite``)."""

    def add_outcomes(self, rows: Iterable[tuple[str, int, int, int, int, list[int]]]) -> None:
        """Add ``(flow_id, version, slot, ok, failed, histogram)`` counts, in one transaction."""
        values = [{"flow_id": f, "version": v, "slot": s, "ok": ok, "failed": failed,
                   **{f"h{i}": n for i, n in enumerate(histogram)}}
                  for f, v, s, ok, failed, histogram in rows]
        if not values:
            return
        insert = (sqlite if self.is_sqlite else postgresql).insert(run_outcome_slots)
        upsert = insert.on_conflict_do_update(
            index_elements=["flow_id", "version", "slot"],
            set_={c: run_outcome_slots.c[c] + insert.excluded[c] for c in _COUNTS})
        with self._write(log=True) as conn:
            conn.execute(upsert, values)

    def read_outcomes(self, flow_id: str, version: int, first_slot: int, last_slot: int
                      ) -> tuple[int, int, list[int]]:
        """``(ok, failed, histogram)`` summed over the slots ``first_slot..last_slot``."""
        query = sa.select(*(sa.func.coalesce(sa.func.sum(run_outcome_slots.c[c]), 0) for c in _COUNTS)
                          ).where(run_outcome_slots.c.flow_id == flow_id,
                                  run_outcome_slots.c.version == version,
                                  run_outcome_slots.c.slot.between(first_slot, last_slot))
        with self._read() as conn:
            row = [int(n) for n in conn.execute(query).one()]
        return row[0], row[1], row[2:]

    def delete_outcomes_before(self, slot: int, batch: int = 1000) -> int:
        """Delete up to ``batch`` outcome rows of slots before ``slot``; how many."""
        old = (sa.select(run_outcome_slots.c.flow_id, run_outcome_slots.c.version, run_outcome_slots.c.slot)
               .where(run_outcome_slots.c.slot < slot).limit(batch))
        key = sa.tuple_(run_outcome_slots.c.flow_id, run_outcome_slots.c.version, run_outcome_slots.c.slot)
        with self._write(log=True) as conn:
            if self.is_sqlite:  # SQLite has no IN over a tuple subquery; rowid does it
                return conn.execute(run_outcome_slots.delete().where(sa.literal_column("rowid").in_(
                    sa.select(sa.literal_column("rowid")).select_from(run_outcome_slots)
                    .where(run_outcome_slots.c.slot < slot).limit(batch)))).rowcount
            return conn.execute(run_outcome_slots.delete().where(key.in_(old))).rowcount

    def guarded_flows(self, limit: int = 1000) -> list[FlowRecord]:
        """Flows whose routing a rollout controller watches (a guarded canary or publish)."""
        text = sa.cast(flows.c.routing, sa.Text)
        with self._read() as conn:
            rows = conn.execute(sa.select(flows).where(
                flows.c.routing.is_not(None),
                sa.or_(text.contains('"guard"'), text.contains('"watch"')),
            ).order_by(flows.c.id).limit(limit)).all()
        return [_flow(r) for r in rows]
