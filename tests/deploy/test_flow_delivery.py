"""The prod overlay's flow-delivery Job, run for real: its ConfigMap laid out as the kubelet
mounts one (``..data`` symlinks), its own arguments and environment, against a real engine
holding the key template's publisher entry. It must publish every flow the first time and
change nothing when Argo CD or Flux re-creates it after a sync that changed something else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
import yaml
from support.procs import ServerProcess, free_port

from flowgate.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN = "delivery-test-admin-0001"
PUBLISHER = "delivery-test-publisher-0002"


def job(docs) -> dict:
    (found,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "flowgate-flows"]
    return found


def mount_like_the_kubelet(config_map: dict, folder: Path) -> None:
    """``folder/<key>`` → ``..data/<key>`` → ``..<timestamp>/<key>``, as a ConfigMap volume."""
    stamped = folder / "..2026_12_02_17_00_00.000000001"
    stamped.mkdir(parents=True)
    for key, text in config_map["data"].items():
        (stamped / key).write_text(text, encoding="utf-8")
        (folder / key).symlink_to(Path("..data") / key)
    (folder / "..data").symlink_to(stamped.name)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ServerProcess:
    workdir = tmp_path_factory.mktemp("delivery-engine")
    port = free_port()
    keys = f"platform-cli:admin:{ADMIN},flowgate-flows:publisher:{PUBLISHER}"
    with ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                       port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=workdir, env={"FLOW_ENGINE_API_KEYS": keys, "REDIS_URL": "",
                                         "DATABASE_URL": f"sqlite:///{workdir / 'e.db'}"}) as proc:
        yield proc


def test_the_delivery_job_publishes_the_overlay_flows_once(render, engine, tmp_path, monkeypatch,
                                                            capsys):
    docs = render("prod")
    spec = job(docs)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == volume["configMap"]["name"]]
    folder = tmp_path / "flows"
    mount_like_the_kubelet(config_map, folder)
    args = [str(folder) if a == mount["mountPath"] else a for a in container["args"]]
    assert str(folder) in args, f"the Job does not apply its mount {mount['mountPath']}: {args}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FLOWGATE_ENGINE_URL"] == "http://flow-engine:8000"
    monkeypatch.setenv("FLOWGATE_ENGINE_URL", engine.url)  # the Service, here
    monkeypatch.setenv("FLOWGATE_API_KEY", PUBLISHER)  # from flowgate-flows-publisher

    assert main(args) == 0, capsys.readouterr()
    first = capsys.readouterr().out
    flow_ids = [yaml.safe_load(text)["id"] for text in config_map["data"].values()]
    assert flow_ids and all(f"flow '{f}' created (version 1, live)" in first for f in flow_ids), first
    for flow_id in flow_ids:
        flow = requests.get(f"{engine.url}/api/v1/flows/{flow_id}",
                            headers={"x-api-key": ADMIN}, timeout=10).json()
        assert (flow["live_version"], flow["latest_version"]) == (1, 1)
        audit = requests.get(f"{engine.url}/api/v1/flows/{flow_id}/audit",
                             headers={"x-api-key": ADMIN}, timeout=10).json()["entries"]
        assert audit[0]["actor"] == "flowgate-flows"

    assert main(args) == 0  # re-created after the next sync: nothing to do
    again = capsys.readouterr().out
    assert again.count("unchanged") == len(flow_ids), again


def test_the_delivery_job_is_recreated_by_gitops_tools_and_never_prunes(render):
    meta = job(render("prod"))["metadata"]
    assert meta["annotations"]["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    assert meta["annotations"]["kustomize.toolkit.fluxcd.io/force"] == "Enabled"
    (container,) = job(render("prod"))["spec"]["template"]["spec"]["containers"]
    assert "--prune" not in container["args"], "deleting flows stays an admin's decision"


@pytest.mark.parametrize(("overlay", "name"), [("prod", "flowgate-flows"), ("dev", "push-demo-flows")])
def test_the_engine_network_policy_admits_the_delivery_pods(render, overlay, name):
    """Without it the Job would hang on connecting until its deadline."""
    docs = render(overlay)
    (found,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == name]
    labels = found["spec"]["template"]["metadata"]["labels"]
    admitted = [peer["podSelector"]["matchLabels"]
                for d in docs if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "flow-engine"
                for rule in d["spec"].get("ingress", []) for peer in rule.get("from", [])
                if "namespaceSelector" not in peer and "podSelector" in peer]
    assert any(all(labels.get(k) == v for k, v in sel.items()) for sel in admitted), \
        f"{overlay}: {name}'s pods {labels} match no engine ingress rule {admitted}"
