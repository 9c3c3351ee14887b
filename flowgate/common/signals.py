"""Signals between Flowgate processes over Redis pub/sub (only with ``REDIS_URL``).

Channel ``flowgate:signals``; messages are JSON:

- ``{"kind": "cancel", "run_id": ...}`` — whichever engine process runs it cancels it;
- ``{"kind": "flow_changed", "flow_id": ..., "name": ...}`` — every engine process forgets
  its cached copy of the flow's live pointer and routing, so a publish, rollback or routing
  change is seen at once everywhere; an ambassador sharing the Redis re-reads the flow's
  routing before its cache serves another answer of it (ambassador/routing_view.py).

Delivery is best effort: an engine process that misses a flow change still sees it within
``flow_cache_ttl_s`` (an ambassador within its routing check, 2 s); a lost cancel leaves
the run to finish normally.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flowgate.common.lograte import Throttled

log = logging.getLogger(__name__)
CHANNEL = "flowgate:signals"


class Signals:
    def __init__(self, client: Any, on_error: Callable[[str], None] | None = None, *,
                 on_subscribe: Callable[[], None] | None = None) -> None:
        """``on_subscribe``: called on every (re)subscription — signals sent while there
        was none are lost, so whatever they keep fresh should be dropped then."""
        self.client = client
        self._on_subscribe = on_subscribe or (lambda: None)
        self._handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._on_error = on_error or (lambda op: None)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._warn = Throttled(log)

    def on(self, kind: str, handler: Callable[[dict[str, Any]], None]) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def publish(self, kind: str, **fields: Any) -> bool:
        try:
            self.client.publish(CHANNEL, json.dumps({"kind": kind, **fields}))
            return True
        except Exception as exc:
            self._on_error("publish")
            self._warn.warning("signals: could not publish %s: %s", kind, type(exc).__name__)
            return False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen_forever, daemon=True,
                                            name="flowgate-signals")
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _listen_forever(self) -> None:
        delay = 0.5
        while not self._stopped.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                self._on_subscribe()
                delay = 0.5
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                self._on_error("subscribe")
                self._warn.warning("signals: subscription lost (%s); retrying", type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 10)

    def _dispatch(self, raw: Any) -> None:
        try:
            message = json.loads(raw)
        except (TypeError, ValueError):
            return
        for handler in self._handlers.get(message.get("kind"), ()):
            try:
                handler(message)
            except Exception:
                log.exception("signals: handler for %s failed", message.get("kind"))
