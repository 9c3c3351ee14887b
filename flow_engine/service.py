"""Flow service logic between the API and the store: validate, version, publish, route, and
hand out compiled graphs from the compile cache."""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from flow_engine.auth import Principal
from flow_engine.components import ComponentRegistry
from flow_engine.components.subflows import SUBFLOWS, EngineSubflows
from flow_engine.config import Settings
from flow_engine.errors import BadRequest, FlowInvalid, Forbidden, NotFound, Problem
from flow_engine.flows.compile import CompileCache, CompiledFlow, compile_flow, tweaks_digest
from flow_engine.flows.diff import diff_definitions
from flow_engine.flows.model import FlowDefinition, FlowVersion
from flow_engine.flows.validate import apply_tweaks, tweak_problems, validate_flow
from flow_engine.metrics import EngineMetrics
from flow_engine.routing import choose_version, parse_routing
from flow_engine.store.base import Change, FlowRecord, FlowStore, VersionRecord
from flowgate.common.signals import Signals

SYSTEM = Change()


class FlowService:
    def __init__(self, store: FlowStore, registry: ComponentRegistry, settings: Settings,
                 metrics: EngineMetrics, signals: Signals | None = None,
                 lookups: Mapping[str, Any] | None = None) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        # engine-side lookups components consult when validating and building (e.g.
        # {"knowledge": KnowledgeService}: which bases exist, and how to search them)
        lookups = dict(lookups or {})
        self.limits = dataclasses.replace(settings.limits, extra=lookups)
        base = settings.build_context
        self.build_context = dataclasses.replace(base, extra={
            "chat_memory": store, SUBFLOWS: EngineSubflows(self), **lookups})
        hits, misses = metrics.compile_cache.labels("hit"), metrics.compile_cache.labels("miss")
        # Versions and tweaked variants are kept apart: callers choose tweaks, so however
        # many distinct ones they send, they can take at most half the budget and never
        # evict the compiled versions every other run needs.
        held = metrics.compile_cache_bytes
        self.cache = CompileCache(settings.compile_cache_size, on_hit=hits.inc,
                                  on_miss=misses.inc, max_bytes=settings.compile_cache_bytes,
                                  on_size=held.labels("versions").set)
        self.tweaked_cache = CompileCache(settings.compile_cache_size, on_hit=hits.inc,
                                          on_miss=misses.inc,
                                          max_bytes=settings.compile_cache_bytes // 2,
                                          on_size=held.labels("tweaked").set)
        # Flow rows (live pointer, routing) seen by runs, kept briefly: a run then costs no
        # store read. Writes through this service forget them at once in this process;
        # other processes see a change within flow_cache_ttl_s.
        self._flow_cache: dict[str, tuple[float, FlowRecord]] = {}
        self._flow_ttl = settings.flow_cache_ttl_s
        self.signals = signals
        if signals is not None:
            signals.on("flow_changed", lambda m: self._forget_local(m.get("flow_id"), m.get("name")))

    # -- definitions -------------------------------------------------------------------------

    def validate(self, data: Any, flow_id: str | None = None) -> FlowDefinition:
        return validate_flow(data, self.registry, self.limits, flow_id=flow_id)

    def create(self, data: Any, change: Change = SYSTEM) -> FlowRecord:
        flow_id = None
        if isinstance(data, dict) and "id" not in data:
            flow_id = _new_id(data.get("name"))
        definition = self.validate(data, flow_id)
        raw = {**definition.raw, "id": definition.id, "name": definition.name}
        return self.store.create_flow(definition.id, definition.name, definition.description,
                                      raw, change)

    def new_version(self, flow_id: str, data: Any, change: Change = SYSTEM) -> VersionRecord:
        flow = self.store.get_flow(flow_id)
        if isinstance(data, dict) and data.get("id", flow.id) != flow.id:
            raise BadRequest(f"the body's id '{data.get('id')}' does not match the flow '{flow.id}'")
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": flow.name}
        definition = self.validate(data, flow.id)
        raw = {**definition.raw, "id": flow.id, "name": definition.name}
        return self.store.add_version(flow.id, raw, definition.name, definition.description,
                                      change)

    def set_routing(self, flow_ref: str, body: Any, change: Change = SYSTEM, *,
                    dry_run: bool = False) -> FlowRecord | None:
        """Route (a canary, a new live version): every version it would send runs to is
        built first (422 if one cannot be); ``dry_run`` checks and changes nothing."""
        flow = self.store.get_flow(flow_ref)
        live, routing = parse_routing(body, flow.latest_version)
        canary = (routing or {}).get("canary")
        for version in {live, canary and canary["version"]} - {None}:
            self.check_builds(flow, version)
        if dry_run:
            return None
        if canary and canary.get("guard"):  # the rollout controller judges from here
            canary["started_at"] = time.time()
            if canary.get("steps"):
                canary["step_started_at"] = canary["started_at"]
        try:
            return self.store.set_routing(flow.id, routing, change, live=live)
        finally:
            self.forget(flow)

    def publish(self, flow_ref: str, version: int, change: Change = SYSTEM, *,
                dry_run: bool = False, guard: dict[str, Any] | None = None) -> FlowRecord | None:
        """Make ``version`` live once it builds (422 otherwise). With ``guard``, the new live
        version is watched against the previous one and rolled back on a breach."""
        flow = self.store.get_flow(flow_ref)
        self.check_builds(flow, version)
        if dry_run:
            return None
        watch = None
        if guard is not None and flow.live_version not in (None, version):
            watch = {"watch": {"guard": guard, "previous": flow.live_version,
                               "started_at": time.time()}}
        try:
            return self.store.publish(flow.id, version, change, routing=watch)
        finally:
            self.forget(flow)

    def rollback(self, flow_ref: str, change: Change = SYSTEM) -> FlowRecord:
        flow = self.store.get_flow(flow_ref)
        if flow.live_history:
            self.check_builds(flow, flow.live_history[-1])
        try:
            return self.store.rollback(flow.id, change)
        finally:
            self.forget(flow)

    def delete(self, flow_ref: str, change: Change = SYSTEM) -> None:
        flow = self.store.get_flow(flow_ref)
        try:
            self.store.delete_flow(flow.id, change)
        finally:
            self.forget(flow)

    def check_builds(self, flow: FlowRecord, version: int) -> None:
        """Build ``version`` as a run would (validate with this engine's settings, compile,
        build every component) — 422 when it cannot go live. Cached: the run after a
        publish finds it compiled."""
        try:
            self.compiled(flow, version)
        except FlowInvalid as exc:
            raise FlowInvalid(exc.problems, f"version {version} cannot go live: {exc.message}"
                              ) from None
        except (ValueError, TypeError) as exc:  # a component refused its params at build
            raise FlowInvalid([Problem("$", f"version {version} does not build: "
                                            f"{str(exc)[:300]}")]) from None

    # -- history -------------------------------------------------------------------------------

    def audit(self, flow_ref: str, limit: int, before: int | None) -> tuple[FlowRecord | None, list]:
        """A flow's audit entries, newest first (also of a flow deleted since)."""
        try:
            flow = self.store.get_flow(flow_ref)
        except NotFound:
            flow = None
        return flow, self.store.list_audit(flow.id if flow else flow_ref, limit, before)

    def diff(self, flow_ref: str, a: int, b: int) -> dict[str, Any]:
        flow = self.store.get_flow(flow_ref)
        before, after = self.store.get_version(flow.id, a), self.store.get_version(flow.id, b)
        return {"flow_id": flow.id, "from": a, "to": b,
                **diff_definitions(before.definition, after.definition)}

    def forget(self, flow: FlowRecord) -> None:
        """Drop the cached flow row here, and (with Redis) in every other process."""
        self._forget_local(flow.id, flow.name)
        if self.signals is not None:
            self.signals.publish("flow_changed", flow_id=flow.id, name=flow.name)

    def _forget_local(self, flow_id: str | None, name: str | None) -> None:
        for key in (flow_id, name):
            if key is not None:
                self._flow_cache.pop(key, None)

    # -- running -------------------------------------------------------------------------------

    def resolve(self, id_or_name: str, *, pinned: int | None, sticky_value: str | None,
                caller: Principal | None = None) -> tuple[FlowRecord, int]:
        """The flow and the version that serves this request. A runner may pin only a
        version routing could serve (live or canary); testing others needs editor."""
        flow = self._cached_flow(id_or_name)
        if pinned is not None and caller is not None and not caller.may("editor"):
            canary = (flow.routing or {}).get("canary") or {}
            servable = {flow.live_version}
            if canary.get("percent", 0) > 0:
                servable.add(canary.get("version"))
            if pinned not in servable:
                raise Forbidden(f"version {pinned} of flow '{flow.id}' is neither live nor a "
                                "canary; running it needs the editor role", role="editor")
        return flow, choose_version(flow, pinned=pinned, sticky_value=sticky_value)

    def _cached_flow(self, id_or_name: str) -> FlowRecord:
        now = time.monotonic()
        hit = self._flow_cache.get(id_or_name)
        if hit is not None and hit[0] > now:
            return hit[1]
        flow = self.store.get_flow(id_or_name)
        if self._flow_ttl > 0:
            if len(self._flow_cache) > 10_000:
                self._flow_cache.clear()
            self._flow_cache[id_or_name] = (now + self._flow_ttl, flow)
        return flow

    def compiled(self, flow: FlowRecord, version: int,
                 tweaks: Mapping[str, Any] | None = None) -> CompiledFlow:
        """The compiled graph of a version (cached; tweaked variants cached separately).

        The key holds the flow's creation time too: a flow deleted and created again under
        the same id starts a new line of versions, and no process may serve the old one."""
        key = (flow.id, flow.created_at.timestamp(), version, tweaks_digest(tweaks))
        cache = self.tweaked_cache if tweaks else self.cache
        return cache.get_or_compile(key, lambda: self._compile(flow.id, version, tweaks))

    def _compile(self, flow_id: str, version: int, tweaks: Mapping[str, Any] | None) -> CompiledFlow:
        record = self.store.get_version(flow_id, version)
        raw = apply_tweaks(record.definition, tweaks, self.registry) if tweaks else record.definition
        try:
            definition = self.validate(raw, flow_id)
        except FlowInvalid as exc:
            if not tweaks:
                raise
            raise FlowInvalid(tweak_problems(exc.problems, raw, tweaks)) from None
        return compile_flow(FlowVersion(flow_id, version, definition), self.registry,
                            self.build_context)


def _new_id(name: Any) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] if isinstance(name, str) else ""
    return f"{slug or 'flow'}-{secrets.token_hex(4)}"
