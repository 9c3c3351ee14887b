"""Property tests (Hypothesis) of what every request of the engine goes through:

- flow validation: any JSON a client can send (``json.loads`` accepts NaN, Infinity and lone
  surrogates too) is either a valid flow or a ``FlowInvalid`` whose problems each have a
  ``$``-path and a message, and the error answer encodes — never another exception (a 500);
- SSE framing: ``sse()`` parsed back by a real SSE parser (sseclient-py, the tests' client)
  and by a strict one written from the WHATWG spec gives the same event, id and data for any
  event data, however the bytes are split into chunks;
- WebSocket messages: ``event_message`` round-trips through the JSON the socket sends.

Examples are derived from the test's name (``derandomize``), so CI is reproducible; set
``FLOWGATE_HYPOTHESIS_EXAMPLES`` for a longer or shorter run, ``FLOWGATE_HYPOTHESIS_RANDOM=1``
to explore new examples.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import sseclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow_engine.api.common import KEEPALIVE, sse
from flow_engine.api.ws import event_message
from flow_engine.components import default_registry
from flow_engine.errors import FlowInvalid
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import RunEvent

EXAMPLES = int(os.environ.get("FLOWGATE_HYPOTHESIS_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("FLOWGATE_HYPOTHESIS_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REGISTRY = default_registry()
TYPES = sorted(REGISTRY.names())
EVENT_NAMES = ["run_started", "node_started", "token", "node_finished", "error", "run_finished"]

# -- strategies ---------------------------------------------------------------------------------

# what json.loads can give: lone surrogates ("\ud800" escapes), NaN and Infinity included
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
# the same without surrogates (what encodes as UTF-8): newlines, controls, any plane
clean_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
tricky_text = st.one_of(clean_text, st.sampled_from([
    "", "\n", "\r", "\r\n", "\n\n", "data: x\n\nid: 9", ": comment", "\x00", "\x1b[31m", "\u2028",
    "\u2029", "\x85", "\x0b\x0c\x1c\x1d\x1e", "\ufeff", "😀", "\U0010ffff", "line\rbreak"]))


def json_values(text: st.SearchStrategy[str], floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), floats, text)
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=20)


any_json = json_values(any_text, st.floats())
clean_json = json_values(tricky_text, st.floats(allow_nan=False))


@st.composite
def flow_like(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed flows: real node types, ids that edges can name, params and ports
    that are sometimes right — to reach the checks behind the first few."""
    ids = draw(st.lists(st.sampled_from(["in", "p", "llm", "out", "r", "x y", "", "Ω"]) | any_text,
                        min_size=0, max_size=6))
    nodes = []
    for node_id in ids:
        node: dict[str, Any] = {"id": node_id, "type": draw(st.sampled_from(TYPES) | any_text)}
        if draw(st.booleans()):
            node["params"] = draw(st.dictionaries(
                st.sampled_from(["template", "provider", "model", "k", "documents", "regex",
                                 "temperature", "max_tokens", "base_url", "messages", "input"])
                | any_text, any_json, max_size=4) | any_json)
        if draw(st.integers(0, 9)) == 0:
            node[draw(any_text)] = draw(any_json)
        nodes.append(node)
    port = st.sampled_from(["input", "question", "context", "query", "true", "false", "text",
                            "messages", "output"]) | any_text
    edges = draw(st.lists(st.fixed_dictionaries(
        {"source": st.sampled_from(ids) if ids else any_text,
         "target": st.sampled_from(ids) if ids else any_text},
        optional={"target_input": port, "source_output": port, "id": any_json}), max_size=8))
    flow: dict[str, Any] = {"nodes": nodes, "edges": edges}
    for key, value in (("id", st.sampled_from(["f", "faq-rag", ""]) | any_json),
                       ("name", any_json), ("description", any_json),
                       ("tweakable", st.dictionaries(any_text, any_json, max_size=3) | any_json)):
        if draw(st.booleans()):
            flow[key] = draw(value)
    return flow


# -- flow validation ----------------------------------------------------------------------------


def assert_valid_or_problems(data: Any) -> None:
    try:
        validate_flow(data, REGISTRY)
    except FlowInvalid as exc:
        assert exc.problems, "FlowInvalid without problems"
        for problem in exc.problems:
            assert isinstance(problem.path, str) and problem.path.startswith("$"), problem
            assert isinstance(problem.message, str) and problem.message.strip(), problem
        # the 422 the API answers: JSON (Flask escapes non-ASCII) that a client can parse
        body = json.dumps({"error": exc.to_dict()})
        assert json.loads(body)["error"]["problems"]


