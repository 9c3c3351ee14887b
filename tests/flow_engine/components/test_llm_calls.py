"""The run's ledger (flow_engine/components/llm_calls.py): what each LLM call costs the run,
fed from LangChain's callbacks — by the run's recorder and by the flows it calls."""

from __future__ import annotations

import uuid

from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from flow_engine.components.llm_calls import Ledger

START = {"metadata": {"flowgate_endpoint": "llm.example:443", "ls_model_name": "m1"}}


def answered(tokens: dict[str, int] | None) -> LLMResult:
    message = AIMessage(content="hi", usage_metadata=tokens) if tokens else AIMessage("hi")
    return LLMResult(generations=[[ChatGeneration(message=message)]])


def test_an_answered_call_adds_its_reported_usage_and_one_call():
    ledger, call = Ledger(), uuid.uuid4()
    ledger.started(call, START)
    ledger.ended(call, answered({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}))

    assert ledger.usage == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                            "llm_calls": 1}
    [made] = ledger.calls
    assert (made.provider, made.model, made.outcome, made.input_tokens, made.output_tokens) == (
        "llm.example:443", "m1", "ok", 7, 3)


def test_a_call_that_reports_no_usage_costs_at_least_what_it_streamed():
    ledger, call = Ledger(), uuid.uuid4()
    ledger.started(call, START)
    for _ in range(4):
        ledger.token(call)
    ledger.ended(call, answered(None))
    assert (ledger.usage["output_tokens"], ledger.calls[0].output_tokens) == (4, 4)


def test_a_failed_call_is_charged_what_it_streamed_at_once_and_only_once():
    """A sub-flow's call that fails after streaming: the run may go on and succeed (the
    tool answers the error), so what it streamed is charged when it fails — not only if the
    run stops (spent) — and spent() does not count it a second time."""
    ledger, call = Ledger(), uuid.uuid4()
    ledger.started(call, START)
    for _ in range(5):
        ledger.token(call)
    ledger.failed(call, TimeoutError("read timed out"))

    assert (ledger.usage["output_tokens"], ledger.usage["total_tokens"]) == (5, 5)
    assert ledger.usage["llm_calls"] == 0  # answered calls only
    assert ledger.spent() == ledger.usage
    [made] = ledger.calls
    assert (made.outcome, made.output_tokens) == ("timeout", 5)


def test_a_call_in_flight_counts_in_spent_only():
    ledger, call = Ledger(), uuid.uuid4()
    ledger.started(call, START)
    ledger.token(call)
    assert ledger.usage["output_tokens"] == 0
    assert ledger.spent()["output_tokens"] == 1


def test_a_rate_limited_call_is_told_from_other_failures():
    class Limited(Exception):
        status_code = 429

    ledger, first, second = Ledger(), uuid.uuid4(), uuid.uuid4()
    for call in (first, second):
        ledger.started(call, START)
    ledger.failed(first, Limited("slow down"))
    ledger.failed(second, ValueError("bad answer"))
    assert [c.outcome for c in ledger.calls] == ["rate_limited", "error"]


def test_a_providers_negative_token_counts_are_not_trusted():
    ledger, call = Ledger(), uuid.uuid4()
    ledger.started(call, START)
    ledger.ended(call, answered({"input_tokens": -100, "output_tokens": 2, "total_tokens": -98}))
    assert ledger.usage["input_tokens"] == 0 and ledger.usage["total_tokens"] == 0
