"""Every whitelisted component: its describe() entry and JSON Schema, then real runs through
the whole pipeline (validate_flow → FlowVersion → compile_flow → runner.run) with the echo
model, asserting what each node actually produces. BM25Index is checked against BM25 scores
computed here from the formula."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from langchain_core.documents import Document

from flow_engine.components import ALL_COMPONENTS, BuildContext, Limits, default_registry
from flow_engine.components.retrievers import BM25Index
from flow_engine.errors import RunFailed
from flow_engine.flows.compile import CompiledFlow, compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import RunInput, RunResult, execute, run

REGISTRY = default_registry()
ECHO = "[echo: not an LLM] "


# ---------------------------------------------------------------------------------------
# Flow-building and running helpers


def node(node_id: str, type_: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node_id, "type": type_}
    if params:
        out["params"] = params
    return out


def edge(source: str, target: str, target_input: str | None = None,
         source_output: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "target": target}
    if target_input is not None:
        out["target_input"] = target_input
    if source_output is not None:
        out["source_output"] = source_output
    return out


def compile_nodes(nodes: list, edges: list, ctx: BuildContext | None = None) -> CompiledFlow:
    definition = validate_flow({"id": "t", "nodes": nodes, "edges": edges}, REGISTRY)
    return compile_flow(FlowVersion("t", 1, definition), REGISTRY, ctx)


def run_flow(nodes: list, edges: list, **run_input: Any) -> RunResult:
    return run(compile_nodes(nodes, edges), RunInput(**run_input))


def run_with_node_outputs(nodes: list, edges: list,
                          **run_input: Any) -> tuple[RunResult, dict[str, Any]]:
    """Run and also return each node's output as reported by its node_finished event."""
    events: list[tuple[str, dict[str, Any]]] = []
    result = execute(compile_nodes(nodes, edges), RunInput(**run_input),
                     emit=lambda kind, data: events.append((kind, data)))
    return result, {d["node"]: d["output"] for kind, d in events if kind == "node_finished"}


def answered_by(result: RunResult) -> list[str]:
    return [entry["component_id"] for entry in result.outputs[0]["outputs"]]


def pipe(*steps: dict[str, Any], first: str = "ChatInput", last: str = "ChatOutput",
         **first_params: Any) -> tuple[list, list]:
    """``in → steps… → out`` with single-port edges."""
    nodes = [node("in", first, **first_params), *steps, node("out", last)]
    ids = [n["id"] for n in nodes]
    return nodes, [edge(a, b) for a, b in itertools.pairwise(ids)]


def bm25(query: str, doc_tokens: list[str], corpus: list[list[str]],
         k1: float = 1.5, b: float = 0.75) -> float:
    """Okapi BM25 of one document, straight from the formula (Lucene's non-negative idf)."""
    n = len(corpus)
    avgdl = sum(len(d) for d in corpus) / n
    total = 0.0
    for term in query.split():
        df = sum(term in d for d in corpus)
        tf = doc_tokens.count(term)
        if not df or not tf:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc_tokens) / avgdl))
    return total


# ---------------------------------------------------------------------------------------
# describe() and params JSON Schemas, for every component


COMPONENTS = [pytest.param(c, id=c.type_name) for c in REGISTRY]


def test_registry_is_exactly_the_whitelist() -> None:
    assert REGISTRY.names() == sorted(cls.type_name for cls in ALL_COMPONENTS)
    assert "os.system" not in REGISTRY
    assert REGISTRY.suggest("chatmodel") == "ChatModel"


def test_kinds_mark_the_flow_boundaries() -> None:
    kinds = {c.type_name: c.kind for c in REGISTRY}

    assert {t for t, k in kinds.items() if k == "input"} == {"ChatInput", "TextInput"}
    assert {t for t, k in kinds.items() if k == "output"} == {"ChatOutput", "TextOutput"}


@pytest.mark.parametrize("component", COMPONENTS)
def test_describe_is_json_serialisable_and_complete(component) -> None:
    described = component.describe()

    assert json.loads(json.dumps(described)) == described
    assert described["type"] == component.type_name
    assert described["display_name"] and described["description"]
    assert described["kind"] in {"input", "output", "step"}
    assert described["outputs"] and all(isinstance(o, str) for o in described["outputs"])
    assert [i["name"] for i in described["inputs"]] == [p.name for p in component.input_ports]


