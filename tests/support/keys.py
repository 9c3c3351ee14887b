"""Named engine keys, one per role, for tests of who may do what (flow_engine/auth.py)."""

from __future__ import annotations

SECRETS = {
    "runner": "runner-secret-0001",
    "other": "other-runner-secret-0002",
    "editor": "editor-secret-0003",
    "publisher": "publisher-secret-0004",
    "admin": "admin-secret-0005",
    "proxy": "proxy-secret-0006",
}
KEYS = ",".join([
    f"orders-app:runner:{SECRETS['runner']}",
    f"reports-app:runner:{SECRETS['other']}",
    f"designer:editor:{SECRETS['editor']}",
    f"release-bot:publisher:{SECRETS['publisher']}",
    f"platform:admin:{SECRETS['admin']}",
    f"ambassador:runner+proxy:{SECRETS['proxy']}",
])


def as_(who: str, **headers: str) -> dict[str, str]:
    """Headers of a request made with the key of ``who`` (a SECRETS name)."""
    return {"Authorization": f"Bearer {SECRETS[who]}", **headers}


def tenant(name: str, identity: str | None = None) -> dict[str, str]:
    """Headers of the ambassador (a proxy key) calling for tenant ``name``."""
    headers = as_("proxy", **{"x-flowgate-tenant": name})
    if identity:
        headers["x-flowgate-identity"] = identity
    return headers
