"""Engine settings: defaults < environment < an explicit mapping (tests).

Environment names are ``FLOW_ENGINE_<FIELD>`` (``FLOW_ENGINE_MAX_NODES``), plus the plain
names DESIGN.md documents: ``DATABASE_URL``, ``REDIS_URL``, ``OPENAI_BASE_URL``,
``OPENAI_API_KEY``. ``FLOW_ENGINE_API_KEYS`` is comma-separated (``name:role:secret``
entries, see :mod:`flow_engine.auth`); so are ``FLOW_ENGINE_PROVIDER_ORIGINS`` and
``FLOW_ENGINE_WS_ALLOWED_ORIGINS``. ``FLOW_ENGINE_TENANT_LIMITS`` is a JSON object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flow_engine.auth import KeyConfigError, KeyRing, parse_key, unique_keys
from flow_engine.components.base import BuildContext, Limits
from flow_engine.egress import EgressError, ProviderOrigins
from flow_engine.tenants import Quota, TenantPolicy
from flowgate.common import jsonlog

_PLAIN_ENV = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "openai_base_url": "OPENAI_BASE_URL",
    "openai_api_key": "OPENAI_API_KEY",
}


class ConfigError(ValueError):
    """A setting has a value the engine cannot start with; the message names it."""


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = ()
    api_key_file: str | None = None
    insecure_no_auth: bool = False
    database_url: str = "sqlite:///flowgate.db"
    redis_url: str | None = None
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    max_nodes: int = 100
    max_edges: int = 400
    max_template_chars: int = 20_000
    max_definition_bytes: int = 2_000_000
    max_body_bytes: int = 4 * 1024 * 1024
    compile_cache_size: int = 512
    # estimated bytes of compiled graphs kept (flow_engine/flows/compile.py); tweaked
    # variants get at most half of it
    compile_cache_bytes: int = 256 * 1024 * 1024
    # origins (scheme://host[:port]) that receive OPENAI_API_KEY besides OPENAI_BASE_URL's;
    # "keyless:ORIGIN" lets flows call ORIGIN without the key (flow_engine/egress.py)
    provider_origins: tuple[str, ...] = ()
    # the model names flows use → what the configured endpoint serves ("gpt-4o-mini=llama3.1:8b,
    # gpt-4o=llama3.1:70b"): the same flows run on OpenAI, Ollama or vLLM
    model_aliases: str = ""
    # per-tenant limits (flow_engine/tenants.py): 0 = unlimited; JSON overrides per tenant
    tenant_max_runs: int = 0
    tenant_tokens_per_minute: int = 0
    tenant_limits: str = ""
    # every +proxy key: all the tenants it forwards together (its own included), so a proxy
    # cannot multiply the per-tenant limits by inventing tenant names; 0 = no such cap
    proxy_max_runs: int = 0
    proxy_tokens_per_minute: int = 0
    idempotency_ttl_s: int = 24 * 3600
    idempotency_wait_s: float = 300.0
    sse_keepalive_s: float = 15.0
    ws_ping_interval_s: float = 25.0  # WebSocket heartbeat; 0 = no pings
    ws_idle_timeout_s: float = 300.0  # close a WebSocket with no run and no message; 0 = never
    ws_max_connections: int = 500  # open WebSockets per process; more are closed with 1013
    # Origins a browser may open the WebSocket from; empty: same origin only ("*": any)
    ws_allowed_origins: tuple[str, ...] = ()
    # With --insecure-no-auth only: Host names answered besides loopback ones (a page on a
    # rebound DNS name would otherwise be "same origin" with an engine that checks no key)
    allowed_hosts: tuple[str, ...] = ()
    flow_cache_ttl_s: float = 0.5
    event_ttl_s: float = 3600.0
    event_memory_runs: int = 2000
    # estimated bytes (JSON length) of run events a process keeps in memory, all runs together
    event_memory_bytes: int = 64 * 1024 * 1024
    shared_events_grace_s: float = 2.0
    # every Redis call gives up after this long (a blocking read: twice this), so a hung
    # Redis costs a request that much and no more (flow_engine/runs/redis_events.py)
    redis_timeout_s: float = 1.5
    # a batch of run events Redis refused is retried with backoff this long, then dropped
    # (watchers elsewhere are told: events_lost)
    event_write_retry_s: float = 10.0
    # connections per database pool; each process has two pools (flows, run records), so it
    # opens at most 2 * (pool_size + max_overflow): keep replicas * workers * that below
    # PostgreSQL's max_connections (100 by default)
    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout_s: float = 10.0  # waiting for a free connection longer is a 503
    # a run's end the store refused is written again in the background for this long
    record_retry_s: float = 60.0
    # runs' ends are written in batches off the request path, one transaction per batch:
    # the writer waits this long for more ends to join one (runs/record_writer.py). 20 ms,
    # not 2: at concurrency 1 a 2 ms wait wrote one run per transaction, between two
    # requests of the same worker (engine p50 2.3 → 1.4 ms in bench/engine_http.py)
    record_batch_s: float = 0.02
    # the maintenance job (one process at a time; flow_engine/maintenance.py), every
    # maintenance_interval_s (0 = never): it marks runs without a live owner failed —
    # keyed runs not marked alive for run_stale_s, others running for longer than run_max_s
    # — and deletes finished runs and chat messages older than their retention
    maintenance_interval_s: float = 300.0
    run_stale_s: float = 60.0
    run_max_s: float = 24 * 3600.0
    run_retention_s: float = 7 * 24 * 3600.0
    chat_retention_s: float = 30 * 24 * 3600.0
    # guarded rollouts (flow_engine/rollouts/): run outcomes reach the shared window every
    # outcome_flush_s; one process at a time judges guarded flows every rollout_interval_s
    # (0 = never: guards are stored but nothing acts on them)
    outcome_flush_s: float = 1.0
    rollout_interval_s: float = 2.0
    log_level: str = "INFO"
    # knowledge bases (flow_engine/knowledge/settings.py says what each one does)
    knowledge: str = "auto"  # auto | on | off
    max_upload_bytes: int = 20 * 1024 * 1024
    knowledge_ingest_concurrency: int = 2
    knowledge_embed_batch: int = 64
    knowledge_embed_retries: int = 4
    knowledge_embed_timeout_s: float = 60.0
    knowledge_max_chunks: int = 20_000
    knowledge_max_pdf_pages: int = 2_000
    knowledge_max_pdf_objects: int = 200_000
    knowledge_hnsw_ef_search: int = 400
    knowledge_stale_s: float = 30.0
    knowledge_max_attempts: int = 3
    knowledge_cache_bytes: int = 512 * 1024 * 1024

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"FLOW_ENGINE_{f.name.upper()}")
            if raw is None and f.name in _PLAIN_ENV:
                raw = env.get(_PLAIN_ENV[f.name])
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f.name, raw.strip(), f.default)
        values.update(overrides or {})
        for name in ("api_keys", "provider_origins", "ws_allowed_origins", "allowed_hosts"):
            if isinstance(values.get(name), str):
                values[name] = _split(values[name])
        if "log_level" in values:
            try:
                values["log_level"] = jsonlog.level_name(values["log_level"])
            except ValueError as exc:
                raise ConfigError(f"FLOW_ENGINE_LOG_LEVEL: {exc}") from None
        return replace(cls(), **values)

    def all_api_keys(self) -> tuple[str, ...]:
        """Keys from FLOW_ENGINE_API_KEYS plus the key file (one key per line, # comments)."""
        return tuple(entry for _where, entry in self._key_entries())

    def _key_entries(self) -> list[tuple[str, str]]:
        """Each key entry with where it is written, for messages that must name an entry
        without quoting it (any part of it may be a secret). A key-file line is stripped
        before it is judged a comment or blank: an indented ``# rotate quarterly`` is a
        comment, never a key."""
        entries = [(f"FLOW_ENGINE_API_KEYS (entry {i})", entry)
                   for i, entry in enumerate((k.strip() for k in self.api_keys if k.strip()), 1)]
        if self.api_key_file:
            try:
                text = Path(self.api_key_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"FLOW_ENGINE_API_KEY_FILE={self.api_key_file}: cannot read it ({exc.strerror})"
                ) from None
            for number, line in enumerate(text.splitlines(), 1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    entries.append((f"FLOW_ENGINE_API_KEY_FILE={self.api_key_file} (line {number})",
                                    entry))
        return entries

    def check_auth(self) -> KeyRing:
        """The accepted keys; refuses to run without one unless insecure_no_auth is set."""
        parsed = []
        for where, entry in self._key_entries():
            try:
                parsed.append(parse_key(entry))
            except KeyConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        try:
            keys = KeyRing(unique_keys(parsed))
        except KeyConfigError as exc:
            where = "FLOW_ENGINE_API_KEYS" + (" and FLOW_ENGINE_API_KEY_FILE"
                                              if self.api_key_file else "")
            raise ConfigError(f"{where}: {exc}") from None
        if not keys and not self.insecure_no_auth:
            raise ConfigError(
                "no API key configured: set FLOW_ENGINE_API_KEYS (comma-separated "
                "name:role:secret entries) or FLOW_ENGINE_API_KEY_FILE, or start with "
                "--insecure-no-auth (FLOW_ENGINE_INSECURE_NO_AUTH=1) for local development only"
            )
        return keys

    def tenant_policy(self, keys: KeyRing) -> TenantPolicy:
        """Per-tenant limits; the keys' names are known tenants (flow_engine/tenants.py)."""
        try:
            return TenantPolicy.parse(self.tenant_max_runs, self.tenant_tokens_per_minute,
                                      self.tenant_limits, known=keys.names(),
                                      proxy=Quota(self.proxy_max_runs,
                                                  self.proxy_tokens_per_minute))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check(self) -> KeyRing:
        """Every setting the engine cannot start with, at once (``flowgate engine`` runs
        this in the master, so a bad setting stops it with a message, not a crash loop)."""
        keys = self.check_auth()
        self.tenant_policy(keys)
        _ = self.egress
        _ = self.aliases
        from flow_engine.knowledge.settings import KnowledgeSettings

        try:
            KnowledgeSettings.from_settings(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return keys

    @property
    def aliases(self) -> dict[str, str]:
        """FLOW_ENGINE_MODEL_ALIASES as {name a flow uses: model the endpoint serves}."""
        aliases: dict[str, str] = {}
        for entry in _split(self.model_aliases):
            name, sep, target = (part.strip() for part in entry.partition("="))
            if not sep or not name or not target:
                raise ConfigError(f"FLOW_ENGINE_MODEL_ALIASES: {entry!r} is not name=model "
                                  "(e.g. gpt-4o-mini=llama3.1:8b, comma-separated)")
            if name in aliases:
                raise ConfigError(f"FLOW_ENGINE_MODEL_ALIASES: {name!r} is given twice")
            aliases[name] = target
        return aliases

    @property
    def egress(self) -> ProviderOrigins:
        """Where ChatModel requests (and the provider key) may go; ConfigError if unsafe."""
        try:
            return ProviderOrigins.from_settings(self.openai_base_url, self.openai_api_key,
                                                 self.provider_origins)
        except EgressError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def limits(self) -> Limits:
        return Limits(self.max_nodes, self.max_edges, self.max_template_chars,
                      self.max_definition_bytes, egress=self.egress)

    @property
    def build_context(self) -> BuildContext:
        return BuildContext(openai_base_url=self.openai_base_url,
                            openai_api_key=self.openai_api_key, egress=self.egress,
                            model_aliases=self.aliases)


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _convert(name: str, raw: str, default: Any) -> Any:
    env_name = _PLAIN_ENV.get(name, f"FLOW_ENGINE_{name.upper()}")
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env_name} must be true or false, got {raw!r}")
    if isinstance(default, tuple):
        return _split(raw)
    if isinstance(default, int | float):
        try:
            value = type(default)(raw)
        except ValueError:
            raise ConfigError(
                f"{env_name} must be a {type(default).__name__}, got {raw!r}") from None
        if value < 0:
            raise ConfigError(f"{env_name} must not be negative, got {raw!r}")
        return value
    return raw