@pytest.mark.parametrize("component", COMPONENTS)
def test_params_schema_is_a_strict_valid_json_schema(component) -> None:
    schema = component.describe()["params_schema"]

    Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert not Draft202012Validator(schema).is_valid({"no_such_param": 1})


@pytest.mark.parametrize("component", COMPONENTS)
def test_schema_defaults_validate_against_the_schema(component) -> None:
    schema = component.describe()["params_schema"]
    properties = schema.get("properties", {})
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}

    for name, value in defaults.items():
        errors = list(Draft202012Validator(properties[name]).iter_errors(value))
        assert errors == [], (name, value, errors)
    without_required = {k: v for k, v in schema.items() if k != "required"}
    assert list(Draft202012Validator(without_required).iter_errors(defaults)) == []
    assert list(component.check_semantics(component.with_defaults({}), Limits())) == []
    assert component.with_defaults({}) == defaults


def test_describe_returns_a_copy() -> None:
    bm25_component = REGISTRY.get("BM25Retriever")
    k_schema = bm25_component.describe()["params_schema"]["properties"]["k"]
    original = dict(k_schema)
    k_schema["maximum"] = 1
    try:
        assert list(bm25_component.check_params({"k": 3}, Limits())) == []
    finally:
        k_schema.clear()
        k_schema.update(original)  # while the bug exists this is the registry's own schema


# ---------------------------------------------------------------------------------------
# ChatInput / TextInput


@pytest.mark.parametrize(("type_", "input_type", "input_value", "default", "expected"), [
    pytest.param("ChatInput", "chat", "hi", "dflt", "hi", id="chat-takes-chat"),
    pytest.param("ChatInput", "any", "hi", "dflt", "hi", id="chat-takes-any"),
    pytest.param("ChatInput", "text", "hi", "dflt", "dflt", id="chat-ignores-text"),
    pytest.param("ChatInput", "chat", None, "dflt", "dflt", id="chat-default-when-none"),
    pytest.param("ChatInput", "chat", "", "dflt", "", id="chat-empty-is-a-value"),
    pytest.param("ChatInput", "chat", None, None, "", id="chat-no-default"),
    pytest.param("TextInput", "text", "hi", "dflt", "hi", id="text-takes-text"),
    pytest.param("TextInput", "any", "hi", "dflt", "hi", id="text-takes-any"),
    pytest.param("TextInput", "chat", "hi", "dflt", "dflt", id="text-ignores-chat"),
    pytest.param("TextInput", "text", None, "dflt", "dflt", id="text-default-when-none"),
])
def test_input_node_reads_the_run_input_or_its_default(
    type_: str, input_type: str, input_value: str | None, default: str | None, expected: str
) -> None:
    params = {} if default is None else {"input_value": default}
    nodes, edges = pipe(first=type_, **params)

    result = run_flow(nodes, edges, input_value=input_value, input_type=input_type)

    assert result.output == expected


@pytest.mark.parametrize(("input_type", "expected"), [
    pytest.param("chat", "hi|text-default", id="chat"),
    pytest.param("text", "chat-default|hi", id="text"),
    pytest.param("any", "hi|hi", id="any"),
])
def test_input_type_selects_which_input_nodes_take_the_value(input_type: str, expected: str) -> None:
    nodes = [node("c", "ChatInput", input_value="chat-default"),
             node("t", "TextInput", input_value="text-default"),
             node("p", "PromptTemplate", template="{a}|{b}"), node("out", "ChatOutput")]
    edges = [edge("c", "p", "a"), edge("t", "p", "b"), edge("p", "out")]

    assert run_flow(nodes, edges, input_value="hi", input_type=input_type).output == expected


# ---------------------------------------------------------------------------------------
# ChatOutput / TextOutput and output_type


