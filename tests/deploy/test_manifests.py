"""The deployment files are checked by tools, not by eye: every kustomize overlay builds and
validates against the Kubernetes API schemas (no unknown fields), docker-compose.yml against
the Compose Specification, and both say what the services actually accept (CLI options,
environment variables, ambassador config)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
MIN_KUBERNETES = "1.29.0"  # native sidecars: init containers with restartPolicy: Always
OVERLAYS = ("dev", "prod")
AMBASSADOR_LABEL = ("flowgate.io/ambassador", "true")


def find(docs, kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name)


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


# -- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["minimum", "newest"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(render, kubernetes_validate, overlay, version):
    from kubernetes_validate.utils import SchemaNotFoundError, all_versions, major_minor

    bundled = all_versions()
    if version == "minimum":
        assert major_minor(MIN_KUBERNETES) in {major_minor(v) for v in bundled}, (
            f"kubernetes-validate no longer bundles {MIN_KUBERNETES}: pin an older release")
        version = MIN_KUBERNETES
    else:
        version = bundled[-1]
    problems = []
    for doc in render(overlay):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    assert not problems, f"overlays/{overlay} against Kubernetes {version}:\n" + "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_deployment_is_replicated_probed_and_locked_down(render, overlay):
    docs = render(overlay)
    deployment = find(docs, "Deployment", "flow-engine")
    spec = pod_spec(deployment)
    engine = container(spec, "flow-engine")
    assert deployment["spec"]["replicas"] >= 2
    assert engine["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert engine["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert engine["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(engine["resources"]["requests"])
    assert "memory" in engine["resources"]["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    assert engine["securityContext"]["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in engine["volumeMounts"]
                if next(v for v in spec["volumes"] if v["name"] == m["name"]).get("emptyDir") is not None}
    assert "/tmp" in writable, "gunicorn needs a writable /tmp on a read-only root filesystem"
    multiproc = env_value(engine, "PROMETHEUS_MULTIPROC_DIR")
    assert multiproc and any(multiproc.startswith(path.rstrip("/") + "/") for path in writable)

    config = find(docs, "ConfigMap", engine["envFrom"][0]["configMapRef"]["name"])["data"]
    graceful = int(config["FLOW_ENGINE_GRACEFUL_TIMEOUT"])
    pre_stop = int(engine["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > graceful + pre_stop, (
        "in-flight runs must be able to finish before SIGKILL")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_service_hpa_pdb_and_network_policy_select_the_engine(render, overlay):
    docs = render(overlay)
    pod_labels = find(docs, "Deployment", "flow-engine")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= pod_labels.items()

    service = find(docs, "Service", "flow-engine")
    assert service["spec"]["type"] == "ClusterIP" and selects(service["spec"]["selector"])
    hpa = find(docs, "HorizontalPodAutoscaler", "flow-engine")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "flow-engine"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert selects(find(docs, "PodDisruptionBudget", "flow-engine")["spec"]["selector"]["matchLabels"])

    policy = find(docs, "NetworkPolicy", "flow-engine")["spec"]
    assert selects(policy["podSelector"]["matchLabels"]) and policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert all("podSelector" in peer for peer in sources), "every allowed peer is a pod selector"
    label, value = AMBASSADOR_LABEL
    ambassador_peers = [p for p in sources if p["podSelector"].get("matchLabels", {}).get(label) == value]
    assert ambassador_peers, "ambassador pods must be admitted"
    others = [p for p in sources if p not in ambassador_peers]
    assert all(p["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "prometheus" for p in others)


def test_orders_app_runs_the_ambassador_as_a_native_sidecar(render):
    docs = render("dev")  # components/orders-app: prod ships no demo app
    deployment = find(docs, "Deployment", "orders-app")
    template = deployment["spec"]["template"]
    spec = template["spec"]
    assert template["metadata"]["labels"][AMBASSADOR_LABEL[0]] == AMBASSADOR_LABEL[1]
    sidecar = container({"initContainers": spec["initContainers"]}, "ambassador")
    assert sidecar["restartPolicy"] == "Always"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(sidecar)
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "preStop" in sidecar["lifecycle"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["args"][0] == "ambassador"
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_path.name in config_map["data"]
    key = next(e for e in sidecar["env"] if e["name"] == "AMBASSADOR_UPSTREAM_KEY")
    assert "secretKeyRef" in key["valueFrom"]
    app = container(spec, "orders-app")
    assert env_value(app, "AMBASSADOR_URL") == "http://localhost:8080"
    assert not any("KEY" in e["name"] for e in app.get("env", [])), "the app never holds the engine key"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_config_map_and_secret_exists(render, overlay):
    docs = render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # prod deletes the Secret templates: those Secrets come from the cluster's secret store
    external = {("Secret", "flow-engine-secrets"), ("Secret", "flowgate-flows-publisher")}
    external = external if overlay == "prod" else set()
    wanted = set()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(doc)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for source in c.get("envFrom", []):
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        wanted.add((kind, source[ref]["name"]))
            for e in c.get("env", []):
                for kind, ref in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if ref in e.get("valueFrom", {}):
                        wanted.add((kind, e["valueFrom"][ref]["name"]))
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                wanted.add(("Secret", volume["secret"]["secretName"]))
    assert wanted - names == external


def test_secret_templates_hold_placeholders_and_prod_deploys_none(render):
    k8s = REPO / "deploy" / "k8s"
    for path in (k8s / "base" / "flow-engine" / "secret.yaml",
                 k8s / "components" / "orders-app" / "secret.yaml"):
        secret = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert secret["kind"] == "Secret" and "TEMPLATE" in path.read_text(encoding="utf-8")
        assert all("REPLACE-ME" in value for value in secret["stringData"].values()), path
    assert not [d for d in render("prod") if d["kind"] == "Secret"]


def test_dashboards_config_map_is_labelled_for_the_grafana_sidecar(render):
    for overlay in OVERLAYS:
        dashboards = find(render(overlay), "ConfigMap", "flowgate-grafana-dashboards")
        assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
        for name in ("ambassador.json", "flow-engine.json"):
            on_disk = (REPO / "deploy" / "grafana" / "dashboards" / name).read_text(encoding="utf-8")
            assert dashboards["data"][name] == on_disk


def test_ambassador_configs_load(render, tmp_path):
    from ambassador import config

    config.load(REPO / "deploy" / "compose" / "ambassador.yaml", environ={})
    data = find(render("dev"), "ConfigMap", "orders-app-ambassador")["data"]
    path = tmp_path / "dev.yaml"
    path.write_text(data["ambassador.yaml"], encoding="utf-8")
    settings = config.load(path, environ={})
    assert settings.upstream.url == "http://flow-engine:8000"


# -- what the containers run -----------------------------------------------------------------

def _flowgate_commands(render) -> list[tuple[str, list[str]]]:
    """(where, argv) of every container that runs the flowgate entrypoint."""
    found = []
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["kind"] not in ("Deployment", "Job"):
                continue
            spec = pod_spec(doc)
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                if c["image"].split(":")[0].endswith("flowgate") and "command" not in c:
                    found.append((f"{overlay}: {doc['metadata']['name']}/{c['name']}", c["args"]))
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("${FLOWGATE_IMAGE") and "entrypoint" not in service:
            found.append((f"compose: {name}", service["command"]))
    return found


def _help(argv: list[str]) -> str:
    from flowgate import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0, f"flowgate {' '.join(argv)} --help failed"
    return out.getvalue()


def test_container_arguments_are_options_the_cli_knows(render):
    """Each `--option` a manifest passes appears in the `flowgate ... --help` it is for."""
    commands = _flowgate_commands(render)
    assert {argv[0] for _where, argv in commands} >= {"engine", "ambassador", "llm-sim", "flows"}
    for where, argv in commands:
        subcommand = argv[:2] if argv[0] == "flows" else argv[:1]
        text = _help(subcommand)
        for option in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{where}: flowgate {' '.join(subcommand)} has no option {option}")
        for path in (a for a in argv if a.startswith("examples/")):
            assert (REPO / path).is_file(), f"{where}: {path} is not in the repo (the image copies examples/)"


def test_orders_app_module_is_where_gunicorn_looks(render):
    app = container(pod_spec(find(render("dev"), "Deployment", "orders-app")), "orders-app")
    assert app["command"] == ["gunicorn"]
    assert app["args"][app["args"].index("--chdir") + 1] == "/app/examples"
    assert app["args"][-1] == "orders_app.app:app"
    assert (REPO / "examples" / "orders_app" / "app.py").is_file()


def _environment_names(render) -> set[str]:
    names = set()
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("flow-engine-config"):
                names |= set(doc["data"])
            if doc["kind"] in ("Deployment", "Job"):
                spec = pod_spec(doc)
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    names |= {e["name"] for e in c.get("env", [])}
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    names |= set(yaml.safe_load((REPO / "deploy/k8s/base/flow-engine/secret.yaml").read_text())["stringData"])
    return names


def test_environment_variables_are_ones_the_services_read(render):
    from flow_engine.config import Settings

    sources = "\n".join(p.read_text(encoding="utf-8")
                        for package in ("flow_engine", "ambassador", "flowgate", "examples")
                        for p in (REPO / package).rglob("*.py"))
    fields = {f.upper() for f in Settings.__dataclass_fields__}
    unknown = []
    for name in sorted(_environment_names(render)):
        if name.startswith("FLOW_ENGINE_") and name.removeprefix("FLOW_ENGINE_") in fields:
            continue
        if name.startswith(("FLOW_ENGINE_", "AMBASSADOR_", "FLOWGATE_", "PROMETHEUS_")) or name in (
                "DATABASE_URL", "REDIS_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
            if f'"{name}"' not in sources:
                unknown.append(name)
    assert not unknown, f"no service reads these environment variables: {unknown}"


# -- docker compose --------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_specification(compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert not errors, "docker-compose.yml:\n" + "\n".join(errors)


def test_compose_wires_the_sidecar_and_the_dependencies():
    services = compose()["services"]
    assert {"redis", "postgres", "llm-sim", "flow-engine", "orders-app", "ambassador",
            "prometheus", "grafana"} <= set(services)
    assert services["ambassador"]["network_mode"] == "service:orders-app"
    assert "ports" not in services["ambassador"], "a sidecar publishes through its app's namespace"
    assert services["orders-app"]["environment"]["AMBASSADOR_URL"] == "http://localhost:8080"
    engine = services["flow-engine"]["environment"]
    assert engine["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in engine["DATABASE_URL"]
    assert engine["REDIS_URL"].startswith("redis://redis:")
    # which key each service holds, and its role: test_deploy_keys.py
    assert "FLOWGATE_ORDERS_APP_KEY" in engine["FLOW_ENGINE_API_KEYS"]
    assert "FLOWGATE_ORDERS_APP_KEY" in services["ambassador"]["environment"]["AMBASSADOR_UPSTREAM_KEY"]
    assert engine["OPENAI_BASE_URL"].startswith("${OPENAI_BASE_URL:-"), "one variable switches the LLM"
    long_running = {name for name, s in services.items() if s.get("restart") != "no"}
    assert all("healthcheck" in services[name] for name in long_running)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"


def test_dockerfile_is_multi_stage_slim_and_non_root(dockerfile_parser):
    commands = dockerfile_parser.parse_file(str(DOCKERFILE))
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert len(starts) >= 2, "build wheels in a builder stage"
    final = commands[starts[-1]:]
    base = next(c.value[0] for c in commands if c.cmd == "ARG" and c.value[0].startswith("PYTHON_IMAGE="))
    assert base.startswith("PYTHON_IMAGE=python:3.11-slim")
    assert final[0].value[0] == "${PYTHON_IMAGE}"
    for c in final:
        if c.cmd == "RUN":
            assert not re.search(r"apt-get install|build-essential|gcc", " ".join(c.value)), (
                "no build tools in the final image")
    user = [c.value[0] for c in final if c.cmd == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", (
        "a numeric non-root USER, so Kubernetes can check runAsNonRoot")
    entrypoint = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint[-1].json and entrypoint[-1].value == ("flowgate",)
    for c in commands:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repo"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for package in ("flowgate", "flow_engine", "ambassador", "examples"):
        assert f"!{package}/**" in ignore
