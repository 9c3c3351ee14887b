"""Flows and their immutable versions, and the audit log of every change to them (a part of
:class:`~flow_engine.store.sql.SqlFlowStore`).

Writes that read before they write (publish, rollback, routing, new version) hold the flow's
row lock (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two
concurrent publishes serialise and the live pointer only ever names a version that exists.
Each change appends its audit entry (``store/audit.py``) in the same transaction; the entry
is returned with the new state so the caller can log it once committed.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from flow_engine.errors import Conflict, FlowNotFound, NotFound
from flow_engine.store import audit
from flow_engine.store.base import AuditEntry, Change, FlowRecord, VersionRecord
from flow_engine.store.schema import aware, chat_messages, flow_versions, flows, now

SYSTEM = Change()  # changes made without a caller (tests, migrations)


class FlowTables:
    """Flow and version methods; needs ``_write``, ``_read``, ``_lock_flow`` and
    ``_on_audit`` (called with each entry once its change is committed)."""

    def _audited(self, entry: AuditEntry) -> None:
        audit.log(entry)
        self._on_audit(entry)

    def create_flow(self, flow_id: str, name: str, description: str,
                    definition: dict[str, Any], change: Change = SYSTEM) -> FlowRecord:
        stamp = now()
        try:
            with self._write() as conn:
                # ids and names share one namespace (runs address a flow by either, the id
                # first): a new id may not be another flow's name, nor its name another's id
                taken = conn.execute(sa.select(flows.c.id, flows.c.name).where(sa.or_(
                    flows.c.id == flow_id, flows.c.name == name, flows.c.name == flow_id,
                    flows.c.id == name))).first()
                if taken is not None:
                    raise Conflict(_taken_message(taken.id, taken.name, flow_id, name))
                conn.execute(flows.insert().values(
                    id=flow_id, name=name, description=description, latest_version=1,
                    live_version=1, live_history=[], routing=None, created_at=stamp,
                    updated_at=stamp))
                conn.execute(flow_versions.insert().values(
                    flow_id=flow_id, version=1, definition=definition, created_at=stamp))
                entry = audit.write(conn, change, "create", flow_id, to_version=1)
        except IntegrityError:  # lost a race with a concurrent create of the same id/name
            raise Conflict(f"a flow with id '{flow_id}' or name '{name}' already exists") from None
        self._audited(entry)
        return self.get_flow(flow_id)

    def add_version(self, flow_id: str, definition: dict[str, Any], name: str,
                    description: str, change: Change = SYSTEM) -> VersionRecord:
        stamp = now()
        try:
            with self._write() as conn:
                row = self._lock_flow(conn, flow_id)
                clash = conn.execute(sa.select(flows.c.id).where(
                    sa.or_(flows.c.name == name, flows.c.id == name),
                    flows.c.id != flow_id)).first()
                if clash is not None:
                    raise Conflict(f"another flow ('{clash.id}') is already called '{name}' "
                                   "(by its id or its name)")
                version = row.latest_version + 1
                conn.execute(flow_versions.insert().values(
                    flow_id=flow_id, version=version, definition=definition, created_at=stamp))
                conn.execute(flows.update().where(flows.c.id == flow_id).values(
                    latest_version=version, name=name, description=description,
                    updated_at=stamp))
                entry = audit.write(conn, change, "new_version", flow_id,
                                    from_version=row.latest_version, to_version=version)
        except IntegrityError:
            raise Conflict("the flow changed concurrently; retry") from None
        self._audited(entry)
        return VersionRecord(flow_id, version, definition, stamp)

    def get_flow(self, id_or_name: str) -> FlowRecord:
        with self._read() as conn:
            row = conn.execute(sa.select(flows).where(flows.c.id == id_or_name)).first()
            if row is None:
                row = conn.execute(sa.select(flows).where(flows.c.name == id_or_name)).first()
        if row is None:
            raise FlowNotFound(f"no flow with id or name '{id_or_name}'")
        return _flow(row)

    def list_flows(self, limit: int = 100, offset: int = 0) -> list[FlowRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(flows).order_by(flows.c.created_at, flows.c.id).limit(limit).offset(offset)
            ).all()
        return [_flow(r) for r in rows]

    def delete_flow(self, flow_id: str, change: Change = SYSTEM) -> None:
        with self._write() as conn:
            row = self._lock_flow(conn, flow_id)
            conn.execute(flow_versions.delete().where(flow_versions.c.flow_id == flow_id))
            conn.execute(chat_messages.delete().where(chat_messages.c.flow_id == flow_id))
            conn.execute(flows.delete().where(flows.c.id == flow_id))
            entry = audit.write(conn, change, "delete", flow_id, from_version=row.live_version)
        self._audited(entry)

    def get_version(self, flow_id: str, version: int) -> VersionRecord:
        with self._read() as conn:
            row = conn.execute(sa.select(flow_versions).where(
                flow_versions.c.flow_id == flow_id, flow_versions.c.version == version)).first()
        if row is None:
            raise NotFound(f"flow '{flow_id}' has no version {version}")
        return VersionRecord(row.flow_id, row.version, row.definition, aware(row.created_at))

    def list_versions(self, flow_id: str) -> list[VersionRecord]:
        with self._read() as conn:
            if conn.execute(sa.select(flows.c.id).where(flows.c.id == flow_id)).first() is None:
                raise FlowNotFound(f"no flow '{flow_id}'")
            rows = conn.execute(sa.select(flow_versions).where(
                flow_versions.c.flow_id == flow_id).order_by(flow_versions.c.version)).all()
        return [VersionRecord(r.flow_id, r.version, r.definition, aware(r.created_at)) for r in rows]

    def publish(self, flow_id: str, version: int, change: Change = SYSTEM,
                routing: dict[str, Any] | None = None) -> FlowRecord:
        """Make ``version`` live; the routing becomes ``routing`` (None: live only)."""
        with self._write() as conn:
            row = self._lock_flow(conn, flow_id)
            self._check_version(conn, row, version)
            history = list(row.live_history or [])
            if row.live_version is not None and row.live_version != version:
                history.append(row.live_version)
            conn.execute(flows.update().where(flows.c.id == flow_id).values(
                live_version=version, live_history=history[-100:], routing=routing,
                updated_at=now()))
            entry = audit.write(conn, change, "publish", flow_id, from_version=row.live_version,
                                to_version=version, routing=routing)
        self._audited(entry)
        return self.get_flow(flow_id)

    def rollback(self, flow_id: str, change: Change = SYSTEM, *,
                 expect: dict[str, Any] | None = None) -> FlowRecord:
        """Back to the previous live version; with ``expect``, only while the routing is
        still ``expect`` (the rollout controller's automatic rollback)."""
        with self._write() as conn:
            row = self._lock_flow(conn, flow_id)
            if expect is not None and row.routing != expect:
                raise Conflict(f"flow '{flow_id}' was re-routed meanwhile")
            history = list(row.live_history or [])
            if not history:
                raise Conflict(f"flow '{flow_id}' has no earlier live version to roll back to")
            previous = history.pop()
            conn.execute(flows.update().where(flows.c.id == flow_id).values(
                live_version=previous, live_history=history, routing=None, updated_at=now()))
            entry = audit.write(conn, change, "rollback", flow_id,
                                from_version=row.live_version, to_version=previous)
        self._audited(entry)
        return self.get_flow(flow_id)

    def set_routing(self, flow_id: str, routing: dict[str, Any] | None, change: Change = SYSTEM,
                    *, live: int | None = None, expect: dict[str, Any] | None = None
                    ) -> FlowRecord:
        """Set the routing (canary), and the live version with it when ``live`` is given —
        one change, one entry. With ``expect``, only while the routing is still ``expect``
        (the rollout controller's compare-and-set: a person's change in between wins)."""
        with self._write() as conn:
            row = self._lock_flow(conn, flow_id)
            if expect is not None and row.routing != expect:
                raise Conflict(f"flow '{flow_id}' was re-routed meanwhile")
            values: dict[str, Any] = {"routing": routing, "updated_at": now()}
            if live is not None and live != row.live_version:
                self._check_version(conn, row, live)
                history = list(row.live_history or [])
                if row.live_version is not None:
                    history.append(row.live_version)
                values.update(live_version=live, live_history=history[-100:])
            conn.execute(flows.update().where(flows.c.id == flow_id).values(**values))
            canary = (routing or {}).get("canary") or {}
            entry = audit.write(
                conn, change, "routing", flow_id, from_version=row.live_version,
                to_version=canary.get("version") or values.get("live_version", row.live_version),
                routing=routing)
        self._audited(entry)
        return self.get_flow(flow_id)

    def list_audit(self, flow_id: str, limit: int = 100, before: int | None = None
                   ) -> list[AuditEntry]:
        with self._read() as conn:
            return audit.entries(conn, flow_id, limit, before)

    def audit_since(self, seq: int, limit: int = 1000) -> list[AuditEntry]:
        with self._read() as conn:
            return audit.since(conn, seq, limit)

    @staticmethod
    def _check_version(conn: Any, row: Any, version: int) -> None:
        exists = conn.execute(sa.select(flow_versions.c.version).where(
            flow_versions.c.flow_id == row.id, flow_versions.c.version == version)).first()
        if exists is None:
            raise NotFound(f"flow '{row.id}' has no version {version}; "
                           f"its versions are 1..{row.latest_version}")


def _taken_message(existing_id: str, existing_name: str, flow_id: str, name: str) -> str:
    if existing_id == flow_id:
        return f"a flow with id '{flow_id}' already exists; PUT /flows/{flow_id} adds a version"
    if existing_name == flow_id:
        return (f"flow '{existing_id}' is named '{flow_id}'; a flow's id may not be another "
                "flow's name (runs address flows by either)")
    if existing_id == name:
        return (f"a flow's id is '{name}'; a flow's name may not be another flow's id (runs "
                "address flows by either)")
    return f"flow '{existing_id}' is already named '{name}'; flow names are unique"


def _flow(row: sa.Row) -> FlowRecord:
    return FlowRecord(
        id=row.id, name=row.name, description=row.description or "",
        latest_version=row.latest_version, live_version=row.live_version,
        live_history=tuple(row.live_history or ()), routing=row.routing,
        created_at=aware(row.created_at), updated_at=aware(row.updated_at),
    )
