"""An OpenAI-compatible LLM *simulator*: a stand-in for a paid LLM in demos, tests and benchmarks.

It is not an LLM: it answers with deterministic filler text. It speaks OpenAI's HTTP wire
format so the real ``openai`` client and ``langchain_openai`` work against it unchanged
(``base_url="http://HOST:PORT/v1"``, any API key, any model name):

- ``POST /v1/chat/completions``: a ``chat.completion`` object, or with ``"stream": true``
  a ``text/event-stream`` of ``data: {chat.completion.chunk}`` events: a first chunk with
  ``delta.role``, one chunk per token, a chunk with ``finish_reason``, a ``choices: []``
  chunk with ``usage`` if ``stream_options.include_usage``, then ``data: [DONE]``.
  ``max_tokens`` / ``max_completion_tokens`` truncate the reply (``finish_reason: "length"``).
- ``GET /v1/models``, ``GET /v1/models/<id>``, and ``POST /v1/embeddings``: deterministic
  unit vectors that carry a little meaning (:func:`embed`: a hashed bag of words and
  character trigrams, so texts that share words or word stems are close by cosine);
  ``dimensions`` as OpenAI's, ``encoding_format`` ``float`` or ``base64`` as the ``openai``
  client asks.
- Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

Tool calling (``tools`` in the request; :func:`plan_tool_call`), deterministic too:

1. With ``tools`` and ``tool_choice`` other than ``"none"``: the tools the last user message
   names (a tool's name appearing in it, case-insensitively, in order of appearance; the
   first tool when it names none; the named function of a ``tool_choice`` object) are
   called one per assistant turn, each once after that message, in that order. The answer
   is an assistant message with one ``tool_calls`` entry (``finish_reason: "tool_calls"``;
   streamed as a ``delta.tool_calls`` chunk with the id and name, then the arguments in
   pieces). Arguments come from the function's ``parameters``: a property named
   ``expression`` gets the arithmetic expression found in the message (the longest run of
   digits, operators and parentheses holding an operator, see :func:`find_expression`),
   every other string property the message itself, number properties its first number.
2. Otherwise, when ``tool`` messages follow the last user message, the reply quotes them:
   ``[simulated reply] <tool name>: "<start of its result>"`` for each, then filler.
3. Otherwise the reply below.

With ``tools`` in the request the tool protocol is checked as OpenAI checks it (400): every
``tool_calls`` id needs a ``tool`` message answering it, and a ``tool`` message must answer one.

Replies are deterministic: ``[simulated reply] you said: "<start of the last user message>"``
followed by filler words picked from a hash of the messages. Tokens are words (every token
but the first has a leading space). Latency (``ttft_s``, ``tokens_per_s``) and failures
(``error_rate`` of 500 / 429 / hang-then-504, or ``model_error_rates`` per model name) are
injected from :class:`SimSettings`;
embeddings have their own ``embedding_latency_s`` and ``embedding_error_rate`` (same kinds).

Test hooks: ``GET /sim/stats`` (counters), ``GET /sim/requests`` (the last 100 well-formed
chat completion requests: ``body``, ``headers``, the client's ``remote_port``, which tells
keep-alive reuse from new connections, and ``closed_early``, true once the client closed its
stream before the end), ``GET /sim/embedding-requests`` (the last 100
embeddings requests: ``model``, ``inputs``, ``dimensions``, ``headers``), ``POST /sim/reset``
(zero them all), ``GET|POST /sim/config`` (read / change settings at runtime). They live in
the worker process. ``hold: true`` holds every chat completion request (once it is in
``/sim/requests``, before anything is answered, injected errors included) until ``hold`` is
set false again, at most ``HOLD_MAX_S``; ``held`` in the stats is how many are held now — a
test's way to keep a call in flight for exactly as long as it needs, without racing a delay.

Run: ``python -m flowgate.llm_sim --port 9100`` (or ``flowgate llm-sim``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import math
import random
import re
import struct
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

ERROR_KINDS = ("500", "429", "timeout")
HOLD_MAX_S = 300.0  # a held chat completion goes on by itself after this
MODELS = ("flowgate-sim", "flowgate-sim-embedding")
FINGERPRINT = "fp_flowgate_sim"
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed",
           "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna",
           "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud", "exercitation")
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "flowgate"}


@dataclass(frozen=True)
class SimSettings:
    """Behaviour knobs. Frozen: a request works on one consistent snapshot."""

    ttft_s: float = 0.0  # delay before the first token (and before a non-streamed answer)
    tokens_per_s: float = 0.0  # 0 = no delay between tokens
    reply_tokens: int = 24
    error_rate: float = 0.0  # probability that a chat completion fails
    # per model, overriding error_rate for requests naming it: {"canary-model": 0.5}
    model_error_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    # "timeout" is opt-in because it holds a connection for hang_s seconds.
    error_kinds: tuple[str, ...] = ("500", "429")
    hang_s: float = 30.0  # how long a "timeout" error hangs before answering 504
    embedding_dim: int = 64
    embedding_latency_s: float = 0.0  # delay before an embeddings answer
    embedding_error_rate: float = 0.0  # probability that an embeddings request fails
    seed: int | None = None  # salts reply filler; seeds error injection (None = random)
    hold: bool = False  # chat completions wait until it is false again (a test hook)

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tokens_per_s", "hang_s", "embedding_latency_s"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("error_rate", "embedding_error_rate"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        for name, hi in (("reply_tokens", 100_000), ("embedding_dim", 8192)):
            if not _is_int(getattr(self, name)) or not 1 <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be an integer in [1, {hi}], got "
                                 f"{getattr(self, name)!r}")
        rates = self.model_error_rates
        if not isinstance(rates, dict) or len(rates) > 100 or any(
                not _is_name(k) or not _is_number(v) or not 0 <= v <= 1 for k, v in rates.items()):
            raise ValueError("model_error_rates must map model names to numbers in [0, 1], "
                             f"got {rates!r}")
        kinds = self.error_kinds
        if isinstance(kinds, str):  # CLI style: "500,429"
            kinds = [k.strip() for k in kinds.split(",") if k.strip()]
        if not isinstance(kinds, list | tuple) or not kinds or any(
                k not in ERROR_KINDS for k in kinds):
            raise ValueError(f"error_kinds must be a non-empty subset of {ERROR_KINDS}, "
                             f"got {self.error_kinds!r}")
        object.__setattr__(self, "error_kinds", tuple(dict.fromkeys(kinds)))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        if not isinstance(self.hold, bool):
            raise ValueError(f"hold must be a boolean, got {self.hold!r}")

    def updated(self, changes: dict[str, Any]) -> SimSettings:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Stats:
    """Counters shared by all greenlets/threads of one worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # created in the worker: gevent-patched by then
        self._c: dict[str, Any] = {"active_streams": 0, "held": 0}
        self._requests: deque[dict[str, Any]] = deque(maxlen=100)
        self._embedding_requests: deque[dict[str, Any]] = deque(maxlen=100)
        self.reset()

    def reset(self) -> None:
        with self._lock:  # active_streams and held are gauges: they survive resets
            self._requests.clear()
            self._embedding_requests.clear()
            self._c = {
                "requests": {}, "chat_completions_started": 0, "chat_completions_completed": 0,
                "streams_closed_early": 0, "errors_injected": dict.fromkeys(ERROR_KINDS, 0),
                "bad_requests": 0, "tokens_sent": 0, "tool_calls_sent": 0, "embedding_inputs": 0,
                "active_streams": self._c["active_streams"], "held": self._c["held"]}

    def add(self, key: str, n: int = 1, sub: str | None = None) -> None:
        with self._lock:
            if sub is None:
                self._c[key] += n
            else:
                self._c[key][sub] = self._c[key].get(sub, 0) + n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._c))  # a deep copy

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    def mark_closed_early(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["closed_early"] = True

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._requests]  # copies: a mark may come later

    def record_embedding(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._embedding_requests.append(entry)

    def embedding_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._embedding_requests)


