"""Who holds which engine key, in docker-compose.yml and in every kustomize overlay (issue 10,
"Isolation between callers"): each holder has its own named key with the least role it
needs — a sidecar a ``runner+proxy`` key that is in the engine's list, a job that pushes
flows a ``publisher`` key, the operators' CLI an ``admin`` key, and no app or sidecar an
``admin`` or ``publisher`` one. The
engine's settings are checked with the engine's own code (flow_engine.config, .auth,
.egress, .tenants), so "the engine would refuse to start" is caught here, not at deploy time.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from flow_engine.auth import ApiKey, parse_keys
from flow_engine.config import ConfigError, Settings
from flow_engine.tenants import TenantPolicy

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
BASE = REPO / "deploy" / "k8s" / "base"
OVERLAYS = ("dev", "prod")
# What a user exports before `docker compose up` (deploy/README.md), as test values.
COMPOSE_SECRETS = {"FLOWGATE_ADMIN_KEY": "admin-secret-0123456789abcdef",
                   "FLOWGATE_FLOWS_KEY": "flows-init-secret-0123456789abcdef",
                   "FLOWGATE_ORDERS_APP_KEY": "orders-app-secret-0123456789abcdef"}
PUBLISHER = "pushing and publishing flows needs the publisher role, no more"
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, ...)."""
    def sub(found: re.Match[str]) -> str:
        if found.group(0) == "$$":
            return "$"
        name = found.group(1) or found.group(4)
        op, arg = found.group(2), found.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if unset else current
        if op in ("?", ":?"):
            if unset:
                raise KeyError(f"{name}: {arg}")
            return current
        if op in ("+", ":+"):
            return "" if unset else arg
        return current or ""

    return INTERPOLATION.sub(sub, value)


def compose_env(service: str, env: dict[str, str]) -> dict[str, str]:
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    return {k: interpolate(str(v), env) for k, v in services[service].get("environment", {}).items()}


