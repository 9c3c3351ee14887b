"""Durable state: flows, their immutable versions, run records and chat history.

Only this package touches SQL. :class:`~flow_engine.store.base.FlowStore` is the interface;
:class:`~flow_engine.store.sql.SqlFlowStore` implements it once with SQLAlchemy Core for
SQLite (the embedded default, WAL mode) and PostgreSQL (``DATABASE_URL``).
"""

from flow_engine.store.base import (
    ChatMessage,
    FlowRecord,
    FlowStore,
    RunRecord,
    StoreError,
    VersionRecord,
)
from flow_engine.store.sql import SqlFlowStore

__all__ = ["ChatMessage", "FlowRecord", "FlowStore", "RunRecord", "SqlFlowStore", "StoreError",
           "VersionRecord"]