def _error(status: int, message: str, type_: str, code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status, headers=headers, mimetype="application/json")


def _json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)  # force: curl users forget the header
    if not isinstance(body, dict):
        raise _BadRequest("Request body must be a JSON object.")
    return body


def _opt(body: dict[str, Any], name: str, check: Any, what: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise _BadRequest(f"Invalid '{name}': expected {what}, got {value!r}.", name)
    return value


def _content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return " ".join(p["text"] for p in content if isinstance(p.get("text"), str))
    raise _BadRequest(f"Invalid 'messages[{i}].content': expected a string or a list of "
                      "content parts.", f"messages[{i}].content")


def _parse_messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _BadRequest("'messages' must be a non-empty array.", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _BadRequest(f"Invalid 'messages[{i}]': expected an object with a 'role' "
                              f"in {sorted(_ROLES)}.", f"messages[{i}]")
        out.append((m["role"], _content_text(m.get("content"), i)))
    return out


def count_prompt_tokens(messages: list[tuple[str, str]]) -> int:
    """Whitespace words plus OpenAI-like per-message (4) and per-reply (3) overhead."""
    return sum(len(text.split()) + 4 for _, text in messages) + 3


def reply_tokens(messages: list[tuple[str, str]], n: int, seed: int | None = None) -> list[str]:
    """The deterministic reply for ``messages``, as ``n`` word tokens."""
    last_user = next((t for r, t in reversed(messages) if r == "user"), "").split()
    words = ["[simulated", "reply]", "you", "said:", *_quote(last_user)]
    key = json.dumps([seed or 0, messages]).encode()
    words += [_FILLER[b % len(_FILLER)] for b in hashlib.shake_256(key).digest(n)]
    return [w if i == 0 else " " + w for i, w in enumerate(words[:n])]


def _quote(words: list[str]) -> list[str]:
    """The first 8 words in double quotes (``..."`` when there were more)."""
    quote = words[:8] or ["(nothing)"]
    quote[0] = '"' + quote[0]
    quote[-1] += '..."' if len(words) > 8 else '"'
    return quote


# -- tool calling (the rule is in the module docstring) ---------------------------------------

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ARITHMETIC_RUN = re.compile(r"[\d.+\-*/^%()×÷\s]+")
_OPERATOR_BETWEEN = re.compile(r"[\d)]\s*(?:\*\*|[-+*/^%×÷])\s*[-(\d.]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def _parse_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools (``[]`` without ``tools``); 400 when malformed."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or not tools:
        raise _BadRequest("Invalid 'tools': expected a non-empty array of tools.", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"])
                or not isinstance(fn.get("parameters", {}), dict)):
            raise _BadRequest(f"Invalid 'tools[{i}]': expected {{\"type\": \"function\", "
                              "\"function\": {\"name\": \"[a-zA-Z0-9_-]{1,64}\", \"parameters\": "
                              "{...}}}.", f"tools[{i}]")
        out.append(fn)
    return out


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]]) -> str | None:
    """``"none"``, ``"auto"``, ``"required"`` or the name of a forced function."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or name not in {t["name"] for t in tools}:
        raise _BadRequest("Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": <one of the tools>}}.',
                          "tool_choice")
    return name


def _check_tool_protocol(raw: list[dict[str, Any]]) -> None:
    """OpenAI's rules: each tool call is answered by a ``tool`` message right after the
    assistant message that made it, and a ``tool`` message answers a call."""
    pending: list[str] = []
    for i, m in enumerate(raw):
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in pending:
                raise _BadRequest("Invalid parameter: messages with role 'tool' must be a response "
                                  "to a preceding message with 'tool_calls'.", f"messages[{i}].role")
            pending.remove(call_id)
            continue
        if pending:
            raise _BadRequest("An assistant message with 'tool_calls' must be followed by tool "
                              "messages responding to each 'tool_call_id'. The following "
                              f"tool_call_ids did not have response messages: {', '.join(pending)}",
                              f"messages[{i}].role")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls is None:
            continue
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str)
                and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments"), str) for c in calls):
            raise _BadRequest(f"Invalid 'messages[{i}].tool_calls': expected an array of "
                              '{"id", "type": "function", "function": {"name", "arguments"}}.',
                              f"messages[{i}].tool_calls")
        pending = [c["id"] for c in calls]
    if pending:
        raise _BadRequest("An assistant message with 'tool_calls' must be followed by tool "
                          "messages responding to each 'tool_call_id'. The following "
                          f"tool_call_ids did not have response messages: {', '.join(pending)}",
                          "messages")


def find_expression(text: str) -> str | None:
    """The longest run of digits, operators, parentheses and spaces in ``text`` that holds
    an operator between two operands (``"what is (12 + 30) * 2?"`` → ``"(12 + 30) * 2"``)."""
    runs = [r.group().strip() for r in _ARITHMETIC_RUN.finditer(text)]
    runs = [r for r in runs if _OPERATOR_BETWEEN.search(r)]
    return max(runs, key=len) if runs else None


def _since_last_user(raw: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The last user message's text and the messages after it."""
    for i in range(len(raw) - 1, -1, -1):
        if raw[i]["role"] == "user":
            return _content_text(raw[i].get("content"), i), raw[i + 1:]
    return "", list(raw)


