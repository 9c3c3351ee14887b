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

_TYPES = ("chat", "text", "any")
MAX_INPUT_CHARS = 1_000_000
MAX_VERSION = 2**31 - 1  # what every store column (and the ambassador) takes
RUN_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: every run id the engine hands out


def known_run_id(run_id: str) -> bool:
    """Could the engine have made this run id? Anything else is unknown at once — before a
    store, a Redis key or a response header ever sees the caller's string."""
    return RUN_ID.fullmatch(run_id) is not None


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
        if value is not None and not isinstance(value, str):
            raise BadRequest("input_value must be a string")
        if value is not None and len(value) > MAX_INPUT_CHARS:
            raise BadRequest(f"input_value is longer than {MAX_INPUT_CHARS} characters")
        kinds = {}
        for name in ("input_type", "output_type"):
            kind = body.get(name)
            if kind is None or kind == "":
                kind = "chat"
            if kind == "debug":
                kind = "any"
            if not isinstance(kind, str) or kind not in _TYPES:
                raise BadRequest(f"{name} must be one of {', '.join(_TYPES)}")
            kinds[name] = kind
        session = body.get("session_id")
        if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 200):
            raise BadRequest("session_id must be a string of 1-200 characters")
        tweaks = body.get("tweaks")
        if tweaks is not None and not isinstance(tweaks, dict):
            raise BadRequest("tweaks must be an object {node_id: {param: value}}")
        version = body.get("version")
        if isinstance(version, float) and version.is_integer():
            version = int(version)  # 2.0 is an integer in JSON (Schema) too
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or not 1 <= version <= MAX_VERSION):
            raise BadRequest(f"version must be an integer from 1 to {MAX_VERSION}")
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
