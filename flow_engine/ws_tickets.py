"""One-time tickets for WebSocket handshakes: a browser cannot set headers on a WebSocket, and
a key in the URL (``?token=KEY``) ends up in access logs, proxies and browser history. The
console asks ``POST /api/v1/ws/ticket`` with its key in a header and opens the socket with
``?ticket=T``: T is random (256 bits), lives :data:`TTL_S` seconds and is taken by the first
handshake that shows it (a second one gets 401), so a leaked URL is worth nothing.

A ticket keeps who asked — the key's name and, through a proxy key, the forwarded caller —
never a role: the role is read from the engine's keys when the ticket is taken, so a key
removed or demoted meanwhile is not honoured, and a forged entry in the shared store cannot
claim more than a configured key has. With ``REDIS_URL`` tickets are shared by every engine
process (only the SHA-256 of a ticket is stored; ``GETDEL`` takes it atomically); without,
they live in this process, which is then the only worker. Both are bounded: by the TTL, by
:data:`MAX_TICKETS` in memory, and by :data:`MAX_PER_TENANT` outstanding tickets per tenant
(429 past it), so no tenant can crowd out the others'.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from flow_engine.auth import KeyRing, Principal
from flow_engine.errors import FlowgateError, TenantLimited

TTL_S = 30
MAX_TICKETS = 10_000
MAX_PER_TENANT = 100
PREFIX = "flowgate:wsticket:"
COUNT_PREFIX = "flowgate:wsticket-count:"


class TicketsUnavailable(FlowgateError):
    """The shared store (Redis) does not answer: the console then uses Server-Sent Events."""

    status, code = 503, "tickets_unavailable"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _dump(p: Principal) -> str:
    return json.dumps({"key": p.key, "identity": p.identity, "tenant": p.tenant})


class WsTickets:
    def __init__(self, client: Any = None, *, keys: KeyRing, ttl_s: float = TTL_S,
                 clock=time.monotonic) -> None:
        self.client = client  # a redis.Redis (decode_responses=True), or None: this process
        self.keys = keys
        self.ttl_s = ttl_s
        self.clock = clock
        self._local: OrderedDict[str, tuple[float, str, str]] = OrderedDict()
        self._per_tenant: Counter[str] = Counter()
        self._lock = threading.Lock()

    def issue(self, principal: Principal) -> str:
        """A new ticket for ``principal``. TenantLimited past MAX_PER_TENANT outstanding;
        TicketsUnavailable when Redis does not answer."""
        ticket = secrets.token_urlsafe(32)
        if self.client is not None:
            count_key = COUNT_PREFIX + _digest(principal.tenant)
            with _shared_store():
                pipe = self.client.pipeline(transaction=False)
                pipe.set(count_key, 0, ex=int(self.ttl_s), nx=True)  # a window from the first
                pipe.incr(count_key)
                outstanding = pipe.execute()[1]
                if outstanding <= MAX_PER_TENANT:
                    self.client.set(PREFIX + _digest(ticket), _dump(principal), ex=int(self.ttl_s))
            if outstanding > MAX_PER_TENANT:
                raise self._limited()
            return ticket
        with self._lock:
            now = self.clock()
            while self._local and (len(self._local) >= MAX_TICKETS
                                   or next(iter(self._local.values()))[0] < now):
                self._forget(next(iter(self._local)))
            if self._per_tenant[principal.tenant] >= MAX_PER_TENANT:
                raise self._limited()
            self._local[_digest(ticket)] = (now + self.ttl_s, principal.tenant, _dump(principal))
            self._per_tenant[principal.tenant] += 1
        return ticket

    def redeem(self, ticket: str) -> Principal | None:
        """The principal of a valid, unused ticket, which is used up; None otherwise (also
        when its key is no longer configured)."""
        if not ticket or len(ticket) > 100:
            return None
        if self.client is not None:
            with _shared_store():
                found = self.client.getdel(PREFIX + _digest(ticket))
            return self._principal(found) if found else None
        with self._lock:
            entry = self._forget(_digest(ticket))
        if entry is None or entry[0] < self.clock():
            return None
        return self._principal(entry[2])

    def _forget(self, digest: str) -> tuple[float, str, str] | None:
        entry = self._local.pop(digest, None)
        if entry is not None:
            self._per_tenant[entry[1]] -= 1
            if self._per_tenant[entry[1]] <= 0:
                del self._per_tenant[entry[1]]
        return entry

    def _principal(self, text: str) -> Principal | None:
        try:
            fields = json.loads(text)
            key = self.keys.named(fields["key"])
        except (ValueError, KeyError, TypeError):
            return None
        if key is None:
            return None
        return Principal(key.name, key.role, proxy=key.proxy,
                         identity=fields.get("identity") if key.proxy else None,
                         tenant=fields.get("tenant") if key.proxy else "")

    def _limited(self) -> TenantLimited:
        return TenantLimited(f"too many WebSocket tickets outstanding for this caller (at most "
                             f"{MAX_PER_TENANT} in {int(self.ttl_s)} s)",
                             retry_after_s=int(self.ttl_s), limit="ws_tickets")


@contextlib.contextmanager
def _shared_store():
    try:
        yield
    except Exception as exc:  # any Redis error: a connection, a timeout, a refused command
        raise TicketsUnavailable("WebSocket tickets are unavailable (the shared store does not "
                                 "answer); use an API key header or Server-Sent Events") from exc