def _two_outputs() -> tuple[list, list]:
    nodes = [node("in", "ChatInput"), node("p", "PromptTemplate", template="T: {x}"),
             node("c", "ChatOutput"), node("t", "TextOutput")]
    return nodes, [edge("in", "p"), edge("in", "c"), edge("p", "t")]


@pytest.mark.parametrize(("output_type", "ids", "output"), [
    pytest.param("chat", ["c"], "hi", id="chat"),
    pytest.param("text", ["t"], "T: hi", id="text"),
    pytest.param("any", ["c", "t"], "hi", id="any"),
])
def test_output_type_selects_output_nodes(output_type: str, ids: list[str], output: str) -> None:
    result = run_flow(*_two_outputs(), input_value="hi", output_type=output_type, session_id="s1")

    assert answered_by(result) == ids
    assert result.output == output
    assert result.outputs[0]["inputs"] == {"input_value": "hi"}


def test_chat_and_text_outputs_use_langflow_result_shapes() -> None:
    result = run_flow(*_two_outputs(), input_value="hi", output_type="any", session_id="s1")

    chat, text = result.outputs[0]["outputs"]
    assert chat["results"] == {"message": {"text": "hi", "sender": "Machine",
                                           "sender_name": "AI", "session_id": "s1"}}
    assert chat["outputs"] == {"message": {"message": "hi", "type": "text"}}
    assert text["results"] == {"text": {"text": "T: hi", "sender": None, "sender_name": None,
                                        "session_id": "s1"}}
    assert text["messages"][0]["component_id"] == "t"


def test_output_type_without_matching_node_falls_back_to_the_outputs_that_ran() -> None:
    result = run_flow(*pipe(), input_value="hi", output_type="text")

    assert (answered_by(result), result.output) == (["out"], "hi")


# ---------------------------------------------------------------------------------------
# PromptTemplate / ChatPromptTemplate


@pytest.mark.parametrize(("template", "expected"), [
    pytest.param("Q: {question}!", "Q: hi there!", id="one-field"),
    pytest.param("{q} and {q!s} again", "hi there and hi there again", id="repeated-and-str"),
    pytest.param("{{literal}} {q}", "{literal} hi there", id="escaped-braces"),
])
def test_prompt_template_fills_its_field(template: str, expected: str) -> None:
    nodes, edges = pipe(node("p", "PromptTemplate", template=template))

    assert run_flow(nodes, edges, input_value="hi there").output == expected


def test_prompt_template_fields_come_from_their_own_edges() -> None:
    nodes = [node("in", "ChatInput"), node("t", "TextInput", input_value="Paris"),
             node("p", "PromptTemplate", template="City: {city}. Question: {question}"),
             node("out", "TextOutput")]
    edges = [edge("in", "p", "question"), edge("t", "p", "city"), edge("p", "out")]

    result = run_flow(nodes, edges, input_value="weather?")

    assert result.output == "City: Paris. Question: weather?"


def test_chat_prompt_template_sends_system_then_human_to_the_model() -> None:
    nodes, edges = pipe(
        node("p", "ChatPromptTemplate", system="You answer about {topic}.", human="Question: {q}"),
        node("llm", "ChatModel", provider="echo"))
    edges = [edge("in", "p", "topic"), edge("in", "p", "q"), *edges[1:]]

    result, outputs = run_with_node_outputs(nodes, edges, input_value="tea")

    assert outputs["p"] == "System: You answer about tea.\nHuman: Question: tea"
    # The echo model answers with the last message it got: the human one.
    assert result.output == ECHO + "Question: tea"
    assert result.usage == {"input_tokens": 4 + 2, "output_tokens": 4 + 2,
                            "total_tokens": 12, "llm_calls": 1}


def test_chat_prompt_template_without_system_sends_only_the_human_message() -> None:
    nodes, edges = pipe(node("p", "ChatPromptTemplate", human="Question: {q}"),
                        node("llm", "ChatModel", provider="echo"))

    result, outputs = run_with_node_outputs(nodes, edges, input_value="tea")

    assert outputs["p"] == "Human: Question: tea"
    assert result.usage["input_tokens"] == 2


# ---------------------------------------------------------------------------------------
# ChatModel (echo) and StrOutputParser


