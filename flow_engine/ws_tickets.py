"""One-time tickets for WebSocket handshakes: a browser cannot set headers on a WebSocket, and
a key in the URL (``?token=KEY``) ends up in access logs, proxies and browser history. The
console asks ``POST /api/v1/ws/ticket`` with its key in a header and opens the socket with
``?ticket=T``: T is random, lives :data:`TTL_S` seconds and is taken by the first handshake
that shows it (a second one gets 401), so a leaked URL is worth nothing.

A ticket stands for the principal that asked for it (key name, role, forwarded caller), not
the key. With ``REDIS_URL`` tickets are shared by every engine process (only the SHA-256 of
a ticket is stored; ``GETDEL`` takes it atomically); without, they live in this process,
which is then the only worker. Both stores are bounded: Redis by the TTL, memory by
:data:`MAX_TICKETS` (the oldest go first).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

from flow_engine.auth import Principal

TTL_S = 30
MAX_TICKETS = 10_000
PREFIX = "flowgate:wsticket:"


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def _dump(p: Principal) -> str:
    return json.dumps({"key": p.key, "role": p.role, "proxy": p.proxy, "identity": p.identity,
                       "tenant": p.tenant})


def _load(text: str) -> Principal:
    return Principal(**json.loads(text))


class WsTickets:
    def __init__(self, client: Any = None, *, ttl_s: float = TTL_S,
                 clock=time.monotonic) -> None:
        self.client = client  # a redis.Redis (decode_responses=True), or None: this process
        self.ttl_s = ttl_s
        self.clock = clock
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, principal: Principal) -> str:
        """A new ticket for ``principal`` (raises the Redis error when Redis is down: the
        caller answers 503, the console falls back to Server-Sent Events)."""
        ticket = secrets.token_urlsafe(32)
        if self.client is not None:
            self.client.set(PREFIX + _digest(ticket), _dump(principal), ex=int(self.ttl_s))
            return ticket
        with self._lock:
            now = self.clock()
            while self._local and (len(self._local) >= MAX_TICKETS
                                   or next(iter(self._local.values()))[0] < now):
                self._local.popitem(last=False)
            self._local[_digest(ticket)] = (now + self.ttl_s, _dump(principal))
        return ticket

    def redeem(self, ticket: str) -> Principal | None:
        """The principal of a valid, unused ticket, which is used up; None otherwise."""
        if not ticket or len(ticket) > 100:
            return None
        if self.client is not None:
            found = self.client.getdel(PREFIX + _digest(ticket))
            return _load(found) if found else None
        with self._lock:
            entry = self._local.pop(_digest(ticket), None)
        if entry is None or entry[0] < self.clock():
            return None
        return _load(entry[1])
