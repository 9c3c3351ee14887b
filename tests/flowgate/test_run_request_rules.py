"""The run-request rules (flowgate/common/run_request.py): check_run_body as the
ambassador's POST /run-flow applies it (its messages, its in-place normalising), and the
field checks the engine and the WebSocket guards share."""

from __future__ import annotations

from typing import Any

import pytest

from flowgate.common import run_request as rules
from flowgate.common.run_request import check_run_body

OK = {"flow_id": "faq", "input": "hello"}


@pytest.mark.parametrize("body", [
    pytest.param(OK, id="minimal"),
    pytest.param({"flow_id": "faq"}, id="no-input"),
    pytest.param({**OK, "session_id": "s" * 200, "tweaks": {}, "version": 2**31 - 1,
                  "stream": False, "input_type": "debug", "output_type": "text",
                  "on_disconnect": "continue"}, id="every-field"),
    pytest.param({**OK, "session_id": None, "tweaks": None, "version": None, "stream": None,
                  "input_type": None, "on_disconnect": None}, id="nulls"),
])
def test_good_bodies_pass(body: dict[str, Any]) -> None:
    assert check_run_body(dict(body)) is None


@pytest.mark.parametrize(("body", "message"), [
    pytest.param([], 'the body must be a JSON object like {"flow_id": "faq", "input": "hello"}',
                 id="not-an-object"),
    pytest.param({**OK, "input_value": "other"}, "input and input_value are one field "
                 "(input_value is LangFlow's name); send one", id="input-twice"),
    pytest.param({**OK, "zz": 1, "aa": 2}, "unknown field(s) aa, zz; allowed: flow_id, input, "
                 "input_type, input_value, on_disconnect, output_type, session_id, stream, "
                 "tweaks, version", id="unknown-fields"),
    pytest.param({"flow_id": "faq\n"}, "flow_id is required: the id or name of a flow "
                 "(letters, digits, '_', '.', '-')", id="trailing-newline"),
    pytest.param({"input": "x"}, "flow_id is required: the id or name of a flow "
                 "(letters, digits, '_', '.', '-')", id="no-flow-id"),
    pytest.param({**OK, "input": 3}, "input must be a string", id="input"),
    pytest.param({**OK, "session_id": ""}, "session_id must be a string of 1-200 characters, "
                 "without NUL", id="session-empty"),
    pytest.param({**OK, "session_id": "s" * 201}, "session_id must be a string of 1-200 "
                 "characters, without NUL", id="session-long"),
    pytest.param({**OK, "session_id": "a\x00b"}, "session_id must be a string of 1-200 "
                 "characters, without NUL", id="session-nul"),
    pytest.param({**OK, "tweaks": []}, "tweaks must be an object {node_id: {param: value}}",
                 id="tweaks"),
    pytest.param({**OK, "version": 0}, "version must be an integer from 1 to 2147483647",
                 id="version-0"),
    pytest.param({**OK, "version": 2**31}, "version must be an integer from 1 to 2147483647",
                 id="version-too-big"),
    pytest.param({**OK, "version": True}, "version must be an integer from 1 to 2147483647",
                 id="version-bool"),
    pytest.param({**OK, "version": 1.5}, "version must be an integer from 1 to 2147483647",
                 id="version-fraction"),
    pytest.param({**OK, "stream": "yes"}, "stream must be true or false", id="stream"),
    pytest.param({**OK, "input_type": "html"}, "input_type must be one of chat, text, any, debug",
                 id="input-type"),
    pytest.param({**OK, "output_type": {}}, "output_type must be one of chat, text, any, debug",
                 id="output-type-object"),
    pytest.param({**OK, "on_disconnect": "stop"}, "on_disconnect must be one of cancel, continue",
                 id="on-disconnect"),
    pytest.param({**OK, "tweaks": 1, "stream": 1}, "tweaks must be an object {node_id: "
                 "{param: value}}", id="first-problem-wins"),
])
def test_bad_bodies_are_refused_with_their_message(body: Any, message: str) -> None:
    assert check_run_body(body) == message


def test_the_body_is_normalised_in_place() -> None:
    body = {"flow_id": "faq", "input_value": "hi", "version": 2.0}
    assert check_run_body(body) is None
    assert body == {"flow_id": "faq", "input": "hi", "version": 2}
    assert type(body["version"]) is int
    same = {"flow_id": "faq", "input": "hi", "input_value": "hi"}
    assert check_run_body(same) is None and same == {"flow_id": "faq", "input": "hi"}


def test_the_engine_runs_fewer_io_types_than_are_accepted() -> None:
    assert rules.choice_problem("input_type", "debug", rules.IO_TYPES) is None
    assert rules.choice_problem("input_type", "debug", rules.IO_KINDS) == (
        "input_type must be one of chat, text, any")


@pytest.mark.parametrize(("value", "number", "ok"), [
    pytest.param(2.0, 2, True, id="whole-float"),
    pytest.param(7, 7, True, id="int"),
    pytest.param(1.5, 1.5, False, id="fraction"),
    pytest.param(False, False, False, id="bool"),
    pytest.param("3", "3", False, id="string"),
])
def test_version_of_then_is_version(value: Any, number: Any, ok: bool) -> None:
    assert rules.version_of(value) == number
    assert rules.is_version(rules.version_of(value)) is ok


def test_input_is_named_as_the_caller_named_it() -> None:
    assert rules.input_problem(1, "input_value") == "input_value must be a string"
    assert rules.input_problem(None) is None and rules.input_problem("") is None