def _tool_arguments(fn: dict[str, Any], text: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    properties = (fn.get("parameters") or {}).get("properties") or {}
    for name, spec in properties.items():
        kind = spec.get("type", "string") if isinstance(spec, dict) else "string"
        if name == "expression":
            args[name] = find_expression(text) or text
        elif kind == "string":
            args[name] = text
        elif kind in ("number", "integer") and (number := _NUMBER.search(text)):
            value = float(number.group())
            args[name] = int(value) if kind == "integer" or value.is_integer() else value
    return args


def plan_tool_call(raw: list[dict[str, Any]], tools: list[dict[str, Any]],
                   choice: str | None) -> ToolCall | None:
    """The tool call the simulator answers ``raw`` with, or None for a text answer."""
    if not tools or choice == "none":
        return None
    text, after = _since_last_user(raw)
    called = {c["function"]["name"] for m in after if m["role"] == "assistant"
              for c in m.get("tool_calls") or ()}
    by_name = {t["name"]: t for t in tools}
    if choice not in ("auto", "required"):
        wanted = [choice]
    else:
        lowered = text.lower()
        named = sorted((lowered.find(n.lower()), n) for n in by_name if n.lower() in lowered)
        wanted = [n for _, n in named] or [tools[0]["name"]]
    todo = [n for n in wanted if n not in called]
    if not todo:
        return None
    fn = by_name[todo[0]]
    arguments = json.dumps(_tool_arguments(fn, text), separators=(",", ":"))
    key = json.dumps([raw, fn["name"]], sort_keys=True, default=str).encode()
    return ToolCall("call_" + hashlib.sha256(key).hexdigest()[:24], fn["name"], arguments)


def tool_result_tokens(raw: list[dict[str, Any]], n: int, seed: int | None = None) -> list[str] | None:
    """The reply quoting the tool results after the last user message (None: there are none)."""
    _text, after = _since_last_user(raw)
    names = {c["id"]: c["function"]["name"] for m in after if m["role"] == "assistant"
             for c in m.get("tool_calls") or ()}
    results = [(names.get(m.get("tool_call_id"), "tool"), _content_text(m.get("content"), 0))
               for m in after if m["role"] == "tool"]
    if not results:
        return None
    words = ["[simulated", "reply]"]
    for name, content in results:
        words += [f"{name}:", *_quote(content.split())]
    key = json.dumps([seed or 0, results]).encode()
    words += [_FILLER[b % len(_FILLER)] for b in hashlib.shake_256(key).digest(n)]
    return [w if i == 0 else " " + w for i, w in enumerate(words[:n])]


# Words that say little about what a text means; left out unless a text has nothing else.
_STOPWORD_TEXT = (
    "a an and are as at be been but by can do does for from had has have how i if in into is "
    "it its me my no not of on or our so than that the their them then there these they this "
    "to us was we were what when where which who why will with would you your")
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[^\W_]+")
_TRIGRAM_WEIGHT = 0.3  # of a word's weight, per character trigram of it


@lru_cache(maxsize=200_000)
def _features(word: str) -> tuple[tuple[int, float], ...]:
    """(64-bit hash, weight with a hashed sign) of a word and of its character trigrams
    (``<refund>`` → ``<re``, ``ref``, …): ``refund`` and ``refunds`` share most of them."""
    padded = f"<{word}>"
    grams = [padded[i:i + 3] for i in range(len(padded) - 2)] if len(word) > 2 else []
    out = []
    for feature, weight in ((f"w:{word}", 1.0), *((f"g:{g}", _TRIGRAM_WEIGHT) for g in grams)):
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        out.append((h, weight if h >> 63 else -weight))
    return tuple(out)


def embed(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text`` that carries a little meaning: a hashed bag
    of its words (lower-cased, stopwords left out, weight 1 + log(count)) and of their
    character trigrams, each added with a hashed sign to one of ``dim`` buckets (the
    "hashing trick"), then normalised. Texts sharing words are close by cosine; the same
    text always gives the same vector. A text without words falls back to hash bytes."""
    words = _WORD.findall(text.lower())
    counts = Counter(w for w in words if w not in _STOPWORDS) or Counter(words)
    vec = [0.0] * dim
    for word, n in counts.items():
        scale = 1.0 + math.log(n)
        for h, weight in _features(word):
            vec[h % dim] += weight * scale
    norm = math.sqrt(sum(v * v for v in vec))
    if not norm:  # no words at all (or buckets that cancelled out): hash the bytes
        raw = struct.unpack(f"<{dim}I", hashlib.shake_256(text.encode()).digest(4 * dim))
        vec = [x / 2**31 - 1 for x in raw]
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Sim:
    def __init__(self, settings: SimSettings):
        self.stats = _Stats()
        self._go = threading.Event()  # set unless settings.hold (made in the worker: gevent's)
        self.configure(settings)

    def configure(self, settings: SimSettings) -> None:
        self.rng = random.Random(settings.seed)  # failure injection, not crypto
        self.settings = settings
        if settings.hold:
            self._go.clear()
        else:
            self._go.set()

    def hold(self, s: SimSettings) -> None:
        """While ``hold`` is on, wait until it is off (at most HOLD_MAX_S)."""
        if not s.hold:
            return
        self.stats.add("held")
        try:
            self._go.wait(HOLD_MAX_S)
        finally:
            self.stats.add("held", -1)

    def pick_error(self, s: SimSettings, rate: float | None = None) -> str | None:
        rate = s.error_rate if rate is None else rate
        if rate and self.rng.random() < rate:
            return self.rng.choice(s.error_kinds)
        return None

    def injected_error(self, kind: str, s: SimSettings) -> Response:
        self.stats.add("errors_injected", sub=kind)
        if kind == "429":
            return _error(429, "Rate limit reached for requests (simulated).", "requests",
                          "rate_limit_exceeded", headers={"Retry-After": "1"})
        if kind == "timeout":
            time.sleep(s.hang_s)  # cooperative under gunicorn's gevent worker
            return _error(504, "Upstream timed out (simulated).", "timeout", "timeout")
        return _error(500, "The server had an error while processing your request "
                      "(simulated).", "server_error", "server_error")

    def stream(self, s: SimSettings, base: dict[str, Any], tokens: list[str], finish: str,
               usage: dict[str, Any] | None, call: ToolCall | None = None,
               logged: dict[str, Any] | None = None) -> Iterator[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            extra = {"usage": None} if usage else {}  # OpenAI sends usage: null until the end
            return _sse({**base, "choices": [choice], **extra})

        # Counted here rather than in the view: an unstarted generator is closed silently.
        self.stats.add("chat_completions_started")
        self.stats.add("active_streams")
        done = False
        try:
            yield b""  # gunicorn sends the headers now, like OpenAI, before the first token
            time.sleep(s.ttft_s)
            if call is not None:  # the id and name first, then the arguments in pieces
                head = {"index": 0, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}
                yield chunk({"role": "assistant", "content": None, "refusal": None,
                             "tool_calls": [head]})
                for i in range(0, len(call.arguments), 10):
                    piece = call.arguments[i:i + 10]
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                self.stats.add("tool_calls_sent")
            else:
                yield chunk({"role": "assistant", "content": "", "refusal": None})
            for i, token in enumerate(tokens):
                if i and s.tokens_per_s:
                    time.sleep(1 / s.tokens_per_s)
                yield chunk({"content": token})
                self.stats.add("tokens_sent")  # yield returned: the server wrote the token
            yield chunk({}, finish)
            if usage:
                yield _sse({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            done = True
        except GeneratorExit:  # the server closes us when a write fails: client went away
            self.stats.add("streams_closed_early")
            if logged is not None:
                self.stats.mark_closed_early(logged)
            raise
        finally:
            self.stats.add("active_streams", -1)
            if done:
                self.stats.add("chat_completions_completed")


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    details = ("reasoning_tokens", "audio_tokens", "accepted_prediction_tokens",
               "rejected_prediction_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": dict.fromkeys(details, 0)}


def create_app(settings: SimSettings | None = None) -> Flask:
    """Build the simulator's Flask app. Each app has its own settings and counters."""
    app = Flask(__name__)
    sim = _Sim(settings or SimSettings())
    app.extensions["llm_sim"] = sim

    @app.before_request
    def count_request() -> None:
        if request.path.startswith("/v1/"):
            rule = request.url_rule.rule if request.url_rule else "unmatched"
            sim.stats.add("requests", sub=rule)

    @app.errorhandler(_BadRequest)
    def bad_request(e: _BadRequest) -> Response:
        sim.stats.add("bad_requests")
        return _error(400, str(e), "invalid_request_error", param=e.param)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        msg = f"{e.name}: {request.method} {request.path}"
        return _error(e.code or 500, msg, "invalid_request_error")

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = _json_object()
        messages = _parse_messages(body)
        model = _opt(body, "model", _is_name, "a model name")
        if model is None:
            raise _BadRequest("'model' is required.", "model")
        stream = _opt(body, "stream", lambda v: isinstance(v, bool), "a boolean")
        opts = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
        is_limit = lambda v: _is_int(v) and v >= 1  # noqa: E731
        limit = (_opt(body, "max_completion_tokens", is_limit, "an integer >= 1")
                 or _opt(body, "max_tokens", is_limit, "an integer >= 1"))
        _opt(body, "n", lambda v: v == 1, "1 (the simulator makes one choice)")
        tools = _parse_tools(body)
        tool_choice = _tool_choice(body, tools)
        raw = body["messages"]  # well-formed: _parse_messages checked each one
        if tools:
            _check_tool_protocol(raw)
        logged = {"body": body, "headers": dict(request.headers),
                  "remote_port": request.environ.get("REMOTE_PORT"), "closed_early": False}
        sim.stats.record(logged)

        s = sim.settings
        sim.hold(s)
        kind = sim.pick_error(s, s.model_error_rates.get(model))
        if kind:
            return sim.injected_error(kind, s)
        n = min(s.reply_tokens, limit or s.reply_tokens)
        call = plan_tool_call(raw, tools, tool_choice)
        if call is not None:
            tokens, finish = [], "tool_calls"
            usage = _usage(count_prompt_tokens(messages), len(call.arguments) // 4 + 1)
        else:
            tokens = tool_result_tokens(raw, n, s.seed) or reply_tokens(messages, n, s.seed)
            finish = "length" if n < s.reply_tokens else "stop"
            usage = _usage(count_prompt_tokens(messages), n)
        kind_ = "chat.completion.chunk" if stream else "chat.completion"
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind_,
                "created": int(time.time()), "model": model, "service_tier": "default",
                "system_fingerprint": FINGERPRINT}
        headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
        if stream:
            body_iter = sim.stream(s, base, tokens, finish,
                                   usage if opts.get("include_usage") else None, call, logged)
            headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return Response(body_iter, mimetype="text/event-stream", headers=headers)

        sim.stats.add("chat_completions_started")
        # Same wall time as the streamed answer would take, so both modes compare fairly.
        time.sleep(s.ttft_s + ((len(tokens) - 1) / s.tokens_per_s if s.tokens_per_s and tokens
                               else 0))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens) or None,
                                   "refusal": None, "annotations": []}
        if call is not None:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]
            sim.stats.add("tool_calls_sent")
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        sim.stats.add("tokens_sent", len(tokens))
        sim.stats.add("chat_completions_completed")
        resp = jsonify({**base, "choices": [choice], "usage": usage})
        resp.headers.update(headers)
        return resp

    @app.get("/v1/models")
    def list_models() -> Response:
        return jsonify({"object": "list", "data": [_model(m) for m in MODELS]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str) -> Response:
        return jsonify(_model(model_id))  # any model name is accepted

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        body = _json_object()
        model = _opt(body, "model", _is_name, "a model name")
        texts = _embedding_inputs(body.get("input"))
        dim = _opt(body, "dimensions", lambda v: _is_int(v) and 1 <= v <= 8192,
                   "an integer in [1, 8192]") or sim.settings.embedding_dim
        fmt = _opt(body, "encoding_format", lambda v: v in ("float", "base64"),
                   "'float' or 'base64'") or "float"
        sim.stats.record_embedding({"model": model, "inputs": len(texts),
                                    "dimensions": body.get("dimensions"),
                                    "headers": dict(request.headers)})
        s = sim.settings
        kind = sim.pick_error(s, s.embedding_error_rate)
        if kind:
            return sim.injected_error(kind, s)
        time.sleep(s.embedding_latency_s)  # cooperative under gunicorn's gevent worker
        sim.stats.add("embedding_inputs", len(texts))
        data = []
        for i, text in enumerate(texts):
            vec: Any = embed(text, dim)
            if fmt == "base64":  # what the openai client requests by default
                vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = sum(len(t.split()) for t in texts)
        return jsonify({"object": "list", "data": data, "model": model or MODELS[1],
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/sim/stats")
    def stats() -> Response:
        return jsonify(sim.stats.snapshot())

    @app.get("/sim/requests")
    def requests_seen() -> Response:
        return jsonify(sim.stats.requests())

    @app.get("/sim/embedding-requests")
    def embedding_requests_seen() -> Response:
        return jsonify(sim.stats.embedding_requests())

    @app.post("/sim/reset")
    def reset() -> Response:
        sim.stats.reset()
        return jsonify(sim.stats.snapshot())

    @app.route("/sim/config", methods=["GET", "POST"])
    def config() -> Response:
        if request.method == "POST":
            try:
                sim.configure(sim.settings.updated(_json_object()))
            except ValueError as e:
                raise _BadRequest(str(e)) from e
        return jsonify(dataclasses.asdict(sim.settings))

    return app


def _embedding_inputs(value: Any) -> list[str]:
    """Strings, or token arrays (langchain's OpenAIEmbeddings sends those) hashed as text."""
    items = value if isinstance(value, list) and value and not _is_int(value[0]) else [value]
    texts = []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            texts.append(" ".join(map(str, item)))
        else:
            raise _BadRequest("'input' must be a non-empty string, a non-empty array of "
                              "non-empty strings, or token arrays.", "input")
    return texts


def main(argv: list[str] | None = None) -> None:
    """CLI: serve the simulator under gunicorn with gevent workers."""
    from flowgate.common.serving import serve

    p = argparse.ArgumentParser(prog="flowgate llm-sim", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second (0 = no delay)")
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--error-rate", type=float, default=0.0, help="0..1, chat completions only")
    p.add_argument("--error-kinds", default="500,429", help="comma list of 500,429,timeout")
    p.add_argument("--hang", type=float, default=30.0, help="seconds a 'timeout' error hangs")
    p.add_argument("--seed", type=int, default=None, help="seed for filler and errors")
    p.add_argument("--workers", type=int, default=1,
                   help="gunicorn workers (default 1). Counters and /sim/config are per "
                        "worker process, so keep 1 when tests read /sim/stats.")
    args = p.parse_args(argv)
    try:
        settings = SimSettings(ttft_s=args.ttft, tokens_per_s=args.tps,
                               reply_tokens=args.reply_tokens, error_rate=args.error_rate,
                               error_kinds=args.error_kinds, hang_s=args.hang,
                               seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    # Short graceful_timeout: the simulator has nothing worth finishing on shutdown.
    serve(partial(create_app, settings), host=args.host, port=args.port, workers=args.workers,
          graceful_timeout=3, proc_name="flowgate-llm-sim")


if __name__ == "__main__":
    main()
