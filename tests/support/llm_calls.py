"""The LLM calls llm-sim saw during a chaos drill, per request: how many were made again for a
request that had one already (a duplicated call), and which of those an earlier call of the
*same* request explains by having been cut off.

Every request of a drill carries a tag (``q<8 hex>n<seq>``) in its input, so in the prompt
llm-sim records in its request log (``GET /sim/requests``: the last 100 chat completions,
oldest first). A call cut off mid-stream — its engine killed — costs tokens but answers
nothing, so the retry that follows is not a duplicate. llm-sim marks such an entry of its
log in place (``"closed_early": true``; every entry carries the key, false until then); a
repeated call of a request is explained only by a cut-off call of that request, never by
one of some other request. An llm-sim whose entries lack the key cannot say which calls
were cut: then its ``streams_closed_early`` count is subtracted across the whole drill, as
the best it allows.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import Counter
from typing import Any, Protocol

import requests

# A request's tag: in its input, so in the prompt llm-sim records.
TAG_RE = re.compile(r"\bq[0-9a-f]{8}n\d+\b")
LOG_SIZE = 100  # llm-sim keeps this many requests
CUT = "closed_early"


class SimLog(Protocol):
    def requests(self) -> list[dict[str, Any]]: ...

    def reset(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...


class LlmCalls:
    """Counts llm-sim's chat completions per request tag while a drill runs.

    A poller reads the request log every ``interval_s`` and appends what is new (the longest
    overlap with the previous read is what both saw; an entry's ``closed_early`` mark is not
    part of what is compared, since it changes), so a drill may make more than 100 calls. Each
    read also takes the marks of the entries still in the log. If a read shares nothing with
    the previous one while the log is full, calls may have been missed: ``overflowed``."""

    def __init__(self, sim: SimLog, interval_s: float = 0.2) -> None:
        self.sim = sim
        self.interval_s = interval_s
        self.by_tag: Counter[str] = Counter()
        self.untagged = 0
        self.overflowed = False
        self.marked = False  # llm-sim says per entry whether it was cut off
        self._calls: list[tuple[str | None, bool]] = []  # (tag, cut off) of every call seen
        self._prev: list[str] = []  # the last read, entries without their mark
        self._prev_ids: list[int] = []  # their positions in _calls
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {}

    def start(self) -> LlmCalls:
        self.sim.reset()
        self._prev, self._prev_ids = [], []
        self._thread = threading.Thread(target=self._loop, name="llm-calls", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(requests.RequestException):
                self.poll()

    def poll(self) -> None:
        entries = self.sim.requests()
        current = [json.dumps({k: v for k, v in e.items() if k != CUT}, sort_keys=True)
                   for e in entries]
        with self._lock:
            prev = self._prev
            overlap = 0
            for j in range(len(prev) + 1):  # smallest j: the longest suffix of prev ...
                k = len(prev) - j
                if current[:k] == prev[j:]:  # ... that is a prefix of current
                    overlap = k
                    break
            if overlap == 0 and prev and len(current) >= LOG_SIZE:
                self.overflowed = True
            ids = self._prev_ids[len(prev) - overlap:]
            for entry in entries[overlap:]:
                tags = TAG_RE.findall(_last_user_message(entry))
                tag = tags[-1] if tags else None
                if tag:
                    self.by_tag[tag] += 1
                else:
                    self.untagged += 1
                ids.append(len(self._calls))
                self._calls.append((tag, False))
            for entry, i in zip(entries, ids, strict=True):
                if CUT in entry:
                    self.marked = True
                if entry.get(CUT):
                    self._calls[i] = (self._calls[i][0], True)
            self._prev, self._prev_ids = current, ids

    def stop(self) -> LlmCalls:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.poll()
        self.stats = self.sim.stats()
        return self

    def calls(self) -> int:
        return sum(self.by_tag.values()) + self.untagged

    def repeated(self) -> dict[str, int]:
        """Tags whose request reached the LLM more than once: how many times."""
        return {tag: n for tag, n in self.by_tag.items() if n > 1}

    def cut_off(self) -> Counter[str]:
        """Per tag, its calls llm-sim marked as cut off."""
        with self._lock:
            return Counter(tag for tag, cut in self._calls if cut and tag)

    def duplicated(self) -> int:
        """LLM calls made again for a request that had one already, less those explained by
        an earlier call of the same request being cut off (a retry of a call that never
        completed costs tokens but answers nothing twice)."""
        repeated = self.repeated()
        if not self.marked:  # an llm-sim that cannot say which: the drill's total
            extra = sum(n - 1 for n in repeated.values())
            return max(0, extra - int(self.stats.get("streams_closed_early", 0)))
        cut = self.cut_off()
        return sum(max(0, n - 1 - cut[tag]) for tag, n in repeated.items())


def _last_user_message(entry: dict[str, Any]) -> str:
    messages = entry.get("body", {}).get("messages") or []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""
