"""``flowgate flows canary`` against a real engine (``flowgate engine`` under gunicorn,
SQLite): it starts, changes and stops a canary, keeps the flow's sticky key, makes a guarded
canary of steps and guard options, and refuses bad arguments before calling the engine."""

from __future__ import annotations

import json
import re

import pytest
import requests
from test_flows_apply import ADMIN, cli, echo_flow, engine  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
RUNNER = "runner-secret-0003"


@pytest.fixture
def two_versions(cli, tmp_path, request) -> str:  # noqa: F811
    flow_id = re.sub(r"[^a-z0-9]+", "-", request.node.name[5:45].lower()).strip("-")
    path = tmp_path / "f.json"
    path.write_text(json.dumps(echo_flow(flow_id)))
    assert cli("flows", "push", str(path))[0] == 0
    path.write_text(json.dumps(echo_flow(flow_id, "Answer: {question}")))
    assert cli("flows", "push", str(path))[0] == 0
    return flow_id


def routing(engine, flow_id: str) -> dict:  # noqa: F811
    flow = requests.get(f"{engine.url}/api/v1/flows/{flow_id}", headers={"x-api-key": ADMIN},
                        timeout=10).json()
    return flow["routing"] or {}


def test_a_canary_started_and_stopped_keeps_the_sticky_key(cli, engine, two_versions):  # noqa: F811
    flow = two_versions
    resp = requests.put(f"{engine.url}/api/v1/flows/{flow}/routing", headers={"x-api-key": ADMIN},
                        json={"sticky_key": "session_id"}, timeout=10)
    assert resp.status_code == 200, resp.text

    code, out, err = cli("flows", "canary", flow, "2", "--percent", "10", "-m", "try v2")
    assert code == 0, err
    assert f"flow '{flow}': live v1, canary v2 at 10%" in out
    assert "audit #" in out and "routing by ops" in out and '"try v2"' in out
    assert routing(engine, flow)["canary"]["percent"] == 10
    assert routing(engine, flow)["sticky_key"] == "session_id"

    code, out, _ = cli("flows", "canary", flow, "--stop", "-m", "enough")
    assert code == 0 and f"flow '{flow}': live v1, no canary" in out
    assert routing(engine, flow).get("canary") is None
    assert routing(engine, flow)["sticky_key"] == "session_id"


def test_steps_and_guard_options_make_a_guarded_canary(cli, engine, two_versions):  # noqa: F811
    code, out, err = cli("flows", "canary", two_versions, "2", "--percent", "5",
                         "--steps", "5,25,50,100", "--step-after-s", "30",
                         "--max-error-rate", "0.1", "--min-runs", "10")
    assert code == 0, err
    assert "steps 5→25→50→100 every 30 s" in out and "guarded" in out
    canary = routing(engine, two_versions)["canary"]
    assert canary["steps"] == [5, 25, 50, 100] and canary["step_after_s"] == 30
    assert canary["guard"]["max_error_rate"] == 0.1 and canary["guard"]["min_runs"] == 10


def test_steps_alone_start_at_the_first_under_the_default_guard(cli, engine,  # noqa: F811
                                                               two_versions):
    code, out, err = cli("flows", "canary", two_versions, "2", "--steps", "10,50,100")
    assert code == 0, err
    assert "canary v2 at 10% (steps 10→50→100 every 60 s), guarded" in out
    canary = routing(engine, two_versions)["canary"]
    assert canary["percent"] == 10 and canary["steps"] == [10, 50, 100]
    assert canary["guard"]["max_error_rate"] == 0.05  # the engine's default


def test_a_dry_run_changes_nothing(cli, engine, two_versions):  # noqa: F811
    code, out, _ = cli("flows", "canary", two_versions, "2", "--percent", "10", "--dry-run")
    assert code == 0 and "nothing changed" in out
    assert routing(engine, two_versions).get("canary") is None


@pytest.mark.parametrize("args", [
    pytest.param(["2"], id="no-percent"),
    pytest.param(["--percent", "10"], id="no-version"),
    pytest.param(["2", "--percent", "10", "--stop"], id="stop-with-a-canary"),
    pytest.param(["2", "--percent", "10", "--steps", "5,lots"], id="bad-steps"),
    pytest.param(["2", "--steps", "5,nan,100"], id="nan-step"),
])
def test_bad_arguments_exit_2_and_change_nothing(cli, engine, two_versions, args):  # noqa: F811
    code, _, err = cli("flows", "canary", two_versions, *args)
    assert code == 2 and "flowgate:" in err
    assert routing(engine, two_versions).get("canary") is None


@pytest.mark.parametrize("args", [
    pytest.param(["2", "--percent", "nan"], id="nan-percent"),
    pytest.param(["2", "--percent", "10", "--max-error-rate", "inf"], id="inf-guard"),
])
def test_numbers_json_has_not_are_usage_errors(cli, engine, two_versions, args):  # noqa: F811
    with pytest.raises(SystemExit) as exited:  # argparse: the value is not a number it takes
        cli("flows", "canary", two_versions, *args)
    assert exited.value.code == 2
    assert routing(engine, two_versions).get("canary") is None


@pytest.mark.parametrize(("args", "status"), [
    pytest.param(["9", "--percent", "10"], "400", id="no-such-version"),
    pytest.param(["2", "--percent", "150"], "400", id="percent-out-of-range"),
])
def test_the_engine_refusing_exits_1(cli, engine, two_versions, args, status):  # noqa: F811
    code, _, err = cli("flows", "canary", two_versions, *args)
    assert code == 1 and status in err
    assert routing(engine, two_versions).get("canary") is None
