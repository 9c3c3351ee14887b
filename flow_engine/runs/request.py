"""A run request as the API received it (LangFlow's run body plus Flowgate's ``version``
pin), validated, and the run it became once routed and compiled."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flow_engine.auth import Principal
from flow_engine.errors import BadRequest
from flow_engine.flows.compile import CompiledFlow
from flow_engine.runs.runner import CancelToken, RunInput
from flow_engine.store.base import RunRecord
from flowgate.common import run_request as rules

MAX_INPUT_CHARS = 1_000_000
RUN_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: every run id the engine hands out


def known_run_id(run_id: str) -> bool:
    """Could the engine have made this run id? Anything else is unknown at once — before a
    store, a Redis key or a response header ever sees the caller's string."""
    return RUN_ID.fullmatch(run_id) is not None


def on_disconnect(value: Any) -> str:
    """A run's ``on_disconnect`` (query parameter, body field or WebSocket message field):
    ``cancel`` or ``continue``, else BadRequest."""
    if value not in rules.ON_DISCONNECT:
        raise BadRequest("on_disconnect must be 'cancel' or 'continue'")
    return value


def _refuse(problem: str | None) -> None:
    if problem:
        raise BadRequest(problem)


@dataclass(frozen=True)
class RunRequest:
    """LangFlow's run body plus Flowgate's ``version`` pin, validated."""

    input_value: str | None
    input_type: str
    output_type: str
    session_id: str | None
    tweaks: dict[str, Any] | None
    version: int | None

    @classmethod
    def from_body(cls, body: Any) -> RunRequest:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("the run body must be a JSON object like "
                             '{"input_value": "hello", "session_id": "s1"}')
        value = body.get("input_value")
        _refuse(rules.input_problem(value, "input_value"))
        if value is not None and len(value) > MAX_INPUT_CHARS:
            raise BadRequest(f"input_value is longer than {MAX_INPUT_CHARS} characters")
        kinds = {}
        for name in ("input_type", "output_type"):
            kind = body.get(name)
            if kind is None or kind == "":
                kind = "chat"
            if kind == "debug":
                kind = "any"
            _refuse(rules.choice_problem(name, kind, rules.IO_KINDS))
            kinds[name] = kind
        session, tweaks = body.get("session_id"), body.get("tweaks")
        version = rules.version_of(body.get("version"))
        _refuse(rules.session_id_problem(session) or rules.tweaks_problem(tweaks)
                or rules.version_problem(version))
        return cls(value, kinds["input_type"], kinds["output_type"], session, tweaks or None,
                   version)

    def run_input(self, tenant: str | None = None, identity: str | None = None,
                  trace_id: str | None = None) -> RunInput:
        return RunInput(self.input_value, self.input_type, self.output_type, self.session_id,
                        tenant, identity, trace_id)


@dataclass
class PreparedRun:
    """A request routed to a version and compiled, about to run (or to be replayed)."""

    run_id: str
    compiled: CompiledFlow
    request: RunRequest
    cancel: CancelToken
    caller: Principal
    replay: RunRecord | None = None  # set when an earlier run with this key answers
    record: RunRecord | None = None
    started_at: float = 0.0
    claim_s: float = 0.0  # spent claiming the idempotency key (Server-Timing: idem)
    first_token_at: float | None = None
    span_parent: Any = None  # the OpenTelemetry context of the request that started it

    @property
    def tenant(self) -> str:
        return self.caller.tenant

    @property
    def keyed(self) -> bool:
        return self.record is not None and self.record.idempotency_key is not None
