"""Migration 9 (flow_engine/store/schema.py): run outcomes with the 64 finer duration buckets
canary analysis reads go to a table of a new name, ``run_outcome_slots``. The 12-bucket
``run_outcomes`` stays as it is, rows and all: during a rolling upgrade the engines still on
the old layout keep reading and writing it, and never read a count of the new buckets with
the old meaning (where a slow canary would look fast). The new engine reads and writes only
the new table. On both backends (the ``store``/``open_store`` fixtures)."""

from __future__ import annotations

import sqlalchemy as sa

from flow_engine.rollouts.analysis import BUCKETS, bucket_of
from flow_engine.store.schema import OUTCOME_BUCKETS, schema_version
from flow_engine.store.sql import MIGRATIONS

OLD_BUCKETS = 12
OLD_COLUMNS = {"flow_id", "version", "slot", "ok", "failed", *(f"h{i}" for i in range(OLD_BUCKETS))}
NEW_COLUMNS = {"flow_id", "version", "slot", "ok", "failed",
               *(f"h{i}" for i in range(OUTCOME_BUCKETS))}
# the table as engines before migration 9 made, read and wrote it (written out here, not
# taken from the code under test)
OLD_TABLE = sa.Table(
    "run_outcomes", sa.MetaData(),
    sa.Column("flow_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("slot", sa.BigInteger, primary_key=True),
    sa.Column("ok", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    *(sa.Column(f"h{i}", sa.Integer, nullable=False) for i in range(OLD_BUCKETS)),
    sa.Index("ix_run_outcomes_slot", "slot"))
OLD_ROWS = [
    {"flow_id": "rag", "version": 1, "slot": 10, "ok": 5, "failed": 0,
     **{f"h{i}": 5 if i == 3 else 0 for i in range(OLD_BUCKETS)}},
    {"flow_id": "rag", "version": 2, "slot": 11, "ok": 1, "failed": 2,
     **{f"h{i}": 3 if i == 11 else 0 for i in range(OLD_BUCKETS)}},  # h11: the slowest
]


def columns(store, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(store.engine).get_columns(table)}


def indexes(store, table: str) -> set[str]:
    return {ix["name"] for ix in sa.inspect(store.engine).get_indexes(table)}


def old_rows(store) -> list[dict]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(OLD_TABLE).order_by(OLD_TABLE.c.version)).mappings()
        return [dict(r) for r in rows]


def new_table_rows(store) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT flow_id, version, slot, ok, failed FROM run_outcome_slots "
            "ORDER BY flow_id, version, slot"))]


def histogram(seconds: float) -> list[int]:
    counts = [0] * len(BUCKETS)
    counts[bucket_of(seconds)] = 1
    return counts


def at_schema_8_with_old_outcomes(open_store):
    """A database as engines before migration 9 left it: schema 8, the 12-bucket
    run_outcomes holding counts."""
    old = open_store()
    old.migrate()
    with old.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS run_outcome_slots"))
        conn.execute(sa.text("DROP TABLE IF EXISTS run_outcomes"))
        OLD_TABLE.create(conn)
        conn.execute(OLD_TABLE.insert(), OLD_ROWS)
        conn.execute(schema_version.delete().where(schema_version.c.version > 8))
    return old


def test_the_new_layout_goes_to_a_new_table_and_the_old_one_is_left_to_old_engines(open_store):
    old_engine = at_schema_8_with_old_outcomes(open_store)

    fresh = open_store()  # a new engine process: its own connections see the old shape
    assert fresh.migrate() == len(MIGRATIONS)

    # the old table, its index and its rows are untouched
    assert columns(fresh, "run_outcomes") == OLD_COLUMNS
    assert "ix_run_outcomes_slot" in indexes(fresh, "run_outcomes")
    assert old_rows(fresh) == OLD_ROWS
    # the new table, at the new layout, starts empty: old counts are never read as new ones
    assert columns(fresh, "run_outcome_slots") == NEW_COLUMNS
    assert "ix_run_outcome_slots_slot" in indexes(fresh, "run_outcome_slots")
    assert fresh.read_outcomes("rag", 1, 0, 100) == (0, 0, [0] * OUTCOME_BUCKETS)
    assert fresh.read_outcomes("rag", 2, 0, 100) == (0, 0, [0] * OUTCOME_BUCKETS)

    # the new engine writes and reads the new table only
    fresh.add_outcomes([("rag", 1, 10, 1, 0, histogram(700.0))])
    fresh.add_outcomes([("rag", 1, 10, 0, 1, histogram(700.0))])
    assert fresh.read_outcomes("rag", 1, 0, 100) == (1, 1, [0] * 62 + [2, 0])
    assert new_table_rows(fresh) == [("rag", 1, 10, 1, 1)]
    assert old_rows(fresh) == OLD_ROWS

    # an engine of the old layout, still running, keeps adding to and reading its own table
    old_add = sa.text("UPDATE run_outcomes SET ok = ok + 2, h11 = h11 + 2 "
                      "WHERE flow_id = 'rag' AND version = 2 AND slot = 11")
    with old_engine.engine.begin() as conn:
        assert conn.execute(old_add).rowcount == 1
    assert old_rows(old_engine)[1] == {**OLD_ROWS[1], "ok": 3, "h11": 5}
    assert fresh.read_outcomes("rag", 2, 0, 100) == (0, 0, [0] * OUTCOME_BUCKETS)

    # the new engine's retention deletes from its own table only
    assert fresh.delete_outcomes_before(10_000) == 1
    assert new_table_rows(fresh) == []
    assert len(old_rows(fresh)) == 2


def test_a_new_database_reads_and_writes_the_new_table(store):
    store.add_outcomes([("rag", 2, 7, 3, 1, histogram(0.5))])
    assert new_table_rows(store) == [("rag", 2, 7, 3, 1)]
    assert old_rows(store) == []  # made by migration 7 (for engines of the old layout), unused
    assert columns(store, "run_outcome_slots") == NEW_COLUMNS


def test_migration_9_again_keeps_the_new_table_s_counts(store, open_store):
    store.add_outcomes([("rag", 2, 7, 3, 1, histogram(0.5))])
    with store.engine.begin() as conn:
        conn.execute(schema_version.delete().where(schema_version.c.version > 8))

    again = open_store()
    assert again.migrate() == len(MIGRATIONS)
    assert again.read_outcomes("rag", 2, 7, 7) == (3, 1, histogram(0.5))
