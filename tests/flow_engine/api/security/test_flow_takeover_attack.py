"""An editor (who may create flows, not publish) takes over the callers of a published flow
by creating a new flow whose *id* is the published flow's *name*: runs address a flow by id
first, then by name, so the new flow — live at once as version 1 — would answer them. Ids
and names share one namespace, so neither can be taken from another flow."""

from __future__ import annotations

import pytest
from support.keys import as_


@pytest.fixture
def published(api, defs):
    flow = defs.echo("Real: {question}", id="support-bot-0fd31bb9", name="support-bot")
    assert api.post("/api/v1/flows", json=flow, headers=as_("publisher")).status_code == 201


def test_a_new_flow_cannot_take_another_flows_name_as_its_id(api, defs, published):
    hijack = defs.echo("HIJACKED {question}", id="support-bot", name="innocent")

    resp = api.post("/api/v1/flows", json=hijack, headers=as_("editor"))

    assert resp.status_code == 409
    assert "may not be another flow's name" in resp.get_json()["error"]["message"]
    run = api.post("/api/v1/run/support-bot", json={"input_value": "x"}, headers=as_("runner"))
    assert run.get_json()["output"].endswith("Real: x")


def test_a_flow_cannot_be_named_or_renamed_after_another_flows_id(api, defs, published):
    resp = api.post("/api/v1/flows", json=defs.echo(id="other", name="support-bot-0fd31bb9"),
                    headers=as_("editor"))
    assert resp.status_code == 409

    assert api.post("/api/v1/flows", json=defs.echo(id="other"), headers=as_("editor")).status_code == 201
    renamed = api.put("/api/v1/flows/other", json=defs.echo(id="other", name="support-bot-0fd31bb9"),
                      headers=as_("editor"))
    assert renamed.status_code == 409