def test_echo_chat_model_is_deterministic_and_counts_usage() -> None:
    nodes, edges = pipe(node("llm", "ChatModel", provider="echo"))
    compiled = compile_nodes(nodes, edges)

    first = run(compiled, RunInput(input_value="hello big world"))
    second = run(compiled, RunInput(input_value="hello big world"))

    assert first.output == second.output == ECHO + "hello big world"
    assert first.usage == {"input_tokens": 3, "output_tokens": 7, "total_tokens": 10,
                           "llm_calls": 1}


def test_usage_adds_up_over_several_model_calls() -> None:
    nodes, edges = pipe(node("m1", "ChatModel", provider="echo"),
                        node("m2", "ChatModel", provider="echo"))

    result = run_flow(nodes, edges, input_value="hi")

    assert result.output == ECHO + ECHO + "hi"
    # m1: 1 in, 5 out; m2: 5 in, 9 out
    assert result.usage == {"input_tokens": 6, "output_tokens": 14, "total_tokens": 20,
                            "llm_calls": 2}


def test_str_output_parser_turns_the_message_into_text() -> None:
    nodes, edges = pipe(node("llm", "ChatModel", provider="echo"),
                        node("parse", "StrOutputParser"), last="TextOutput")

    result, outputs = run_with_node_outputs(nodes, edges, input_value="hi")

    assert outputs["llm"]["type"] == "ai"
    assert outputs["llm"]["content"] == ECHO + "hi"
    assert outputs["llm"]["usage"]["total_tokens"] == 6
    assert outputs["parse"] == ECHO + "hi"
    assert result.output == ECHO + "hi"


@pytest.mark.parametrize(("ctx", "params", "expected"), [
    pytest.param(BuildContext(openai_base_url="http://engine-default/v1", openai_api_key="sk-env"),
                 {"temperature": 0.3, "max_tokens": 50},
                 {"base_url": "http://engine-default/v1", "auth": "Bearer sk-env", "temperature": 0.3,
                  "max_tokens": 50}, id="engine-settings"),
    pytest.param(BuildContext(openai_base_url="http://engine-default/v1"),
                 {"base_url": "http://per-flow/v1"},
                 {"base_url": "http://per-flow/v1", "auth": None, "temperature": None,
                  "max_tokens": None}, id="flow-base-url-and-no-key"),
    pytest.param(BuildContext(), {},
                 {"base_url": "https://api.openai.com/v1", "auth": None, "temperature": None,
                  "max_tokens": None}, id="openai-by-default"),
])
def test_openai_chat_model_takes_key_and_endpoint_from_the_engine(
    ctx: BuildContext, params: dict[str, Any], expected: dict[str, Any]
) -> None:
    # Building never calls the provider, so this stays offline.
    nodes, edges = pipe(node("llm", "ChatModel", provider="openai", model="m-1", timeout=5,
                             **params))

    compiled = compile_nodes(nodes, edges, ctx)

    model = next(s.runnable for s in compiled.runnable.steps if s.node_id == "llm")
    assert model.model == "m-1"
    assert model.base_url == expected["base_url"]
    assert model._headers.get("Authorization") == expected["auth"]
    assert "sk-env" not in repr(model)
    assert (model.temperature, model.max_tokens) == (expected["temperature"], expected["max_tokens"])
    assert (model.timeout, model.max_retries, model.streaming) == (5, 1, True)


# ---------------------------------------------------------------------------------------
# JsonOutputParser


@pytest.mark.parametrize(("text", "value"), [
    pytest.param('{"answer": 42, "tags": ["a", "b"]}', {"answer": 42, "tags": ["a", "b"]},
                 id="object"),
    pytest.param("[1, 2, 3]", [1, 2, 3], id="array"),
    pytest.param('```json\n{"ok": true}\n```', {"ok": True}, id="fenced"),
])
def test_json_output_parser_parses_its_input(text: str, value: Any) -> None:
    nodes, edges = pipe(node("j", "JsonOutputParser"), first="TextInput", last="TextOutput")

    _, outputs = run_with_node_outputs(nodes, edges, input_value=text, input_type="text")

    assert outputs["j"] == value