def compose_services() -> list[str]:
    return list(yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"])


def engine_keys(value: str) -> tuple[ApiKey, ...]:
    """FLOW_ENGINE_API_KEYS as the engine parses it (duplicates and bad entries refused)."""
    return parse_keys(part for part in value.split(",") if part.strip())


def key_with_secret(keys: tuple[ApiKey, ...], secret: str, where: str) -> ApiKey:
    found = [k for k in keys if k.secret == secret.encode()]
    assert found, f"{where}: its key is not one of the engine's keys ({', '.join(map(repr, keys))})"
    return found[0]


def check_engine_starts(env: dict[str, str], where: str) -> Settings:
    """What the engine checks at start: its keys, provider egress, tenant limits."""
    try:
        settings = Settings.load(environ=env)
        keys = settings.check_auth()
        settings.egress  # noqa: B018 - raises ConfigError when OPENAI_* would leak the key
        TenantPolicy.parse(settings.tenant_max_runs, settings.tenant_tokens_per_minute,
                           settings.tenant_limits, keys.names())
    except (ConfigError, ValueError) as exc:
        pytest.fail(f"{where}: the engine would refuse to start: {exc}", pytrace=False)
    return settings


# -- docker compose --------------------------------------------------------------------------

def test_compose_gives_each_holder_its_own_key_with_the_least_role():
    keys = engine_keys(compose_env("flow-engine", COMPOSE_SECRETS)["FLOW_ENGINE_API_KEYS"])
    sidecar = key_with_secret(keys, compose_env("ambassador", COMPOSE_SECRETS)["AMBASSADOR_UPSTREAM_KEY"],
                              "compose ambassador")
    assert (sidecar.name, sidecar.role, sidecar.proxy) == ("orders-app", "runner", True), (
        "the orders app's sidecar runs flows for its callers: a runner+proxy key named after the app")
    pusher = key_with_secret(keys, compose_env("flows-init", COMPOSE_SECRETS)["FLOWGATE_API_KEY"],
                             "flows-init")
    assert (pusher.role, pusher.proxy) == ("publisher", False), PUBLISHER
    cli = key_with_secret(keys, COMPOSE_SECRETS["FLOWGATE_ADMIN_KEY"], "the host's CLI")
    assert (cli.name, cli.role, cli.proxy) == ("platform-cli", "admin", False), (
        "issue #10: the operators' CLI keeps an admin key")
    privileged = {k.secret.decode() for k in keys if k.role in ("admin", "publisher")}
    for service in compose_services():
        env = compose_env(service, COMPOSE_SECRETS)
        if service != "flow-engine":
            assert "FLOW_ENGINE_API_KEYS" not in env, f"{service} must not hold the engine's key list"
            assert cli.secret.decode() not in env.values(), f"{service} holds the CLI's admin key"
        if service in ("ambassador", "orders-app"):
            held = privileged & set(env.values())
            assert not held, f"compose {service} holds an admin or publisher key"
    assert not any("KEY" in name for name in compose_env("orders-app", COMPOSE_SECRETS)), \
        "the app never holds an engine key"


def test_compose_refuses_to_start_without_each_secret_and_says_where_to_look():
    for missing in COMPOSE_SECRETS:
        env = {k: v for k, v in COMPOSE_SECRETS.items() if k != missing}
        with pytest.raises(KeyError, match=rf"{missing}: set {missing} first\b.*\(see deploy/README.md\)"):
            compose_env("flow-engine", env)


# The variable of the CLI's key before it became admin: it held a publisher key, shared by
# flows-init and the CLI, which operators may have handed to CI (deploy/README.md, "Upgrading").
OLD_CLI_VARIABLE = "FLOWGATE_CLI_KEY"
OLD_CLI_SECRET = "old-publisher-secret-0123456789abcdef"


def compose_files_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def test_the_old_cli_variable_no_longer_gives_a_key():
    """The CLI's key turned admin under a new variable: a secret that was handed out as a
    publisher key under FLOWGATE_CLI_KEY must not quietly become admin (nor open anything)."""
    assert not re.search(rf"\${{?{OLD_CLI_VARIABLE}\b", compose_files_text()), (
        f"docker-compose.yml still reads {OLD_CLI_VARIABLE}; the admin key is FLOWGATE_ADMIN_KEY")
    env = {**COMPOSE_SECRETS, OLD_CLI_VARIABLE: OLD_CLI_SECRET}  # still exported: nothing breaks
    keys = engine_keys(compose_env("flow-engine", env)["FLOW_ENGINE_API_KEYS"])
    assert OLD_CLI_SECRET not in {k.secret.decode() for k in keys}, "the old secret opens a key"
    for service in compose_services():
        assert OLD_CLI_SECRET not in compose_env(service, env).values(), f"{service} holds it"
    check_engine_starts(compose_env("flow-engine", env), "compose with FLOWGATE_CLI_KEY still set")


def test_compose_without_the_new_admin_variable_refuses_to_start_even_with_the_old_one():
    env = {k: v for k, v in COMPOSE_SECRETS.items() if k != "FLOWGATE_ADMIN_KEY"}
    env[OLD_CLI_VARIABLE] = OLD_CLI_SECRET
    with pytest.raises(KeyError, match=r"FLOWGATE_ADMIN_KEY: set FLOWGATE_ADMIN_KEY first.*"
                                       r"FLOWGATE_CLI_KEY is no longer read.*deploy/README.md"):
        compose_env("flow-engine", env)


def test_the_docs_name_the_old_cli_variable_only_to_say_it_is_gone():
    """Every mention of FLOWGATE_CLI_KEY left in the docs is in the upgrade notes; none tells
    anyone to export it or use it as a key."""
    docs = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        assert not re.search(rf"^export {OLD_CLI_VARIABLE}=|\${OLD_CLI_VARIABLE}\b", text,
                             re.MULTILINE), f"{doc.relative_to(REPO)} still uses {OLD_CLI_VARIABLE}"
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    upgrade = readme.split("### Upgrading an existing compose stack", 1)[1].split("\n## ", 1)[0]
    assert OLD_CLI_VARIABLE in upgrade and "FLOWGATE_ADMIN_KEY" in upgrade


def test_deploy_readme_says_to_reindex_a_volume_made_by_the_alpine_image():
    """postgres:16-alpine (musl) → pgvector/pgvector:pg16 (Debian, glibc) on the same volume
    changes how text collates: its text indexes must be rebuilt once."""
    services = yaml.safe_load(compose_files_text())["services"]
    assert services["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    upgrade = readme.split("### Upgrading an existing compose stack", 1)[1].split("\n## ", 1)[0]
    assert "REINDEX DATABASE flowgate;" in upgrade and "postgres:16-alpine" in upgrade
    assert "docker compose down -v" in upgrade  # or a fresh volume


def test_deploy_readme_exports_exactly_the_secrets_compose_requires():
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text(encoding="utf-8")))
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    exported = set(re.findall(r"^export (\w+)=", readme, re.MULTILINE))
    assert required == set(COMPOSE_SECRETS) == exported, (required, exported)


