"""Migration 9 (flow_engine/store/schema.py): run_outcomes moves from 12 coarse duration
buckets to the 64 finer ones canary analysis reads, on a database that already has the old
table (its counts cannot be split into the new buckets: they go) and on one made at the new
layout (left as it is)."""

from __future__ import annotations

import sqlalchemy as sa

from flow_engine.rollouts.analysis import BUCKETS, bucket_of
from flow_engine.store.schema import OUTCOME_BUCKETS, schema_version
from flow_engine.store.sql import MIGRATIONS

OLD_BUCKETS = 12


def columns(store) -> set[str]:
    return {c["name"] for c in sa.inspect(store.engine).get_columns("run_outcomes")}


def histogram(seconds: float) -> list[int]:
    counts = [0] * len(BUCKETS)
    counts[bucket_of(seconds)] = 1
    return counts


def test_a_table_of_the_old_layout_is_made_anew(open_store):
    old = open_store()
    old.migrate()
    old_table = sa.Table(
        "run_outcomes", sa.MetaData(),
        sa.Column("flow_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("slot", sa.BigInteger, primary_key=True),
        sa.Column("ok", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        *(sa.Column(f"h{i}", sa.Integer, nullable=False) for i in range(OLD_BUCKETS)),
        sa.Index("ix_run_outcomes_slot", "slot"))
    with old.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE run_outcomes"))
        old_table.create(conn)
        conn.execute(old_table.insert().values(
            flow_id="rag", version=1, slot=10, ok=5, failed=0,
            **{f"h{i}": 5 if i == 3 else 0 for i in range(OLD_BUCKETS)}))
        conn.execute(schema_version.delete().where(schema_version.c.version > 8))

    fresh = open_store()  # a new process: its own connections see the old shape
    assert fresh.migrate() == len(MIGRATIONS)

    assert columns(fresh) == {"flow_id", "version", "slot", "ok", "failed",
                              *(f"h{i}" for i in range(OUTCOME_BUCKETS))}
    assert fresh.read_outcomes("rag", 1, 0, 100) == (0, 0, [0] * OUTCOME_BUCKETS)
    fresh.add_outcomes([("rag", 1, 10, 1, 0, histogram(700.0))])
    fresh.add_outcomes([("rag", 1, 10, 0, 1, histogram(700.0))])
    assert fresh.read_outcomes("rag", 1, 0, 100) == (1, 1, [0] * 62 + [2, 0])
    indexes = {ix["name"] for ix in sa.inspect(fresh.engine).get_indexes("run_outcomes")}
    assert "ix_run_outcomes_slot" in indexes


def test_a_table_made_at_the_new_layout_keeps_its_counts(store, open_store):
    store.add_outcomes([("rag", 2, 7, 3, 1, histogram(0.5))])
    with store.engine.begin() as conn:
        conn.execute(schema_version.delete().where(schema_version.c.version > 8))

    again = open_store()
    assert again.migrate() == len(MIGRATIONS)
    assert again.read_outcomes("rag", 2, 7, 7) == (3, 1, histogram(0.5))