@pytest.mark.parametrize(("text", "value"), [
    pytest.param('{"answer": 42, "tags": ["a", "b"]}', {"answer": 42, "tags": ["a", "b"]},
                 id="object"),
    pytest.param("[1, 2, 3]", [1, 2, 3], id="array"),
])
def test_parsed_json_reaches_a_text_output_as_json(text: str, value: Any) -> None:
    nodes, edges = pipe(node("j", "JsonOutputParser"), first="TextInput", last="TextOutput")

    result = run_flow(nodes, edges, input_value=text, input_type="text")

    assert json.loads(result.output) == value


def test_json_output_parser_failure_names_the_node() -> None:
    nodes, edges = pipe(node("j", "JsonOutputParser"), first="TextInput", last="TextOutput")
    compiled = compile_nodes(nodes, edges)
    events: list[tuple[str, dict[str, Any]]] = []

    with pytest.raises(RunFailed) as info:
        execute(compiled, RunInput(input_value="not json", input_type="text"),
                emit=lambda kind, data: events.append((kind, data)))

    assert info.value.code == "run_failed"
    assert "node 'j' (JsonOutputParser) failed" in info.value.message
    assert "Traceback" not in info.value.message
    assert events[-1][0] == "error"
    assert events[-1][1]["node"] == "j"
    assert [d["node"] for kind, d in events if kind == "node_finished"] == ["in"]


# ---------------------------------------------------------------------------------------
# TextSplitter


TEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"


def _chunks(text: str, **params: Any) -> list[str]:
    nodes, edges = pipe(node("t", "TextSplitter", **params), first="TextInput", last="TextOutput")
    _, outputs = run_with_node_outputs(nodes, edges, input_value=text, input_type="text")
    return outputs["t"]


def test_text_splitter_without_overlap_partitions_the_text() -> None:
    chunks = _chunks(TEXT, chunk_size=20, chunk_overlap=0)

    assert len(chunks) > 1
    assert all(len(c) <= 20 for c in chunks)
    assert " ".join(chunks).split() == TEXT.split()


def test_text_splitter_overlap_repeats_words_across_chunks() -> None:
    plain = _chunks(TEXT, chunk_size=20, chunk_overlap=0)
    overlapping = _chunks(TEXT, chunk_size=20, chunk_overlap=6)

    assert all(len(c) <= 20 for c in overlapping)
    assert any(a.split()[-1] == b.split()[0] for a, b in itertools.pairwise(overlapping))
    assert sum(len(c.split()) for c in overlapping) > sum(len(c.split()) for c in plain)
    assert list(dict.fromkeys(" ".join(overlapping).split())) == TEXT.split()


def test_text_splitter_prefers_paragraph_breaks() -> None:
    text = "first paragraph here\n\nsecond one\n\nthird"

    assert _chunks(text, chunk_size=25, chunk_overlap=0) == [
        "first paragraph here", "second one\n\nthird"]


def test_text_splitter_uses_custom_separators() -> None:
    chunks = _chunks("aaa|bbb|ccc", chunk_size=5, chunk_overlap=0, separators=["|"])

    assert [c.strip("|") for c in chunks] == ["aaa", "bbb", "ccc"]


def test_text_splitter_keeps_short_text_whole() -> None:
    assert _chunks("short text", chunk_size=100, chunk_overlap=10) == ["short text"]


# ---------------------------------------------------------------------------------------
# BM25Retriever


DOCS = [
    "The cat sat on the mat.",
    "Dogs bark at the mailman every morning.",
    "A dog and a cat can be friends.",
    "Stock prices rose sharply today.",
]


