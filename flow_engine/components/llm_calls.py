"""What a run's LLM calls cost: :class:`Ledger` sums their usage and keeps each call
(:class:`LlmCall`, for the per-model figures in metrics.py), fed from LangChain's LLM
callbacks.

A run's recorder (runs/recorder.py) keeps the run's ledger and puts it in the run's context;
a flow the run calls through a FlowTool (components/subflows.py) feeds the same ledger from
its own callbacks. So every call of a sub-flow is counted as it ends — in the run's usage
(what the tenant's token budget is charged), with its model, latency and outcome — also when
the sub-flow fails after it (the tool then answers with the error, and nothing of the
sub-flow's own accounting would come back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from flow_engine.errors import RunCancelled

USAGE_KEYS = ("input_tokens", "output_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class LlmCall:
    """One LLM call of a run, for the engine's per-model figures (metrics.py)."""

    provider: str  # the endpoint (host[:port]) for OpenAI-compatible models
    model: str
    seconds: float
    outcome: str  # ok | error | rate_limited | timeout | cancelled
    input_tokens: int = 0
    output_tokens: int = 0


class Ledger:
    """The usage and calls of one run, its sub-flows' included (see the module docstring).
    Calls are told apart by LangChain's run id, unique across the flows of a run."""

    def __init__(self) -> None:
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "llm_calls": 0}
        self.calls: list[LlmCall] = []
        self._streamed: dict[UUID, int] = {}  # tokens of LLM calls that have not ended
        self._calling: dict[UUID, tuple[float, str, str]] = {}  # start, provider, model

    def started(self, run_id: UUID, kw: dict[str, Any]) -> None:
        """An LLM call began (``kw``: the start callback's keyword arguments)."""
        meta = kw.get("metadata") or {}
        params = kw.get("invocation_params") or {}
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        provider = meta.get("flowgate_endpoint") or meta.get("ls_provider") or "unknown"
        self._calling[run_id] = (time.perf_counter(), str(provider), str(model or "unknown"))

    def token(self, run_id: UUID) -> None:
        self._streamed[run_id] = self._streamed.get(run_id, 0) + 1

    def ended(self, run_id: UUID, response: Any) -> Any:
        """An LLM call answered (``response``: an LLMResult); what it answered (its message,
        else its text)."""
        try:
            generation = response.generations[0][0]
        except (IndexError, AttributeError):
            generation = None
        message = getattr(generation, "message", None)
        usage = getattr(message, "usage_metadata", None) or {}
        streamed = self._streamed.pop(run_id, 0)
        self.usage["llm_calls"] += 1
        for key in USAGE_KEYS:
            self.usage[key] += max(0, int(usage.get(key) or 0))  # a provider's, not trusted
        if not usage:  # no usage reported: what was streamed is the least it cost
            self.usage["output_tokens"] += streamed
            self.usage["total_tokens"] += streamed
        self._call_ended(run_id, "ok", usage, streamed)
        return message if message is not None else getattr(generation, "text", None)

    def failed(self, run_id: UUID, error: BaseException) -> None:
        """An LLM call failed: what it streamed before is charged now (its input is
        unknown, so not counted) — the run may well go on and succeed (a sub-flow's
        failure is its tool's answer, a fallback takes over)."""
        outcome = ("rate_limited" if getattr(error, "status_code", None) == 429
                   else "timeout" if isinstance(error, TimeoutError)
                   else "cancelled" if isinstance(error, RunCancelled) else "error")
        streamed = self._streamed.pop(run_id, 0)
        self.usage["output_tokens"] += streamed
        self.usage["total_tokens"] += streamed
        self._call_ended(run_id, outcome, streamed=streamed)

    def spent(self) -> dict[str, int]:
        """Usage so far, counting the tokens streamed by LLM calls still in flight (a run
        that stops now — failed, cancelled — still cost them)."""
        pending = sum(self._streamed.values())
        return {**self.usage, "output_tokens": self.usage["output_tokens"] + pending,
                "total_tokens": self.usage["total_tokens"] + pending}

    def _call_ended(self, run_id: UUID, outcome: str, usage: dict[str, Any] | None = None,
                    streamed: int = 0) -> None:
        started = self._calling.pop(run_id, None)
        if started is None:
            return
        usage = usage or {}
        self.calls.append(LlmCall(
            started[1], started[2], time.perf_counter() - started[0], outcome,
            max(0, int(usage.get("input_tokens") or 0)),
            max(0, int(usage.get("output_tokens") or 0)) or streamed))
