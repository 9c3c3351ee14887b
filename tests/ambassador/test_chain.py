"""ambassador.chain: filters run in order on the way in and unwind in reverse; any filter may
answer by itself; the error contract."""

from __future__ import annotations

import json

import pytest

from ambassador.chain import Request, Response, build_chain, error_response, json_response
from flowgate.common import tracing


class Named:
    """A filter that logs its passage both ways, or answers by itself with ``answer``."""

    def __init__(self, name: str, log: list[str], answer: Response | None = None) -> None:
        self.name, self.log, self.answer = name, log, answer

    def __call__(self, request: Request, next) -> Response:
        self.log.append(f"in:{self.name}")
        request.ctx.setdefault("seen", []).append(self.name)
        if self.answer is not None:
            self.log.append(f"answer:{self.name}")
            return self.answer
        response = next(request)
        self.log.append(f"out:{self.name}")
        response.headers.setdefault("X-Order", "")
        response.headers["X-Order"] += self.name
        return response


def terminal_for(log: list[str]):
    def terminal(request: Request) -> Response:
        log.append("terminal")
        return Response(200, {}, b"ok")

    return terminal


def test_filters_run_in_order_and_unwind_in_reverse(request_for) -> None:
    log: list[str] = []
    chain = build_chain([Named(n, log) for n in "abc"], terminal_for(log))
    req = request_for()
    response = chain(req)
    assert log == ["in:a", "in:b", "in:c", "terminal", "out:c", "out:b", "out:a"]
    assert response.headers["X-Order"] == "cba"
    assert req.ctx["seen"] == ["a", "b", "c"]  # ctx is shared along the chain


@pytest.mark.parametrize(("answering", "expected_log"), [
    pytest.param("a", ["in:a", "answer:a"], id="first-filter-answers"),
    pytest.param("b", ["in:a", "in:b", "answer:b", "out:a"], id="middle-filter-answers"),
    pytest.param("c", ["in:a", "in:b", "in:c", "answer:c", "out:b", "out:a"], id="last-filter-answers"),
])
def test_a_filter_answering_by_itself_short_circuits(request_for, answering, expected_log) -> None:
    log: list[str] = []
    own = Response(429, {}, b"slow down")
    chain = build_chain([Named(n, log, own if n == answering else None) for n in "abc"],
                        terminal_for(log))
    response = chain(request_for())
    assert log == expected_log
    assert "terminal" not in log
    assert response is own and response.status == 429


def test_no_filters_is_the_terminal_itself(request_for) -> None:
    log: list[str] = []
    assert build_chain([], terminal_for(log))(request_for()).body == b"ok"
    assert log == ["terminal"]


def test_error_response_follows_the_error_contract(request_for) -> None:
    trace = tracing.from_headers(None, None)
    req = request_for(ctx={"trace": trace})
    response = error_response(429, "rate_limited", "too many", req, headers={"Retry-After": "3"})
    assert response.status == 429
    assert response.headers == {"Content-Type": "application/json", "Retry-After": "3"}
    assert response.json() == {"error": {"code": "rate_limited", "message": "too many",
                                         "trace_id": trace.trace_id}}


@pytest.mark.parametrize("req", [pytest.param(None, id="no-request"),
                                 pytest.param(Request("GET", "/", {}, "/x"), id="no-trace")])
def test_error_response_without_a_trace_has_a_null_trace_id(req) -> None:
    assert error_response(500, "internal", "x", req).json()["error"]["trace_id"] is None


def test_request_header_lookup_is_case_insensitive_on_the_name(request_for) -> None:
    req = request_for(headers={"Idempotency-Key": "k1"})
    assert req.header("IDEMPOTENCY-KEY") == "k1"
    assert req.header("missing", "d") == "d"


def test_response_helpers() -> None:
    assert Response(200).json() is None
    assert not Response(200, body=b"{}").streamed
    assert Response(200, chunks=iter([b"x"])).streamed
    r = json_response(201, {"a": 1}, {"X-A": "b"})
    assert (r.status, json.loads(r.body), r.headers["X-A"]) == (201, {"a": 1}, "b")
