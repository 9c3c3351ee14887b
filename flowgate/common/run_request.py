"""The rules of a run request — LangFlow's run body plus Flowgate's ``version`` pin — written
once. The ambassador checks a ``POST /run-flow`` body with :func:`check_run_body` and a
WebSocket run message's flow id with :func:`flow_id_problem`; the engine's ``RunRequest``
(``flow_engine/runs/request.py``: HTTP runs and WebSocket run messages) and its publish
route use the field checks. Each check returns why a value is refused, or None."""

from __future__ import annotations

import re
from typing import Any

MAX_VERSION = 2**31 - 1  # what every store column takes
MAX_SESSION_ID = 200
IO_KINDS = ("chat", "text", "any")  # what the engine runs
IO_TYPES = (*IO_KINDS, "debug")  # what it accepts (debug: any)
ON_DISCONNECT = ("cancel", "continue")
CHOICES = {"input_type": IO_TYPES, "output_type": IO_TYPES, "on_disconnect": ON_DISCONNECT}
RUN_FLOW_FIELDS = {"flow_id", "input", "input_value", "session_id", "tweaks", "version", "stream",
                   "input_type", "output_type", "on_disconnect"}
FLOW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")  # always fullmatch: no trailing \n


def flow_id_problem(value: Any) -> str | None:
    if isinstance(value, str) and FLOW_ID.fullmatch(value) is not None:
        return None
    return "flow_id is required: the id or name of a flow (letters, digits, '_', '.', '-')"


def input_problem(value: Any, name: str = "input") -> str | None:
    return f"{name} must be a string" if value is not None and not isinstance(value, str) else None


def session_id_problem(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and 0 < len(value) <= MAX_SESSION_ID
                         and "\x00" not in value):  # PostgreSQL text cannot hold NUL
        return None
    return f"session_id must be a string of 1-{MAX_SESSION_ID} characters, without NUL"


def tweaks_problem(value: Any) -> str | None:
    if value is None or isinstance(value, dict):
        return None
    return "tweaks must be an object {node_id: {param: value}}"


def version_of(value: Any) -> Any:
    """``value`` with a whole float made an int: 2.0 is an integer in JSON (Schema) too."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def is_version(value: Any) -> bool:
    """A version number a store can hold (an int from 1 to MAX_VERSION; not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= MAX_VERSION


def version_problem(value: Any) -> str | None:
    """For a value already passed through :func:`version_of`."""
    if value is None or is_version(value):
        return None
    return f"version must be an integer from 1 to {MAX_VERSION}"


def stream_problem(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "stream must be true or false"


def choice_problem(name: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None or value in allowed:
        return None
    return f"{name} must be one of {', '.join(allowed)}"


def check_run_body(body: Any) -> str | None:
    """Why a ``POST /run-flow`` body is refused, or None. Normalises ``body`` in place:
    LangFlow's ``input_value`` becomes ``input``, a ``version`` of 2.0 becomes 2."""
    if not isinstance(body, dict):
        return 'the body must be a JSON object like {"flow_id": "faq", "input": "hello"}'
    if "input_value" in body:  # LangFlow's name for it (the WebSocket takes it too)
        if "input" in body and body["input"] != body["input_value"]:
            return "input and input_value are one field (input_value is LangFlow's name); send one"
        body["input"] = body.pop("input_value")
    unknown = sorted(set(body) - RUN_FLOW_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RUN_FLOW_FIELDS))}"
    problem = (flow_id_problem(body.get("flow_id")) or input_problem(body.get("input"))
               or session_id_problem(body.get("session_id"))
               or tweaks_problem(body.get("tweaks")))
    if problem:
        return problem
    if "version" in body:
        body["version"] = version_of(body["version"])
    problem = version_problem(body.get("version")) or stream_problem(body.get("stream"))
    for name, allowed in CHOICES.items():  # the engine took {} or 0 for "chat"
        problem = problem or choice_problem(name, body.get(name), allowed)
    return problem