def _retrieve(query: str, **params: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    nodes = [node("in", "ChatInput"), node("ctx", "BM25Retriever", **params),
             node("out", "ChatOutput")]
    edges = [edge("in", "ctx", "query"), edge("ctx", "out")]
    result, outputs = run_with_node_outputs(nodes, edges, input_value=query)
    return result, outputs["ctx"]


def test_bm25_retriever_ranks_the_most_relevant_document_first() -> None:
    result, docs = _retrieve("cat on a mat", documents=DOCS, k=4)

    assert [d["page_content"] for d in docs] == [DOCS[0], DOCS[2]]  # no score for 1 and 3
    scores = [d["metadata"]["score"] for d in docs]
    assert scores[0] > scores[1] > 0
    # Downstream nodes get the documents as text, joined by blank lines.
    assert result.output == f"{DOCS[0]}\n\n{DOCS[2]}"


@pytest.mark.parametrize(("query", "k", "expected"), [
    pytest.param("dogs bark", 4, [1], id="only-matching"),
    pytest.param("cat", 1, [0], id="k-one"),
    pytest.param("the cat dog", 2, [0, 2], id="k-cuts"),
    pytest.param("bitcoin", 4, [], id="nothing-matches"),
    pytest.param("STOCK Prices!", 4, [3], id="case-and-punctuation"),
])
def test_bm25_retriever_respects_k_and_drops_zero_scores(
    query: str, k: int, expected: list[int]
) -> None:
    _, docs = _retrieve(query, documents=DOCS, k=k)

    assert [d["page_content"] for d in docs] == [DOCS[i] for i in expected]


def test_bm25_retriever_keeps_document_metadata() -> None:
    documents = [{"text": "refunds take five days", "metadata": {"source": "faq", "id": 7}},
                 "shipping is free"]

    _, docs = _retrieve("refunds", documents=documents)

    assert len(docs) == 1
    assert docs[0]["metadata"]["source"] == "faq"
    assert docs[0]["metadata"]["id"] == 7
    assert docs[0]["metadata"]["score"] > 0


def test_bm25_retriever_searches_documents_fed_by_a_text_splitter() -> None:
    knowledge = ("Refunds are paid within five days.\n\nShipping is free above fifty euros."
                 "\n\nThe shop opens at nine on weekdays.")
    nodes = [node("in", "ChatInput"), node("kb", "TextInput", input_value=knowledge),
             node("split", "TextSplitter", chunk_size=40, chunk_overlap=0),
             node("ctx", "BM25Retriever", k=1, documents=["Shipping to the moon is not free."]),
             node("out", "ChatOutput")]
    edges = [edge("kb", "split"), edge("in", "ctx", "query"),
             edge("split", "ctx", "documents"), edge("ctx", "out")]

    shipping = run_flow(nodes, edges, input_value="is shipping free above fifty euros")
    opening = run_flow(nodes, edges, input_value="when does the shop open on weekdays")

    assert shipping.output == "Shipping is free above fifty euros."
    assert opening.output == "The shop opens at nine on weekdays."


def test_bm25_retriever_still_searches_its_own_documents_when_fed_more() -> None:
    nodes = [node("in", "ChatInput"), node("kb", "TextInput", input_value="pears are green"),
             node("ctx", "BM25Retriever", documents=["apples are red"]),
             node("out", "ChatOutput")]
    edges = [edge("kb", "ctx", "documents"), edge("in", "ctx", "query"), edge("ctx", "out")]

    assert run_flow(nodes, edges, input_value="apples").output == "apples are red"
    assert run_flow(nodes, edges, input_value="pears").output == "pears are green"


# ---------------------------------------------------------------------------------------
# BM25Index against hand-computed scores


CORPUS = ["the cat sat", "the dog sat on the log", "cats and dogs"]
CORPUS_TOKENS = [d.split() for d in CORPUS]


@pytest.mark.parametrize(("query", "k1", "b"), [
    pytest.param("cat", 1.5, 0.75, id="rare-term"),
    pytest.param("the sat", 1.5, 0.75, id="common-terms"),
    pytest.param("the dog log", 1.5, 0.75, id="mixed"),
    pytest.param("the sat", 1.2, 0.0, id="no-length-normalisation"),
    pytest.param("the sat", 2.0, 1.0, id="full-length-normalisation"),
])
def test_bm25_index_scores_match_the_formula(query: str, k1: float, b: float) -> None:
    index = BM25Index([Document(page_content=d) for d in CORPUS], k1=k1, b=b)

    expected = [bm25(query, doc, CORPUS_TOKENS, k1, b) for doc in CORPUS_TOKENS]

    assert index.scores(query) == pytest.approx(expected, rel=1e-12)


def test_bm25_index_score_worked_by_hand() -> None:
    # N=3, avgdl=(3+6+3)/3=4. "cat" is in d0 only: idf = ln(1 + 2.5/1.5) = ln(8/3);
    # d0: tf=1, |d|=3 → 2.5 / (1 + 1.5*(0.25 + 0.75*3/4)) = 2.5 / 2.21875.
    # "sat" is in d0 and d1: idf = ln(1 + 1.5/2.5) = ln(1.6);
    # d1: tf=1, |d|=6 → 2.5 / (1 + 1.5*(0.25 + 0.75*6/4)) = 2.5 / 3.0625.
    index = BM25Index([Document(page_content=d) for d in CORPUS])

    cat = index.scores("cat")
    sat = index.scores("sat")

    assert cat == pytest.approx([math.log(8 / 3) * 2.5 / 2.21875, 0.0, 0.0])
    assert sat == pytest.approx([math.log(1.6) * 2.5 / 2.21875, math.log(1.6) * 2.5 / 3.0625, 0])


def test_bm25_index_shorter_document_wins_equal_matches() -> None:
    index = BM25Index([Document(page_content=d) for d in ("sat " + "x " * 10, "sat y")])

    long_doc, short_doc = index.scores("sat")

    assert short_doc > long_doc > 0


def test_bm25_index_top_orders_limits_and_annotates() -> None:
    docs = [Document(page_content=d, metadata={"n": i}) for i, d in enumerate(CORPUS)]
    index = BM25Index(docs)

    top = index.top("the sat log", k=5)

    scores = index.scores("the sat log")
    assert [d.metadata["n"] for d in top] == [1, 0]  # "cats and dogs" scores 0: left out
    assert [d.metadata["score"] for d in top] == [round(scores[1], 6), round(scores[0], 6)]
    assert [d.metadata["n"] for d in index.top("the sat log", k=1)] == [1]
    assert docs[0].metadata == {"n": 0}  # the indexed documents are not modified


def test_bm25_index_breaks_ties_by_position() -> None:
    index = BM25Index([Document(page_content=t) for t in ("b a", "a b", "c")])

    assert [d.page_content for d in index.top("a", k=3)] == ["b a", "a b"]


@pytest.mark.parametrize(("documents", "query", "scores"), [
    pytest.param([], "cat", [], id="empty-corpus"),
    pytest.param(["the cat"], "zebra", [0.0], id="unknown-term"),
    pytest.param(["the cat"], "", [0.0], id="empty-query"),
])
def test_bm25_index_edge_cases(documents: list[str], query: str, scores: list[float]) -> None:
    index = BM25Index([Document(page_content=d) for d in documents])

    assert index.scores(query) == scores
    assert index.top(query, k=3) == []


# ---------------------------------------------------------------------------------------
# ConditionalRouter


def _router_flow(**params: Any) -> tuple[list, list]:
    nodes = [node("in", "ChatInput"), node("r", "ConditionalRouter", **params),
             node("yes", "ChatOutput"), node("no", "ChatOutput")]
    edges = [edge("in", "r"), edge("r", "yes", source_output="true"),
             edge("r", "no", source_output="false")]
    return nodes, edges


@pytest.mark.parametrize(("params", "text", "branch"), [
    pytest.param({"pattern": "refund"}, "I want a REFUND please", "yes",
                 id="contains-ignores-case"),
    pytest.param({"pattern": "refund", "case_sensitive": True}, "I want a REFUND", "no",
                 id="contains-case-sensitive"),
    pytest.param({"pattern": "refund"}, "where is my parcel", "no", id="contains-miss"),
    pytest.param({"operator": "equals", "pattern": "yes"}, "  Yes \n", "yes",
                 id="equals-strips-and-folds"),
    pytest.param({"operator": "equals", "pattern": "yes"}, "yes please", "no", id="equals-miss"),
    pytest.param({"operator": "equals", "pattern": "yes", "case_sensitive": True}, "Yes", "no",
                 id="equals-case-sensitive"),
    pytest.param({"operator": "starts_with", "pattern": "hello"}, "Hello there", "yes",
                 id="starts-with"),
    pytest.param({"operator": "starts_with", "pattern": "hello"}, "oh hello", "no",
                 id="starts-with-miss"),
    pytest.param({"operator": "regex", "pattern": r"^\d{3}-\d{4}$"}, "555-1234", "yes",
                 id="regex"),
    pytest.param({"operator": "regex", "pattern": r"^\d{3}-\d{4}$"}, "5551234", "no",
                 id="regex-miss"),
    pytest.param({"operator": "regex", "pattern": "ORDER #\\d+"}, "my order #12", "yes",
                 id="regex-ignores-case"),
    pytest.param({"operator": "regex", "pattern": "ORDER #\\d+", "case_sensitive": True},
                 "my order #12", "no", id="regex-case-sensitive"),
    pytest.param({"pattern": "needle", "max_chars": 10}, "needle in a haystack", "yes",
                 id="within-max-chars"),
    pytest.param({"pattern": "needle", "max_chars": 10}, "a haystack with a needle", "no",
                 id="beyond-max-chars"),
])
def test_conditional_router_takes_one_branch(params: dict[str, Any], text: str,
                                             branch: str) -> None:
    result = run_flow(*_router_flow(**params), input_value=text)

    assert answered_by(result) == [branch]
    assert result.output == text  # the routed value passes through unchanged


def test_nodes_behind_the_branch_not_taken_do_not_run() -> None:
    nodes = [node("in", "ChatInput"), node("r", "ConditionalRouter", pattern="human"),
             node("llm", "ChatModel", provider="echo"), node("bot", "ChatOutput"),
             node("person", "ChatOutput")]
    edges = [edge("in", "r"), edge("r", "llm", source_output="false"), edge("llm", "bot"),
             edge("r", "person", source_output="true")]

    to_person, ran = run_with_node_outputs(nodes, edges, input_value="a human please")
    to_bot = run_flow(nodes, edges, input_value="what time is it")

    assert answered_by(to_person) == ["person"]
    assert set(ran) == {"in", "r", "person"}
    assert to_person.usage["llm_calls"] == 0
    assert ran["r"] == {"branch": "true", "value": "a human please"}
    assert answered_by(to_bot) == ["bot"]
    assert to_bot.output == ECHO + "what time is it"
    assert to_bot.usage["llm_calls"] == 1


def test_node_runs_when_only_an_optional_input_is_on_the_branch_not_taken() -> None:
    nodes = [node("in", "ChatInput"), node("r", "ConditionalRouter", pattern="upload"),
             node("split", "TextSplitter", chunk_size=50, chunk_overlap=0),
             node("ctx", "BM25Retriever", documents=["dogs bark", "cats purr"]),
             node("out", "ChatOutput")]
    edges = [edge("in", "r"), edge("r", "split", source_output="true"),
             edge("split", "ctx", "documents"), edge("in", "ctx", "query"), edge("ctx", "out")]

    result = run_flow(nodes, edges, input_value="dogs")

    assert answered_by(result) == ["out"]
    assert result.output == "dogs bark"


def test_model_aliases_apply_to_the_engines_endpoint_only() -> None:
    """FLOW_ENGINE_MODEL_ALIASES names what OPENAI_BASE_URL serves; a node sent to another
    (allowed) endpoint keeps the model name it asks for."""
    chat_model = default_registry().get("ChatModel")
    ctx = BuildContext(openai_base_url="http://ollama:11434/v1",
                       model_aliases={"gpt-4o-mini": "llama3.2"})

    def built(**params: Any) -> str:
        return chat_model.build("llm", chat_model.with_defaults(
            {"provider": "openai", "model": "gpt-4o-mini", **params}), ctx).model

    assert built() == "llama3.2"
    assert built(base_url="http://ollama:11434/v1") == "llama3.2"
    assert built(base_url="https://api.openai.com/v1") == "gpt-4o-mini"
    assert built(model="gpt-4o") == "gpt-4o"  # no alias: as asked