@FUZZ
@given(any_json)
def test_validate_flow_any_json_is_valid_or_a_list_of_problems(data):
    assert_valid_or_problems(data)


@FUZZ
@given(flow_like())
def test_validate_flow_near_misses_are_valid_or_a_list_of_problems(data):
    assert_valid_or_problems(data)


@FUZZ
@given(flow_like())
def test_validate_flow_problems_survive_a_json_round_trip(data):
    """What a client sends is JSON text: a flow that crossed the wire validates the same."""
    try:
        wire = json.loads(json.dumps(data))
    except (ValueError, UnicodeError):
        return
    assert_valid_or_problems(wire)


# -- SSE framing --------------------------------------------------------------------------------


def spec_parse(raw: bytes) -> list[dict[str, Any]]:
    """Server-Sent Events as the WHATWG spec parses them ("Interpreting an event stream"): UTF-8
    decoding, lines ended by CRLF, LF or CR only, ``field: value`` with one leading space
    dropped, comments ignored, an event dispatched at each blank line."""
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines, i, start = [], 0, 0
    while i < len(text):
        if text[i] in "\r\n":
            lines.append(text[start:i])
            i += 2 if text[i] == "\r" and text[i + 1:i + 2] == "\n" else 1
            start = i
        else:
            i += 1
    events, data, event, last_id = [], [], "", None
    for line in lines:
        if line == "":
            if data:
                events.append({"event": event or "message", "data": "\n".join(data), "id": last_id})
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\x00" not in value:
            last_id = value
    return events


def chunks(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True) if raw[a:b]]


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (float infinities included; 1 == 1.0 as JSON says)."""
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a):
        return a == b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


event_ids = st.none() | st.integers(1, 10**9)
event_names = st.sampled_from(EVENT_NAMES)


@FUZZ
@given(st.lists(st.tuples(event_ids, event_names, clean_json), min_size=1, max_size=5),
       st.lists(st.integers(0, 10**6), max_size=8), st.booleans())
def test_sse_frames_parse_back_to_the_same_events(items, cuts, keepalives):
    raw = b"".join(sse(i, e, d) + (KEEPALIVE if keepalives else b"") for i, e, d in items)
    # the spec keeps the last event id for events without one; sseclient gives each its own
    for parsed, keeps_last_id in (
            (spec_parse(raw), True),
            ([{"event": e.event, "data": e.data, "id": e.id}
              for e in sseclient.SSEClient(chunks(raw, cuts)).events()], False)):
        assert len(parsed) == len(items), (raw, parsed)
        last_id = None
        for (event_id, name, data), got in zip(items, parsed, strict=True):
            own_id = str(event_id) if event_id is not None else None
            last_id = own_id or (last_id if keeps_last_id else None)
            assert got["event"] == name
            assert got["id"] == last_id
            assert same_json(json.loads(got["data"]), data), (data, got["data"])


@FUZZ
@given(event_ids, event_names, any_json)
def test_sse_frames_are_utf8_for_any_data_even_lone_surrogates(event_id, name, data):
    """A lone surrogate ("\\ud800" in a client's JSON, an LLM's stream) cannot be encoded as
    UTF-8 as itself: the frame must still be valid UTF-8, one event, holding the same JSON."""
    raw = sse(event_id, name, data)
    parsed = spec_parse(raw)
    assert len(parsed) == 1 and parsed[0]["event"] == name
    got = json.loads(parsed[0]["data"])
    assert same_json(got, data) or json.dumps(got) == json.dumps(data)


# -- WebSocket messages ---------------------------------------------------------------------------

# event data as the runner makes it: an object whose keys never include the message's own
# "type" and "seq" (event_message puts the data's keys after them)
event_data = st.dictionaries(tricky_text.filter(lambda k: k not in ("type", "seq")), clean_json,
                             max_size=5)


@FUZZ
@given(st.integers(0, 10**9), event_names, event_data)
def test_ws_event_messages_round_trip_through_json(seq, name, data):
    message = event_message(RunEvent(seq, name, data))
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    back = json.loads(text.encode("utf-8").decode("utf-8"))
    assert back["type"] == name
    assert back["seq"] == (seq or None)
    assert same_json({k: v for k, v in back.items() if k not in ("type", "seq")}, data)
