"""Engine API keys, roles and the caller each request acts for. Pure: no Flask here.

Keys come from ``FLOW_ENGINE_API_KEYS`` (comma-separated) and ``FLOW_ENGINE_API_KEY_FILE``
(one per line), each written ``name:role:secret``::

    FLOW_ENGINE_API_KEYS=cli:admin:3f9c…,orders-sidecar:runner+proxy:81ab…,ci:publisher:c0de…

A bare secret (no colons) stays valid as an ``admin`` key named ``key-<8 hex of its
sha256>``, so deployments from before roles keep working. Every secret, bare or named, is at
least :data:`MIN_SECRET` characters without whitespace, and a bare one never starts with
``#``: a comment line or a stray word of the key file must stop the engine, never become an
admin key anyone can read in the file.

Roles, each including the ones before it (:data:`ROLES`):

    runner     run flows, watch and cancel its own runs, read runs, flows and components
    editor     + create flows, add versions, validate, import, diff, pin any version
    publisher  + publish, roll back, set routing (canaries)
    admin      + delete flows; read and cancel the runs of every tenant

``+proxy`` after the role marks the key of a proxy — the ambassador — that acts for many
callers: only from such keys does the engine accept the caller's ``x-flowgate-identity``
and ``x-flowgate-tenant`` headers; from any other key they are ignored, so an app holding
an ordinary key cannot claim to be another tenant.

Tenants. A run, its events, its chat history and its idempotency key belong to the tenant
that started it (:attr:`Principal.tenant`, made by :func:`tenant_of`). For a proxy key it
is ``<key name>/<tenant>`` when the proxy forwards a tenant, else ``<key name>~<identity>``
when it forwards an identity; without either, and for any other key, it is the key's name.
The key's name comes first so that what one proxy forwards can never name a tenant of
another proxy or key: two apps' "alice" are two tenants, and an app cannot reach a tenant
it does not front. The separator says where the name came from, so that a caller known only
by its identity (a JWT without a tenant claim) can never land in the tenant of the same
name: key names hold neither ``/`` nor ``~``, so the first of them after the key's name
tells the three kinds apart whatever the forwarded values hold. Which role each route needs
is :data:`ROUTE_ROLES`, one table for the whole API, so the security model can be read in
one place.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

ROLES = ("runner", "editor", "publisher", "admin")
MIN_SECRET = 8
_RANK = {role: i for i, role in enumerate(ROLES)}
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# identity and tenant headers: printable ASCII without spaces (a JWT "sub" such as
# "auth0|5f1c…" fits), bounded
HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,200}")
IDENTITY_HEADER, TENANT_HEADER = "x-flowgate-identity", "x-flowgate-tenant"
# what follows a proxy key's name in the tenants of its callers (never in a key's name)
TENANT_SEP, IDENTITY_SEP = "/", "~"
_PROXIED = re.compile(f"({KEY_NAME.pattern})[{TENANT_SEP}{IDENTITY_SEP}]")

# The role each engine endpoint (Flask's "blueprint.view") needs. An endpoint missing here
# needs admin: a new route is closed until someone decides who may call it.
ROUTE_ROLES: dict[str, str] = {
    "openapi.openapi_json": "runner",
    "components.list_components": "runner",
    "flows.list_flows": "runner",
    "flows.get_flow": "runner",
    "flows.list_versions": "runner",
    "flows.get_version": "runner",
    "flows.flow_audit": "runner",
    "flows.audit_all": "runner",
    "flows.diff": "editor",
    "runs.run_flow": "runner",
    "runs.get_run": "runner",
    "runs.run_events": "runner",
    "runs.cancel_run": "runner",
    "ws.run_socket": "runner",
    "ws.ws_ticket": "runner",
    "runs.list_runs": "runner",
    "flows.flow_stats": "runner",
    "flows.create_flow": "editor",
    "flows.new_version": "editor",
    "flows.validate": "editor",
    "flows.publish": "publisher",
    "flows.rollback": "publisher",
    "flows.set_routing": "publisher",
    "flows.delete_flow": "admin",
    # LangFlow interop (flow_engine/interop/api.py): importing stores a flow (editor; its
    # publish: true needs publisher, checked in the handler); exporting reads one
    "interop.import_langflow": "editor",
    "interop.export_langflow": "runner",
    # knowledge bases (flow_engine/api/knowledge.py): shared like flows; runners read and
    # search, editors add and remove documents, deleting a whole base is admin's (as a flow)
    "knowledge.list_knowledge": "runner",
    "knowledge.get_knowledge": "runner",
    "knowledge.list_documents": "runner",
    "knowledge.get_document": "runner",
    "knowledge.search": "runner",
    "knowledge.create_knowledge": "editor",
    "knowledge.upload_document": "editor",
    "knowledge.delete_document": "editor",
    "knowledge.delete_knowledge": "admin",
}


def tenant_of(key: str, identity: str | None, tenant: str | None) -> str:
    """The tenant of a caller of proxy key ``key`` (see the module docstring)."""
    if tenant:
        return f"{key}{TENANT_SEP}{tenant}"
    if identity:
        return f"{key}{IDENTITY_SEP}{identity}"
    return key


def proxy_of(tenant: str) -> str | None:
    """The proxy key whose callers ``tenant`` is one of; None for a key's own tenant."""
    found = _PROXIED.match(tenant)
    return found.group(1) if found else None


