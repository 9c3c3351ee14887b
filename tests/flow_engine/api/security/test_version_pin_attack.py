"""A runner pins ``version`` to run a draft that was never published (or to probe which
versions exist). A runner may pin only what routing could serve it anyway — the live
version or the current canary; testing any other version needs the editor role."""

from __future__ import annotations

import pytest
from support.keys import as_


@pytest.fixture
def flow(api, defs):
    assert api.post("/api/v1/flows", json=defs.echo("V1 {question}", id="f"),
                    headers=as_("admin")).status_code == 201
    for template in ("V2 {question}", "V3 {question}"):
        assert api.put("/api/v1/flows/f", json=defs.echo(template, id="f"),
                       headers=as_("admin")).status_code == 201


def run(api, who: str, version: int):
    return api.post("/api/v1/run/f", json={"input_value": "x", "version": version},
                    headers=as_(who))


@pytest.mark.parametrize("version", [2, 3, 99])
def test_a_runner_cannot_pin_a_version_routing_would_not_serve(api, flow, version):
    resp = run(api, "runner", version)

    assert resp.status_code == 403
    error = resp.get_json()["error"]
    assert (error["code"], error["role"]) == ("forbidden", "editor")
    assert "neither live nor a canary" in error["message"]


def test_a_runner_may_pin_the_live_version_and_the_canary(api, flow):
    assert run(api, "runner", 1).get_json()["output"].endswith("V1 x")
    assert api.put("/api/v1/flows/f/routing", json={"canary": {"version": 3, "percent": 5}},
                   headers=as_("publisher")).status_code == 200
    assert run(api, "runner", 3).get_json()["output"].endswith("V3 x")
    assert run(api, "runner", 2).status_code == 403


@pytest.mark.parametrize("who", ["editor", "publisher", "admin"])
def test_an_editor_and_up_may_test_any_version(api, flow, who):
    assert run(api, who, 2).get_json()["output"].endswith("V2 x")
    assert run(api, who, 99).status_code == 404