@pytest.mark.parametrize(("user", "accepted"), [
    pytest.param({}, True, id="the simulator, no provider key"),
    pytest.param({"OPENAI_BASE_URL": "https://api.openai.com/v1", "OPENAI_API_KEY": "sk-test"}, True,
                 id="OpenAI"),
    pytest.param({"OPENAI_BASE_URL": "http://host.docker.internal:11434/v1"}, True, id="Ollama, no key"),
    pytest.param({"OPENAI_BASE_URL": "http://vllm.internal:8000/v1", "OPENAI_API_KEY": "k"}, False,
                 id="a key over plain http, origin not listed"),
    pytest.param({"OPENAI_BASE_URL": "http://vllm.internal:8000/v1", "OPENAI_API_KEY": "k",
                  "FLOW_ENGINE_PROVIDER_ORIGINS": "http://vllm.internal:8000"}, True,
                 id="a key over plain http, origin listed"),
    pytest.param({"FLOW_ENGINE_TENANT_LIMITS": '{"orders-app": {"max_runs": 200}}'}, True,
                 id="a tenant override"),
])
def test_compose_engine_settings_pass_the_engine_start_up_checks(user, accepted):
    """What deploy/README.md tells users to set: each works, or (a provider key in clear
    without listing the origin) is refused with a message that says how to accept it."""
    env = compose_env("flow-engine", {**COMPOSE_SECRETS, **user})
    if accepted:
        settings = check_engine_starts(env, f"compose with {user}")
        assert settings.tenant_max_runs > 0, "compose caps each tenant's runs in progress"
    else:
        with pytest.raises(ConfigError, match=re.escape("FLOW_ENGINE_PROVIDER_ORIGINS=http://vllm.internal:8000")):
            Settings.load(environ=env).egress  # noqa: B018


# -- Kubernetes ------------------------------------------------------------------------------

def pods(docs) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "Job")]


def containers(spec: dict) -> list[dict]:
    return spec.get("containers", []) + spec.get("initContainers", [])


def secret_data(docs, name: str) -> dict[str, str] | None:
    """A rendered Secret's values (stringData, or base64 data), None when not rendered."""
    found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    if not found:
        return None
    data = {k: base64.b64decode(v).decode() for k, v in (found[0].get("data") or {}).items()}
    return {**data, **(found[0].get("stringData") or {})}