class KeyConfigError(ValueError):
    """An API key entry cannot be used; the message says which and why (never the secret)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    proxy: bool
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey({self.name!r}, {self.role}{'+proxy' if self.proxy else ''})"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the key that authenticated it, and (from a proxy key) the
    caller behind the proxy."""

    key: str  # the key's name: the actor in logs and audit entries
    role: str
    proxy: bool = False
    identity: str | None = None
    tenant: str = ""

    def __post_init__(self) -> None:
        if not self.tenant:
            object.__setattr__(self, "tenant", tenant_of(self.key, self.identity, None))

    def may(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def sees_every_tenant(self) -> bool:
        """Admin keys of operators (not proxies) may read and cancel any tenant's runs."""
        return self.role == "admin" and not self.proxy

    def owns(self, tenant: str | None) -> bool:
        """May this caller see a run (or chat, or key) of ``tenant``? Runs recorded before
        tenants existed (``None``) are visible to operators only."""
        return self.sees_every_tenant or (tenant is not None and tenant == self.tenant)

    @property
    def group(self) -> str | None:
        """The proxy key whose tenants (its own included) this caller's is one of, for
        limits on them all; None for a key that is not a proxy's."""
        return self.key if self.proxy else None

    @property
    def actor(self) -> str:
        return f"{self.key}/{self.identity}" if self.identity else self.key


ANONYMOUS = Principal("anonymous", "admin", proxy=True)  # --insecure-no-auth only


def parse_key(entry: str) -> ApiKey:
    """One ``name:role[+proxy]:secret`` entry, or a bare secret (an admin key)."""
    entry = entry.strip()
    if not entry:
        raise KeyConfigError("an empty API key entry")
    parts = entry.split(":", 2)
    if len(parts) < 3:
        if ":" in entry:
            raise KeyConfigError("an API key entry has one ':'; write name:role:secret, or a "
                                 "bare secret without ':'")
        if entry.startswith("#"):
            raise KeyConfigError("a bare secret (an admin key) must not start with '#': a "
                                 "comment is a line of the key file of its own")
        _check_secret(entry, "a bare secret (an admin key)")
        digest = hashlib.sha256(entry.encode()).hexdigest()[:8]
        return ApiKey(f"key-{digest}", "admin", False, entry.encode())
    name, role, secret = parts
    # Messages name a field by its position, never by its content: in an entry written in
    # the wrong order (name:secret:role) any field may be the secret.
    if not KEY_NAME.fullmatch(name):
        raise KeyConfigError("an API key's name (the first field) must be 1-64 letters, "
                             "digits, '_', '.', '-' (entries are name:role:secret)")
    base, _, suffix = role.partition("+")
    if base not in _RANK or suffix not in ("", "proxy"):
        raise KeyConfigError(f"API key '{name}': the second field is not a role; roles are "
                             f"{', '.join(ROLES)}, optionally with '+proxy' (runner+proxy)")
    _check_secret(secret, f"API key '{name}': the secret")
    return ApiKey(name, base, suffix == "proxy", secret.encode())


def _check_secret(secret: str, what: str) -> None:
    if len(secret) < MIN_SECRET:
        raise KeyConfigError(f"{what} must be at least {MIN_SECRET} characters")
    if not secret.isprintable() or any(c.isspace() for c in secret):
        raise KeyConfigError(f"{what} must not contain whitespace or control characters "
                             "(entries are name:role:secret; a comment is a line of its own)")


def parse_keys(entries: Iterable[str]) -> tuple[ApiKey, ...]:
    return unique_keys(parse_key(entry) for entry in entries)


def unique_keys(parsed: Iterable[ApiKey]) -> tuple[ApiKey, ...]:
    """The keys, refusing a name or a secret given twice (which key would a request be?)."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    secrets: set[bytes] = set()
    for key in parsed:
        if key.secret in secrets:
            raise KeyConfigError(f"API key '{key.name}': the same secret is configured twice; "
                                 "each key needs its own secret")
        if key.name in names:
            raise KeyConfigError(f"API key name '{key.name}' is configured twice")
        names.add(key.name)
        secrets.add(key.secret)
        keys.append(key)
    return tuple(keys)


class KeyRing:
    """The configured keys; :meth:`find` compares in constant time against every key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        candidate = presented.encode()
        found = None
        for key in self.keys:  # no early exit: timing does not reveal which key matched
            if hmac.compare_digest(candidate, key.secret):
                found = key
        return found

    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    def named(self, name: str) -> ApiKey | None:
        return next((k for k in self.keys if k.name == name), None)


class CallerHeaderError(ValueError):
    """A proxy forwarded an identity or tenant header that is not a plain token."""


def principal_for(key: ApiKey, identity: str | None, tenant: str | None) -> Principal:
    """The principal of a request made with ``key``; the forwarded caller headers count
    only for proxy keys."""
    if not key.proxy:
        return Principal(key.name, key.role)
    for header, value in ((IDENTITY_HEADER, identity), (TENANT_HEADER, tenant)):
        if value is not None and not HEADER_VALUE.fullmatch(value):
            raise CallerHeaderError(f"{header} must be 1-200 printable ASCII characters "
                                    "without spaces")
    return Principal(key.name, key.role, proxy=True, identity=identity or None,
                     tenant=tenant_of(key.name, identity, tenant))


def required_role(endpoint: str | None) -> str:
    return ROUTE_ROLES.get(endpoint or "", "admin")
