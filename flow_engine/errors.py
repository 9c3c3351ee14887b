"""The engine's error tree. Every error a client can see carries an HTTP status and a
stable machine-readable ``code``; the API turns them into the DESIGN.md error body
``{"error": {"code", "message", "trace_id"}}``.

    FlowgateError (500 internal)
    ├── BadRequest (400 bad_request)
    ├── Forbidden (403 forbidden)           names the role needed
    ├── NotFound (404 not_found)
    │   ├── FlowNotFound (404 flow_not_found)
    │   └── RunNotFound (404 run_not_found)
    ├── Conflict (409 conflict)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── FlowInvalid (422 flow_invalid)      carries every validation Problem
    ├── RunFailed (502 run_failed)          a node raised while the flow ran
    │   └── LLMError (502 llm_error)        the model provider failed
    ├── RunCancelled (409 run_cancelled)
    ├── TenantLimited (429 tenant_limit)    carries retry_after_s
    └── RunTimeout (504 run_timeout)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem: where (a JSON path such as ``$.nodes[2].params.k``) and what."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class FlowgateError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return body


class BadRequest(FlowgateError):
    status, code = 400, "bad_request"


class Forbidden(FlowgateError):
    status, code = 403, "forbidden"


class NotFound(FlowgateError):
    status, code = 404, "not_found"


class FlowNotFound(NotFound):
    code = "flow_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class Conflict(FlowgateError):
    status, code = 409, "conflict"


class PayloadTooLarge(FlowgateError):
    status, code = 413, "payload_too_large"


class FlowInvalid(FlowgateError):
    """A flow definition (or a run's tweaks) failed validation; ``problems`` lists all of it."""

    status, code = 422, "flow_invalid"

    def __init__(self, problems: list[Problem], message: str | None = None) -> None:
        self.problems = list(problems)
        summary = message or _summarise(self.problems)
        super().__init__(summary, problems=[p.as_dict() for p in self.problems])


class RunFailed(FlowgateError):
    status, code = 502, "run_failed"


class LLMError(RunFailed):
    code = "llm_error"


class RunCancelled(FlowgateError):
    status, code = 409, "run_cancelled"


class TenantLimited(FlowgateError):
    """A tenant is at one of its limits (concurrent runs, LLM tokens per minute)."""

    status, code = 429, "tenant_limit"

    def __init__(self, message: str, *, retry_after_s: int, limit: str) -> None:
        super().__init__(message, retry_after_s=retry_after_s, limit=limit)
        self.retry_after_s = retry_after_s


class RunTimeout(FlowgateError):
    status, code = 504, "run_timeout"


def _summarise(problems: list[Problem]) -> str:
    if not problems:
        return "flow is invalid"
    first = str(problems[0])
    more = len(problems) - 1
    return f"{first}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
