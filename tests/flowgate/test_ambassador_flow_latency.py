"""The ambassador's upstream-attempt and overhead histograms carry the bounded ``flow``
label, so the dashboard's ``$flow`` filter works on its "Upstream attempt latency" and
"Ambassador overhead" panels: a real engine (gunicorn, SQLite) behind a real ambassador
(gunicorn), their ``/metrics`` read as Prometheus would."""

from __future__ import annotations

import sys

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.procs import ServerProcess, free_port
from support.waiting import wait_until

pytestmark = pytest.mark.integration

ADMIN, SIDECAR = "admin-secret-0101", "sidecar-secret-0202"
FLOW = "latency-by-flow"
HISTOGRAMS = ("flowgate_ambassador_upstream_duration_seconds",
              "flowgate_ambassador_overhead_seconds")


@pytest.fixture(scope="module")
def ambassador(tmp_path_factory) -> ServerProcess:
    workdir = tmp_path_factory.mktemp("latency")
    port = free_port()
    keys = f"ops:admin:{ADMIN},sidecar:runner+proxy:{SIDECAR}"
    with ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                       port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=workdir, env={"FLOW_ENGINE_API_KEYS": keys, "REDIS_URL": "",
                                         "DATABASE_URL": f"sqlite:///{workdir / 'e.db'}"}
                       ) as engine:
        flow = {"id": FLOW, "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
            {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}
        created = requests.post(f"{engine.url}/api/v1/flows", json=flow, timeout=10,
                                headers={"x-api-key": ADMIN})
        assert created.status_code == 201, created.text
        config = workdir / "ambassador.yaml"
        config.write_text(yaml.safe_dump({"upstream": {"url": engine.url}}), encoding="utf-8")
        amb_port = free_port()
        with ServerProcess([sys.executable, "-m", "flowgate.cli", "ambassador", "--port",
                            str(amb_port)], port=amb_port, ready_path="/readyz",
                           name="ambassador", ready_timeout=30, cwd=workdir,
                           env={"AMBASSADOR_CONFIG": str(config), "REDIS_URL": "",
                                "AMBASSADOR_UPSTREAM_KEY": SIDECAR,
                                "PROMETHEUS_MULTIPROC_DIR": str(workdir / "amb-metrics")}
                           ) as amb:
            yield amb


def counts(amb: ServerProcess) -> dict[tuple[str, str, str], float]:
    """``{(histogram, route, flow): observations}`` from the ambassador's /metrics."""
    text = requests.get(f"{amb.url}/metrics", timeout=10).text
    return {(family.name, s.labels["route"], s.labels["flow"]): s.value
            for family in text_string_to_metric_families(text) if family.name in HISTOGRAMS
            for s in family.samples if s.name.endswith("_count")}


def test_upstream_and_overhead_latency_are_labelled_by_bounded_flow(ambassador):
    for flow_id in (FLOW, "made-up-flow-7f3a"):
        answer = requests.post(f"{ambassador.url}/run-flow", timeout=30,
                               json={"flow_id": flow_id, "input": "hello"})
        assert answer.status_code == (200 if flow_id == FLOW else 404), answer.text
        answer.close()

    def both_recorded():
        seen = counts(ambassador)
        wanted = [(name, "/run-flow", flow) for name in HISTOGRAMS for flow in (FLOW, "other")]
        return seen if all(seen.get(key) == 1 for key in wanted) else None

    seen = wait_until(both_recorded, lambda: f"both histograms by flow: {counts(ambassador)}")
    # the caller's made-up id is "other", never a series of its own
    assert not any(flow == "made-up-flow-7f3a" for _name, _route, flow in seen), seen
