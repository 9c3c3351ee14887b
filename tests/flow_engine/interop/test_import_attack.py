"""A hostile editor (or runner) against ``POST /api/v1/flows/import`` and
``GET /api/v1/flows/{id}/export``: code in the export, keys, roles, provider egress,
template tricks, oversized and malformed bodies. Each is refused or neutralised, says why,
and leaves nothing behind."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.keys import as_

SECRET = "sk-live-ATTACKER-0123456789"


def flows(client: Any) -> list[str]:
    return [f["id"] for f in client.get("/api/v1/flows", headers=as_("admin")).get_json()["flows"]]


def payload(target: Path, port: int) -> str:
    """Python that writes ``target`` and connects to ``port`` — if anything ever ran it."""
    return (f"import socket, pathlib\n"
            f"pathlib.Path({str(target)!r}).write_text('pwned')\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            "class ChatInput:\n    pass\n")


def booby_trap(export: dict[str, Any], code: str) -> dict[str, Any]:
    """Every node's code field, and every other string field a careless importer might run."""
    for node in export["data"]["nodes"]:
        template = node["data"]["node"].get("template", {})
        if "code" in template:
            template["code"]["value"] = code
        for name in ("sender_name", "data_template", "tool_placeholder", "format_instructions"):
            if name in template:
                template[name]["value"] = code
        node["data"]["node"]["edited"] = True
    return export


def test_code_in_an_export_never_runs(engine_client, import_flow, example, tmp_path) -> None:
    target = tmp_path / "pwned"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = payload(target, port)

    for name in ("basic-prompting", "agent-calculator", "unsupported"):
        resp = import_flow(booby_trap(example(name), code))
        assert resp.status_code in (201, 422), resp.get_data(as_text=True)
        if resp.status_code == 201:
            flow_id = resp.get_json()["flow"]["id"]
            engine_client.post(f"/api/v1/run/{flow_id}", headers=as_("runner"),
                               json={"input_value": "What is 6*7?"})
            engine_client.get(f"/api/v1/flows/{flow_id}/export", headers=as_("runner"))
            assert code not in json.dumps(resp.get_json()["flow"]["definition"])
            warnings = [w["code"] for w in resp.get_json()["report"]["warnings"]]
            assert "custom_code" in warnings

    assert not target.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected

    # the detectors work: the same payload, run on purpose, is seen by both
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert target.read_text() == "pwned"
    listener.setblocking(True)
    listener.settimeout(5)
    listener.accept()[0].close()
    listener.close()


def test_a_runner_cannot_import(import_flow, example, engine_client) -> None:
    resp = import_flow(example("basic-prompting"), who="runner")

    assert resp.status_code == 403
    error = resp.get_json()["error"]
    assert (error["code"], error["role"]) == ("forbidden", "editor")
    assert flows(engine_client) == []


def test_an_editor_cannot_publish_through_an_import(import_flow, example, engine_client) -> None:
    import_flow(example("basic-prompting"), id="live-flow")

    for fields in ({"id": "live-flow", "publish": True}, {"publish": True}):
        resp = import_flow(example("prompt-template"), **fields)
        error = resp.get_json()["error"]
        assert resp.status_code == 403 and (error["code"], error["role"]) == ("forbidden", "publisher")

    assert flows(engine_client) == ["live-flow"]  # nothing was stored
    versions = engine_client.get("/api/v1/flows/live-flow/versions", headers=as_("admin"))
    assert [v["version"] for v in versions.get_json()["versions"]] == [1]


def test_keys_in_an_export_are_never_stored_or_echoed(import_flow, example, engine_client) -> None:
    export = example("prompt-template")
    template = export["data"]["nodes"][2]["data"]["node"]["template"]
    template["api_key"]["value"] = SECRET
    template["model_kwargs"]["value"] = {"api_key": SECRET, "headers": {"Authorization": SECRET}}

    resp = import_flow(export)
    flow_id = resp.get_json()["flow"]["id"]
    stored = engine_client.get(f"/api/v1/flows/{flow_id}", headers=as_("admin")).get_data(as_text=True)
    exported = engine_client.get(f"/api/v1/flows/{flow_id}/export", headers=as_("runner"))

    assert resp.status_code == 201
    assert SECRET not in resp.get_data(as_text=True)
    assert SECRET not in stored and SECRET not in exported.get_data(as_text=True)
    assert [w["code"] for w in resp.get_json()["report"]["warnings"]] == ["api_key_dropped"]


@pytest.mark.parametrize("base_url", [
    "http://169.254.169.254/latest/meta-data", "https://attacker.example/v1",
    "https://user:pass@llm.example/v1",
])
def test_a_model_endpoint_outside_the_allowed_origins_is_refused(import_flow, example,
                                                                 engine_client, base_url) -> None:
    export = example("prompt-template")
    export["data"]["nodes"][2]["data"]["node"]["template"]["openai_api_base"]["value"] = base_url

    resp = import_flow(export)

    assert resp.status_code == 422
    [problem] = resp.get_json()["error"]["problems"]
    assert problem["path"] == "$.flow.data.nodes[2].data.node.template.openai_api_base.value"
    assert "base_url" in problem["message"]
    assert flows(engine_client) == []