def secret_refs(c: dict) -> list[tuple[str, str, str]]:
    """(env name, Secret, key) of each env var a container takes from a Secret."""
    return [(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]


def engine_container(docs) -> dict:
    (spec,) = [s for where, s in pods(docs) if where == "Deployment/flow-engine"]
    (engine,) = spec["containers"]
    return engine


def engine_env(docs) -> dict[str, str]:
    """The engine container's environment: its ConfigMap, its Secret, its env values."""
    env: dict[str, str] = {}
    engine = engine_container(docs)
    for source in engine.get("envFrom", []):
        if "configMapRef" in source:
            (config,) = [d for d in docs if d["kind"] == "ConfigMap"
                         and d["metadata"]["name"] == source["configMapRef"]["name"]]
            env.update(config["data"])
        if "secretRef" in source:
            env.update(secret_data(docs, source["secretRef"]["name"]) or {})
    env.update({e["name"]: e["value"] for e in engine.get("env", []) if "value" in e})
    return env


def engine_secret_name(docs) -> str:
    (name,) = [s["secretRef"]["name"] for s in engine_container(docs).get("envFrom", []) if "secretRef" in s]
    return name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_engine_reads_the_engine_secret(render, overlay):
    docs = render(overlay)
    engine_secret = engine_secret_name(docs)
    for where, spec in pods(docs):
        if where == "Deployment/flow-engine":
            continue
        for c in containers(spec):
            refs = {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
            refs |= {secret for _env, secret, _key in secret_refs(c)}
            refs |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
            assert engine_secret not in refs, (
                f"{overlay}: {where}/{c['name']} reads {engine_secret}, which holds every engine key; "
                "give it a Secret with its own key only")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecars_take_their_key_from_their_own_secret_and_apps_hold_none(render, overlay):
    docs = render(overlay)
    sidecars = 0
    for where, spec in pods(docs):
        for c in containers(spec):
            refs = secret_refs(c)
            if c.get("args", [None])[0] == "ambassador":
                sidecars += 1
                assert [env for env, _s, _k in refs] == ["AMBASSADOR_UPSTREAM_KEY"], f"{overlay}: {where}"
            elif where.startswith("Deployment/") and where != "Deployment/flow-engine":
                assert not refs and not c.get("envFrom"), f"{overlay}: {where}/{c['name']} holds a secret"
    if overlay == "dev":
        assert sidecars, "dev: no ambassador sidecar found (components/orders-app)"
    else:  # production ships no demo app: the teams' own Deployments carry the sidecars
        apps = [where for where, _spec in pods(docs) if where.startswith("Deployment/")]
        assert apps == ["Deployment/flow-engine"], f"{overlay} deploys {apps}"


def test_prod_flow_delivery_holds_a_publisher_key_of_its_own(render):
    """The delivery Job publishes flows: a publisher key from its own Secret, which the
    engine's key template pairs with a publisher entry of the same name (never admin)."""
    docs = render("prod")
    (spec,) = [s for where, s in pods(docs) if where == "Job/flowgate-flows"]
    (job,) = spec["containers"]
    assert secret_refs(job) == [("FLOWGATE_API_KEY", "flowgate-flows-publisher", "engine-key")]
    template = yaml.safe_load((BASE / "flow-engine" / "secret.yaml").read_text(encoding="utf-8"))
    keys = {k.name: k for k in engine_keys(template["stringData"]["FLOW_ENGINE_API_KEYS"])}
    assert (keys["flowgate-flows"].role, keys["flowgate-flows"].proxy) == ("publisher", False)


def test_dev_keys_are_split_by_role(render):
    """In dev every Secret is rendered: each key a pod holds is resolved to the engine key
    with that secret, and its role checked."""
    docs = render("dev")
    keys = engine_keys(engine_env(docs)["FLOW_ENGINE_API_KEYS"])
    roles = {}
    for where, spec in pods(docs):
        if where == "Deployment/flow-engine":
            continue
        for c in containers(spec):
            for env, secret, item in secret_refs(c):
                value = (secret_data(docs, secret) or {}).get(item)
                assert value is not None, f"dev: {where}/{c['name']}: Secret {secret} has no {item}"
                roles[(where, c["name"], env)] = key_with_secret(keys, value, f"dev: {where}/{c['name']}")
    sidecar = roles[("Deployment/orders-app", "ambassador", "AMBASSADOR_UPSTREAM_KEY")]
    assert (sidecar.name, sidecar.role, sidecar.proxy) == ("orders-app", "runner", True)
    pusher = roles[("Job/push-demo-flows", "push", "FLOWGATE_API_KEY")]
    assert (pusher.role, pusher.proxy) == ("publisher", False), PUBLISHER
    for (where, name, _env), key in roles.items():
        assert key.role != "admin", f"dev: {where}/{name} holds the admin key {key.name}"
    assert any(k.role == "admin" and not k.proxy for k in keys), "dev keeps an admin key for the CLI"


def test_dev_engine_settings_pass_the_engine_start_up_checks(render):
    settings = check_engine_starts(engine_env(render("dev")), "overlays/dev")
    assert settings.openai_base_url.startswith("http://llm-sim:")
    assert not settings.openai_api_key, "the simulator is called without a provider key"


def test_secret_templates_pair_the_sidecar_key_with_a_runner_proxy_engine_key():
    """Prod renders no Secret (they come from the secret store): the base templates show
    the shape to create, and must be a key list the engine accepts."""
    engine = yaml.safe_load((BASE / "flow-engine" / "secret.yaml").read_text(encoding="utf-8"))
    app = yaml.safe_load((BASE.parent / "components" / "orders-app" / "secret.yaml").read_text(
        encoding="utf-8"))
    keys = engine_keys(engine["stringData"]["FLOW_ENGINE_API_KEYS"])
    sidecar = key_with_secret(keys, app["stringData"]["engine-key"], "base orders-app-flowgate")
    assert (sidecar.name, sidecar.role, sidecar.proxy) == ("orders-app", "runner", True)
    assert any(k.role == "admin" and not k.proxy for k in keys), "an admin key for operators' CLI"
    lines = (BASE / "flow-engine" / "config.env").read_text(encoding="utf-8").splitlines()
    config = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    check_engine_starts({**config, **engine["stringData"]}, "base config.env + secret template")
    assert int(config["FLOW_ENGINE_TENANT_MAX_RUNS"]) > 0, "the base caps each tenant's runs in progress"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_settings_of_the_overlay_are_the_engine_s(render, overlay):
    """Every FLOW_ENGINE_* setting an overlay gives the engine is parsed by the engine (a
    typo in a tenant limit fails here, not at the first run)."""
    env = engine_env(render(overlay))
    if overlay == "prod":  # its Secret comes from the secret store: use the template's shape
        env = {**yaml.safe_load((BASE / "flow-engine" / "secret.yaml").read_text())["stringData"], **env}
    check_engine_starts(env, f"overlays/{overlay}")
