"""Prometheus rules and configs pass promtool; the Grafana dashboards are well formed, every
panel queries something, every PromQL expression parses, and every metric and label it
names is one the services export (flow_engine/metrics.py, ambassador/metrics.py).

Evaluating the expressions against a live Prometheus scraping the running stack is a
separate integration test; the dashboards are built for it: one ``datasource`` variable,
standard PromQL, template variables that match everything when set to All (``.*``)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
DASHBOARD_FILES = ("ambassador.json", "flow-engine.json")
# Labels Prometheus adds to every series of a target (deploy/prometheus/*.yml relabelling).
TARGET_LABELS = {"job", "instance", "pod", "namespace", "app"}
METRIC = re.compile(r"\bflowgate_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(flowgate_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")

# What the issue asks each dashboard to show, as the metrics that show it.
REQUIRED = {
    "ambassador.json": {
        "flowgate_ambassador_requests_total",  # request rate, error ratio
        "flowgate_ambassador_request_duration_seconds_bucket",  # p50/p95/p99
        "flowgate_ambassador_overhead_seconds_bucket",
        "flowgate_ambassador_cache_total",
        "flowgate_ambassador_retries_total",
        "flowgate_ambassador_retry_budget_exhausted_total",
        "flowgate_ambassador_breaker_state",
        "flowgate_ambassador_in_flight_requests",
    },
    "flow-engine.json": {
        "flowgate_engine_runs_total",  # by flow, version, status
        "flowgate_engine_run_duration_seconds_bucket",
        "flowgate_engine_node_duration_seconds_bucket",
        "flowgate_engine_time_to_first_token_seconds_bucket",
        "flowgate_engine_llm_tokens_total",
        "flowgate_engine_active_runs",
        "flowgate_engine_active_streams",
        "flowgate_engine_compile_cache_total",
    },
}
REQUIRED_ALERT_METRICS = {
    "breaker open": "flowgate_ambassador_breaker_state",
    "error ratio": "flowgate_ambassador_requests_total",
    "p99 latency": "flowgate_ambassador_request_duration_seconds_bucket",
    "retry budget exhausted": "flowgate_ambassador_retry_budget_exhausted_total",
    "engine not ready": 'up{job="flow-engine"}',
}


def load_dashboard(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))


def data_panels(dashboard: dict) -> list[dict]:
    """Panels that show data (rows only group them), nested row panels included."""
    panels = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of every dashboard."""
    found = []
    for name in DASHBOARD_FILES:
        dashboard = load_dashboard(name)
        for panel in data_panels(dashboard):
            for target in panel.get("targets", []):
                found.append((f"{name}: {panel['title']} [{target['refId']}]", target.get("expr", "")))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                query = query["query"] if isinstance(query, dict) else query
                inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
                assert inner, f"{name}: variable {variable['name']} is not label_values(metric, label)"
                found.append((f"{name}: variable {variable['name']}", inner.group(1)))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text(encoding="utf-8"))
    return [(f"rules.yml: {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for when set to All."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# -- promtool --------------------------------------------------------------------------------

def test_alert_rules_pass_promtool(promtool):
    out = run([promtool, "check", "rules", "rules.yml"], cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_unit_tests_pass(promtool):
    out = run([promtool, "test", "rules", "rules_test.yml"], cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "kubernetes.yml"])
def test_prometheus_configs_pass_promtool(promtool, config, tmp_path):
    """Debian's promtool is built without Kubernetes service discovery: there, the
    kubernetes_sd_configs blocks are swapped for empty static ones and the rest (relabelling,
    rule files) is still checked."""
    out = run([promtool, "check", "config", config], cwd=PROMETHEUS)
    if "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        data = yaml.safe_load((PROMETHEUS / config).read_text(encoding="utf-8"))
        for job in data["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": []}]
        (tmp_path / config).write_text(yaml.safe_dump(data), encoding="utf-8")
        (tmp_path / "rules.yml").write_bytes((PROMETHEUS / "rules.yml").read_bytes())
        out = run([promtool, "check", "config", config], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dashboard_expression_parses(promtool, tmp_path):
    """promtool parses each expression as a recording rule (variables set to All)."""
    expressions = dashboard_expressions()
    rules = [{"record": f"flowgate:dashboard_check:{i}", "expr": as_plain_promql(expr)}
             for i, (_where, expr) in enumerate(expressions)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    out = run([promtool, "check", "rules", path.name], cwd=tmp_path)
    if out.returncode != 0:
        numbered = "\n".join(f"  {i}: {where}: {expr}" for i, (where, expr) in enumerate(expressions))
        pytest.fail(f"{out.stdout}{out.stderr}\nexpressions by number:\n{numbered}", pytrace=False)


# -- the metrics exist ------------------------------------------------------------------------

def test_every_metric_in_dashboards_and_rules_is_exported(exported_metrics):
    unknown = [f"{where}: {name}"
               for where, expr in dashboard_expressions() + rule_expressions()
               for name in METRIC.findall(expr) if name not in exported_metrics]
    assert not unknown, "metrics nobody exports:\n" + "\n".join(unknown)


def test_every_label_in_dashboards_and_rules_is_one_the_metric_has(exported_metrics):
    problems = []
    for where, expr in dashboard_expressions() + rule_expressions():
        known_here = set(TARGET_LABELS)
        for name, matchers in SELECTOR.findall(expr):
            metric = exported_metrics.get(name)
            if metric is None:
                continue  # reported by the test above
            labels = metric.labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            known_here |= labels
            problems += [f"{where}: {name} has no label {label}"
                         for label in MATCHER.findall(matchers) if label not in labels]
        for name in METRIC.findall(expr):
            if name in exported_metrics:
                known_here |= exported_metrics[name].labels | {"le"}
        for group in GROUPING.findall(expr):
            labels = [g.strip() for g in group.split(",") if g.strip()]
            problems += [f"{where}: grouping by {label}, which none of its metrics has"
                         for label in labels if label not in known_here]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_shows_what_the_issue_asks_for(name):
    used = {metric for where, expr in dashboard_expressions() if where.startswith(name)
            for metric in METRIC.findall(expr)}
    assert REQUIRED[name] <= used, f"{name} does not chart {sorted(REQUIRED[name] - used)}"


# -- dashboards -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_is_well_formed(name, exported_metrics):
    dashboard = load_dashboard(name)
    assert dashboard["uid"] and dashboard["title"].startswith("Flowgate /")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for templated in ("pod", "flow"):
        variable = variables[templated]
        assert variable["type"] == "query" and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable["query"]["query"].startswith("label_values(flowgate_")
        assert variable["query"]["query"].endswith(f", {templated})")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
    for panel in data_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = [t for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert targets, f"{name}: panel {panel['title']!r} has no target with an expr"
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # every series is filtered by the pod variable, and by flow where it has one
            for metric, matchers in SELECTOR.findall(target["expr"]):
                known = exported_metrics.get(metric)
                wanted = ["pod"] + (["flow"] if known and "flow" in known.labels else [])
                for label in wanted:
                    assert f'{label}=~"${label}"' in matchers, f"{panel['title']}: {metric} ignores ${label}"


def test_dashboard_uids_are_distinct():
    uids = [load_dashboard(name)["uid"] for name in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "flowgate.yml").read_text(encoding="utf-8"))
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text(
        encoding="utf-8"))["datasources"]
    assert {s["type"]: s["url"] for s in sources} == {"prometheus": "http://prometheus:9090",
                                                     "tempo": "http://tempo:3200"}
    # the traces Grafana reads are where both services send theirs
    tempo = yaml.safe_load((REPO / "deploy" / "tempo" / "tempo.yaml").read_text(encoding="utf-8"))
    assert tempo["server"]["http_listen_port"] == 3200
    receiver = tempo["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for service in ("flow-engine", "ambassador"):
        endpoint = compose["services"][service]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == "http://tempo:" + receiver.rsplit(":", 1)[1], service
    assert "./deploy/tempo/tempo.yaml" in " ".join(compose["services"]["tempo"]["volumes"])


# -- alert rules ------------------------------------------------------------------------------

def test_every_alert_has_a_runbook_and_a_severity():
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            runbook = rule["annotations"].get("runbook", "")
            assert len(runbook.split()) >= 8 and runbook.endswith("."), f"{rule['alert']}: runbook sentence"
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


@pytest.mark.parametrize("what", sorted(REQUIRED_ALERT_METRICS))
def test_alerts_cover_what_the_issue_asks_for(what):
    needle = REQUIRED_ALERT_METRICS[what]
    assert any(needle in expr for _where, expr in rule_expressions()), f"no alert on {what} ({needle})"


def test_every_alert_has_a_section_in_the_runbooks():
    """Each alert's runbook annotation is a sentence; docs/runbooks.md is where the on-call
    engineer goes next, so an alert without a section there is a dead end."""
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule}
    runbooks = (REPO / "docs" / "runbooks.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\S+)\s*$", runbooks, flags=re.MULTILINE))
    assert alerts - sections == set(), "alerts without a section in docs/runbooks.md"
    assert sections - alerts == set(), "runbook sections for alerts rules.yml no longer has"


@pytest.mark.parametrize("objective", ["Availability", "Latency"])
def test_each_slo_has_the_three_burn_rate_tiers(objective):
    """Google's SRE workbook: page on 14.4x/1h and 6x/6h, a 1x/3d ticket; each with its
    short window (1/12 of the long one)."""
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text(encoding="utf-8"))
    by_name = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]
               if "alert" in rule}
    expected = {"Fast": ("critical", {("1h", "5m", "14.4"), ("6h", "30m", "6")}),
                "Slow": ("warning", {("6h", "30m", "3")}),
                "Ticket": ("warning", {("3d", "6h", "1")})}
    for tier, (severity, windows) in expected.items():
        rule = by_name[f"Flowgate{objective}BudgetBurn{tier}"]
        assert rule["labels"]["severity"] == severity
        found = set(re.findall(r"ratio_rate(\w+) > \(([\d.]+) \* [\d.]+\) and \S+ratio_rate(\w+)"
                               r" > \(\2 \* [\d.]+\)", rule["expr"]))
        assert {(long, short, factor) for long, factor, short in found} == windows, rule["expr"]