@pytest.mark.parametrize("template", [
    "{question.__class__.__mro__}", "{question[0]}", "{0}", "{question:>999999999}",
    "{{#x}}{{/x}}", "{{> partial}}",
])
def test_template_tricks_are_refused_at_the_template(import_flow, example, template) -> None:
    export = example("prompt-template")
    fields = export["data"]["nodes"][1]["data"]["node"]["template"]
    fields["template"]["value"] = template
    fields["use_double_brackets"]["value"] = template.startswith("{{")

    resp = import_flow(export)

    assert resp.status_code == 422
    paths = [p["path"] for p in resp.get_json()["error"]["problems"]]
    assert "$.flow.data.nodes[1].data.node.template.template.value" in paths


@pytest.mark.parametrize(("body", "status", "fragment"), [
    pytest.param({"format": "n8n", "flow": {}}, 400, "format must be one of: langflow", id="format"),
    pytest.param({"format": "langflow", "flow": []}, 400, "flow must be the export", id="flow-list"),
    pytest.param({"format": "langflow"}, 400, "flow must be the export", id="no-flow"),
    pytest.param({"format": "langflow", "flow": {}, "id": 7}, 400, "id must be", id="id-type"),
    pytest.param({"format": "langflow", "flow": {}, "publish": "yes"}, 400, "publish must be",
                 id="publish-type"),
    pytest.param({"format": "langflow", "flow": {}, "message": "x" * 501}, 400, "message must be",
                 id="long-message"),
    pytest.param({"format": "langflow", "flow": {}, "message": "a\u0007b"}, 400,
                 "message must be", id="control-chars"),
    pytest.param({"format": "langflow", "flow": {}, "code": "print(1)"}, 400,
                 "unknown field(s) code", id="unknown-field"),
    pytest.param([1], 400, "the body must be a JSON object", id="not-object"),
    pytest.param({"format": "langflow", "flow": {"data": {"nodes": "x"}}}, 422,
                 "nodes must be a list", id="nodes-not-list"),
])
def test_malformed_requests_are_refused_plainly(engine_client, body, status, fragment) -> None:
    resp = engine_client.post("/api/v1/flows/import", headers=as_("editor"), json=body)

    assert resp.status_code == status, resp.get_data(as_text=True)
    assert fragment in resp.get_data(as_text=True)
    assert flows(engine_client) == []


def test_a_body_that_is_not_json_is_415_and_deep_json_400(engine_client) -> None:
    not_json = engine_client.post("/api/v1/flows/import", headers=as_("editor"), data="format=x",
                                  content_type="application/x-www-form-urlencoded")
    deep = engine_client.post("/api/v1/flows/import", headers=as_("editor"),
                              data='{"flow": ' + "[" * 100 + "]" * 100 + "}",
                              content_type="application/json")

    assert not_json.status_code == 415
    assert deep.status_code == 400 and "nested deeper" in deep.get_json()["error"]["message"]


def test_too_many_nodes_are_refused_before_anything_is_mapped(import_flow, example) -> None:
    export = example("basic-prompting")
    node = export["data"]["nodes"][0]
    export["data"]["nodes"] = [{**copy.deepcopy(node), "id": f"n{i}"} for i in range(1001)]

    resp = import_flow(export)

    assert resp.status_code == 422
    [problem] = resp.get_json()["error"]["problems"]
    assert problem == {"path": "$.flow.data", "message": "1001 nodes and 3 edges; at most 1000 and 4000"}


def test_the_engines_size_limits_apply_to_what_an_export_becomes(import_flow, example) -> None:
    export = example("basic-prompting")
    node = export["data"]["nodes"][0]
    export["data"]["nodes"] += [{**copy.deepcopy(node), "id": f"extra-{i}"} for i in range(100)]

    resp = import_flow(export)

    assert resp.status_code == 422
    problems = resp.get_json()["error"]["problems"]
    assert {"path": "$.flow.data.nodes", "message": "105 nodes; the limit is 100"} in problems


@pytest.mark.parametrize(("flow_id", "path"), [("bad id!", "$.id"), ("x" * 65, "$.id")])
def test_a_bad_id_is_422_at_the_request(import_flow, example, flow_id, path) -> None:
    resp = import_flow(example("basic-prompting"), id=flow_id)

    assert resp.status_code == 422
    assert resp.get_json()["error"]["problems"][0]["path"] == path


def test_a_name_with_a_lone_surrogate_is_refused_at_the_exports_name(import_flow, example) -> None:
    export = example("basic-prompting")
    export["name"] = "bad \ud800 name"

    resp = import_flow(export)

    assert resp.status_code == 422
    assert resp.get_json()["error"]["problems"][0]["path"] == "$.flow.name"


def test_an_import_cannot_take_another_flows_name(import_flow, example, engine_client) -> None:
    import_flow(example("basic-prompting"), id="first")

    resp = import_flow(example("basic-prompting"))

    assert resp.status_code == 409
    assert flows(engine_client) == ["first"]


def test_export_is_bounded_to_real_flows_and_formats(engine_client, import_flow, example) -> None:
    import_flow(example("basic-prompting"), id="f")
    get = lambda q: engine_client.get(f"/api/v1/flows/{q}", headers=as_("runner"))  # noqa: E731

    assert get("f/export").status_code == 200
    assert get("nope/export").status_code == 404
    assert get("f/export?format=xml").status_code == 400
    assert get("f/export?version=abc").status_code == 400
    assert get("f/export?version=-1").status_code == 400
    for digits in ("%C2%B2", "%D9%A3", "%EF%BC%91"):  # ², Arabic-Indic 3, fullwidth 1
        assert get(f"f/export?version={digits}").status_code == 400  # isdigit(), not a number
    assert get("f/export?version=9").status_code == 404
    assert engine_client.get("/api/v1/flows/f/export").status_code == 401
