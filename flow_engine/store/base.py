"""The store interface and its records (plain values; no SQL types leak out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from flow_engine.errors import FlowgateError


class StoreError(FlowgateError):
    """The database failed (unreachable, locked too long, ...): 503, the request may be retried."""

    status, code = 503, "store_unavailable"


@dataclass(frozen=True)
class FlowRecord:
    id: str
    name: str
    description: str
    latest_version: int
    live_version: int | None
    live_history: tuple[int, ...]  # earlier live versions, most recent last (for rollback)
    routing: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    flow_id: str
    version: int
    definition: dict[str, Any]
    created_at: datetime


@dataclass
class RunRecord:
    run_id: str
    flow_id: str
    version: int
    status: str  # running | succeeded | failed | cancelled
    created_at: datetime
    session_id: str | None = None
    trace_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    heartbeat_at: datetime | None = None  # keyed runs: refreshed by the owner while running
    tenant: str | None = None  # who may see it (flow_engine/auth.py); None: from before tenants
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """Who makes a change to a flow, and why: the store writes it to the audit log in the
    transaction of the change. ``action`` overrides the operation's own name (a routing
    change made by the rollout controller is a ``canary_step``, …); ``reason`` holds the
    measured figures of an automatic action."""

    actor: str = "system"
    message: str | None = None
    trace_id: str | None = None
    action: str | None = None
    reason: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str
    action: str  # create | new_version | publish | rollback | routing | delete | canary_* | auto_rollback
    flow_id: str
    from_version: int | None
    to_version: int | None
    routing: dict[str, Any] | None
    reason: dict[str, Any] | None
    message: str | None
    trace_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at.isoformat(), "actor": self.actor,
                "action": self.action, "flow_id": self.flow_id,
                "from_version": self.from_version, "to_version": self.to_version,
                "routing": self.routing, "reason": self.reason, "message": self.message,
                "trace_id": self.trace_id}


@dataclass(frozen=True)
class ChatMessage:
    role: str  # human | ai
    content: str


class FlowStore(Protocol):
    """Everything the engine persists. Implementations raise the errors of
    :mod:`flow_engine.errors` (FlowNotFound, Conflict, ...) and StoreError, never driver errors."""

    def ping(self) -> None: ...

    # flows and versions
    def create_flow(self, flow_id: str, name: str, description: str,
                    definition: dict[str, Any], change: Change = ...) -> FlowRecord: ...
    def add_version(self, flow_id: str, definition: dict[str, Any], name: str,
                    description: str, change: Change = ...) -> VersionRecord: ...
    def get_flow(self, id_or_name: str) -> FlowRecord: ...
    def list_flows(self, limit: int = 100, offset: int = 0) -> list[FlowRecord]: ...
    def delete_flow(self, flow_id: str, change: Change = ...) -> None: ...
    def get_version(self, flow_id: str, version: int) -> VersionRecord: ...
    def list_versions(self, flow_id: str) -> list[VersionRecord]: ...
    def publish(self, flow_id: str, version: int, change: Change = ...,
                routing: dict[str, Any] | None = None) -> FlowRecord: ...
    def rollback(self, flow_id: str, change: Change = ..., *,
                 expect: dict[str, Any] | None = None) -> FlowRecord: ...
    def set_routing(self, flow_id: str, routing: dict[str, Any] | None, change: Change = ..., *,
                    live: int | None = None, expect: dict[str, Any] | None = None
                    ) -> FlowRecord: ...

    # every change to a flow, written with it (store/audit.py)
    def list_audit(self, flow_id: str, limit: int = 100,
                   before: int | None = None) -> list[AuditEntry]: ...
    def audit_since(self, seq: int, limit: int = 1000) -> list[AuditEntry]: ...

    # per-version run outcomes and guarded rollouts (store/outcome_tables.py)
    def add_outcomes(self, rows: Any) -> None: ...
    def read_outcomes(self, flow_id: str, version: int, first_slot: int,
                      last_slot: int) -> tuple[int, int, list[int]]: ...
    def guarded_flows(self, limit: int = 1000) -> list[FlowRecord]: ...

    # runs
    def insert_run(self, record: RunRecord) -> RunRecord | None:
        """Insert; when the idempotency key is taken, return the existing record instead."""
        ...
    def claim_runs(self, records: list[RunRecord]) -> set[str]:
        """Insert many keyed runs in one transaction, skipping those whose run id or key is
        taken; the run ids inserted (runs/claims.py)."""
        ...
    def finish_run(self, run_id: str, *, status: str, duration_ms: float,
                   result: dict[str, Any] | None, error: dict[str, Any] | None) -> None: ...
    def record_run_ends(self, inserts: list[RunRecord], finishes: list[dict[str, Any]]) -> None:
        """Many runs' ends in one transaction (whole records, and ends of keyed runs)."""
        ...
    def get_run(self, run_id: str) -> RunRecord: ...
    def list_runs(self, *, tenant: str | None, flow_id: str | None, limit: int,
                  before: datetime | None = None) -> list[RunRecord]:
        """Recorded runs, newest first: of ``tenant`` (None: every tenant's), of ``flow_id``
        (None: any), created before ``before``."""
        ...
    def find_run_by_key(self, idempotency_key: str) -> RunRecord | None:
        """The run holding a (tenant-scoped, see runs/idempotency.py) idempotency key."""
        ...
    def delete_run(self, run_id: str) -> None: ...
    def heartbeat(self, run_ids: list[str]) -> None: ...
    def abandon_run(self, run_id: str, heartbeat_at: datetime, error: dict[str, Any]) -> bool: ...

    # chat memory: one conversation per (tenant, session, flow)
    def chat_history(self, tenant: str, session_id: str, flow_id: str,
                     limit: int) -> list[ChatMessage]: ...
    def append_chat(self, tenant: str, session_id: str, flow_id: str,
                    messages: list[ChatMessage]) -> None: ...
