"""What a run looks like in the console, in headless Chromium against a real engine and
llm-sim: a node that fails (shown failed, named by the error with how long it ran; the nodes
after it shown as not run, not as skipped), a branch not taken (skipped), every node's
duration, and an agent's tool call shown as a step."""

from __future__ import annotations

import re

import pytest
from console_helpers import flow_definition, signed_in, start_run

pytestmark = pytest.mark.integration

DURATION = re.compile(r"\d+ ms")


def node_states(page) -> dict[str, str]:
    return page.page.locator("svg.graph g.node").evaluate_all(
        "els => Object.fromEntries(els.map(e => [e.dataset.node, e.dataset.state]))")


def node_time(page, node: str) -> str:
    return page.page.text_content(f"svg.graph g.node[data-node='{node}'] .node-time")


def test_a_failed_node_is_shown_failed_and_the_nodes_after_it_not_run(
        open_page, engine, fresh_llm_sim):
    engine.push(flow_definition("failing-flow", max_retries=0))
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["500"])
    page = signed_in(open_page, path="/ui/flows/failing-flow")
    page.page.wait_for_selector("svg.graph")

    start_run(page, "This will fail")
    page.page.wait_for_selector(".run-view[data-state='failed']", timeout=30_000)

    assert node_states(page) == {"in": "done", "prompt": "done", "llm": "failed",
                                 "out": "not-run"}
    assert DURATION.fullmatch(node_time(page, "llm")), node_time(page, "llm")
    assert node_time(page, "out") == "not run"
    error = page.page.inner_text(".run-view .result .error")
    assert error.startswith("llm_error: ") and re.search(r"\(node llm, after \d+ ms\)$", error), error
    assert page.page.inner_text(".run-status") == "Failed: llm_error"
    assert page.page.locator(".steps li", has_text="llm failed after").count() == 1


def test_the_branch_not_taken_is_skipped_and_every_node_run_shows_its_duration(
        open_page, engine, fresh_llm_sim):
    page = signed_in(open_page, path="/ui/flows/support-router")
    page.page.wait_for_selector("svg.graph")

    start_run(page, "I want a refund for my order")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)

    taken = ("in", "route", "returns_prompt", "returns_llm", "returns_out")
    untaken = ("general_prompt", "general_llm", "general_out")
    assert node_states(page) == {**dict.fromkeys(taken, "done"), **dict.fromkeys(untaken, "skipped")}
    for node in taken:
        assert DURATION.fullmatch(node_time(page, node)), (node, node_time(page, node))
        assert page.page.locator(".steps li", has_text=f"{node} finished in").count() == 1
    for node in untaken:
        assert node_time(page, node) == "skipped"
    seen = page.page.evaluate("window.__seen")["nodes"]
    assert all(seen[node][-2:] == ["running", "done"] for node in taken), seen


AGENT = {"id": "calc-agent", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "calc", "type": "Calculator"},
    {"id": "agent", "type": "Agent", "params": {
        "model": "gpt-4o-mini", "tools": ["calc"], "system_prompt": "Use the calculator."}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "calc", "target": "agent", "target_input": "tools.calc"},
              {"source": "agent", "target": "out"}]}


def test_an_agents_tool_call_is_shown_as_a_step(open_page, engine, fresh_llm_sim):
    """llm-sim calls the tool the message names with the expression it holds, then quotes
    the tool's answer."""
    engine.push(AGENT)
    page = signed_in(open_page, path="/ui/flows/calc-agent")
    page.page.wait_for_selector("svg.graph")

    start_run(page, "What is 6*7? Ask the calculator")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)

    steps = page.page.locator(".steps li.step-tool").all_inner_texts()
    assert len(steps) == 2, steps
    call, answer = steps
    assert call.startswith("agent calls calculator: ") and "6*7" in call, call
    assert answer == "calculator answered (success): 42", answer
    assert "42" in page.page.inner_text(".tokens")


def test_a_run_with_a_warning_shows_it_as_text_and_a_flow_without_a_description_none(
        open_page, engine):
    """The console sends a chat input; a flow that reads only text input answers with a
    warning. The page shows it as a line of text (not a DOM object's name), and the flow
    page shows no description where the flow has none (not the word "null")."""
    engine.push({"id": "text-only", "nodes": [{"id": "in", "type": "TextInput"},
                                              {"id": "out", "type": "TextOutput"}],
                 "edges": [{"source": "in", "target": "out"}]})
    page = signed_in(open_page, path="/ui/flows/text-only")
    page.page.wait_for_selector("svg.graph")
    assert "null" not in page.page.inner_text("main").splitlines()

    start_run(page, "Goes nowhere")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)

    warning = page.page.inner_text(".result .warning")
    assert warning.startswith("Warning: input_type 'chat' is read by no input node"), warning
    assert "[object" not in page.page.inner_text(".result")
