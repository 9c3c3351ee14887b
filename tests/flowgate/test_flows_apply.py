"""``flowgate flows apply|export|publish`` and ``flowgate components`` against a real engine
(``flowgate engine`` under gunicorn, SQLite): GitOps delivery must be idempotent — applying
the same directory twice changes nothing — and ``--dry-run`` must tell CI whether it would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import requests
from support.procs import ServerProcess, free_port

from flowgate.cli import main

pytestmark = pytest.mark.integration

ADMIN, PUBLISHER = "admin-secret-0001", "publisher-secret-0002"
KEYS = f"ops:admin:{ADMIN},ci:publisher:{PUBLISHER}"


def echo_flow(flow_id: str, text: str = "Q: {question}") -> dict:
    return {"id": flow_id, "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "p", "type": "PromptTemplate", "params": {"template": text}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}]}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ServerProcess:
    workdir = tmp_path_factory.mktemp("engine")
    port = free_port()
    with ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                       port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=workdir, env={"FLOW_ENGINE_API_KEYS": KEYS, "REDIS_URL": "",
                                         "DATABASE_URL": f"sqlite:///{workdir / 'e.db'}"}) as proc:
        yield proc


@pytest.fixture
def cli(engine, monkeypatch, capsys):
    """``cli(*args, key=ADMIN)`` → (exit code, stdout, stderr) of ``flowgate ...``."""
    for name in ("FLOWGATE_API_KEY", "FLOW_ENGINE_API_KEYS", "FLOWGATE_ENGINE_URL"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, key: str = ADMIN) -> tuple[int, str, str]:
        capsys.readouterr()
        command, rest = args[0], list(args[1:])
        prefix = [command, "--engine-url", engine.url, "--api-key", key]
        code = main(prefix + rest)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def flows_dir(tmp_path, request) -> Path:
    """Two flow files with ids unique to this test."""
    folder = tmp_path / "flows"
    folder.mkdir()
    prefix = request.node.name.replace("_", "-")[5:40]
    for name in ("a", "b"):
        (folder / f"{name}.json").write_text(json.dumps(echo_flow(f"{prefix}-{name}")))
    return folder


def engine_flow(engine, flow_id: str) -> dict:
    return requests.get(f"{engine.url}/api/v1/flows/{flow_id}",
                        headers={"x-api-key": ADMIN}, timeout=10).json()


def ids(folder: Path) -> list[str]:
    return [json.loads(p.read_text())["id"] for p in sorted(folder.glob("*.json"))]


def test_applying_a_directory_twice_changes_nothing_the_second_time(cli, engine, flows_dir):
    code, out, _ = cli("flows", "apply", str(flows_dir))
    assert code == 0 and out.count("created (version 1, live)") == 2, out

    code, out, _ = cli("flows", "apply", str(flows_dir), "--publish")
    assert code == 0 and out.count("unchanged") == 2, out
    for flow_id in ids(flows_dir):
        assert engine_flow(engine, flow_id)["latest_version"] == 1  # no new, identical version


def test_a_changed_file_becomes_a_version_published_only_when_asked(cli, engine, flows_dir):
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    path = flows_dir / "a.json"
    flow_id = json.loads(path.read_text())["id"]
    path.write_text(json.dumps(echo_flow(flow_id, "Changed: {question}")))

    code, out, _ = cli("flows", "apply", str(flows_dir))
    assert code == 0 and "version 2 added (not live" in out
    assert (engine_flow(engine, flow_id)["live_version"], engine_flow(engine, flow_id)[
        "latest_version"]) == (1, 2)

    code, out, _ = cli("flows", "apply", str(path), "--publish")
    assert code == 0 and "version 2 published" in out  # the same definition: no version 3
    assert (engine_flow(engine, flow_id)["live_version"], engine_flow(engine, flow_id)[
        "latest_version"]) == (2, 2)


def test_a_rolled_back_version_is_held_not_republished_by_a_rerun(cli, engine, flows_dir):
    """A delivery job run again (a retry, a GitOps re-sync) must not undo an incident's
    rollback: the file still equals version 2, which was taken off live, so it stays off
    until the file changes."""
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    path = flows_dir / "a.json"
    flow_id = json.loads(path.read_text())["id"]
    path.write_text(json.dumps(echo_flow(flow_id, "Bad: {question}")))
    assert cli("flows", "apply", str(path), "--publish")[0] == 0
    code, out, err = cli("flows", "rollback", flow_id, "-m", "answers went wrong", key=PUBLISHER)
    assert code == 0, out + err
    assert engine_flow(engine, flow_id)["live_version"] == 1

    code, out, _ = cli("flows", "apply", str(flows_dir), "--publish", key=PUBLISHER)
    assert code == 0, out
    assert f"flow '{flow_id}' version 2 held, not published: rollback by ci" in out
    assert "answers went wrong" in out
    assert engine_flow(engine, flow_id)["live_version"] == 1
    assert cli("flows", "apply", str(flows_dir), "--publish", "--dry-run")[0] == 0  # in sync

    path.write_text(json.dumps(echo_flow(flow_id, "Fixed: {question}")))  # a new commit
    code, out, _ = cli("flows", "apply", str(path), "--publish", key=PUBLISHER)
    assert code == 0 and "version 3 added and published" in out, out
    assert engine_flow(engine, flow_id)["live_version"] == 3


def test_applied_from_git_each_version_names_its_commit(cli, engine, flows_dir):
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(flows_dir), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=ci", "-c", "user.email=ci@example.com", "add", ".")
    git("-c", "user.name=ci", "-c", "user.email=ci@example.com", "commit", "-qm", "Add the flows")
    sha = git("rev-parse", "--short", "HEAD")
    assert cli("flows", "apply", str(flows_dir), "--publish")[0] == 0
    for flow_id in ids(flows_dir):
        entries = requests.get(f"{engine.url}/api/v1/flows/{flow_id}/audit",
                               headers={"x-api-key": ADMIN}, timeout=10).json()["entries"]
        assert entries[0]["message"] == f"{sha} Add the flows", entries[0]
    # --message wins over the commit
    path = flows_dir / "a.json"
    path.write_text(json.dumps(echo_flow(ids(flows_dir)[0], "Other: {question}")))
    assert cli("flows", "apply", str(path), "-m", "hotfix OPS-7")[0] == 0
    entries = requests.get(f"{engine.url}/api/v1/flows/{ids(flows_dir)[0]}/audit",
                           headers={"x-api-key": ADMIN}, timeout=10).json()["entries"]
    assert entries[0]["message"] == "hotfix OPS-7"


def _entry(seq, action, *, frm=None, to=None, routing=None, actor="ops", reason=None):
    return {"seq": seq, "action": action, "from_version": frm, "to_version": to,
            "routing": routing, "actor": actor, "reason": reason, "message": None}


@pytest.mark.parametrize(("entries", "held"), [
    pytest.param([_entry(3, "new_version", frm=1, to=2)], None, id="created, never live"),
    pytest.param([_entry(5, "canary_aborted", frm=1, to=1, actor="engine",
                         reason="failure ratio 0.4 > 0.05"),
                  _entry(4, "routing", frm=1, to=2, routing={"canary": {"version": 2}}),
                  _entry(3, "new_version", frm=1, to=2)], "canary_aborted by engine (audit #5)",
                 id="its canary aborted"),
    pytest.param([_entry(6, "canary_aborted", frm=1, to=1, actor="engine"),
                  _entry(5, "routing", frm=1, to=3, routing={"canary": {"version": 3}}),
                  _entry(4, "routing", frm=1, to=2, routing={"canary": {"version": 2}})], None,
                 id="another version's canary aborted"),
    pytest.param([_entry(7, "auto_rollback", frm=2, to=1, actor="engine", reason="p95 3 s"),
                  _entry(6, "publish", frm=1, to=2)], "auto_rollback by engine (audit #7): p95 3 s",
                 id="rolled back by the engine"),
    pytest.param([_entry(8, "rollback", frm=3, to=2), _entry(7, "publish", frm=2, to=3)], None,
                 id="a later version rolled back to it"),
    pytest.param([_entry(9, "new_version", frm=1, to=2), _entry(2, "rollback", frm=2, to=1)],
                 None, id="an older flow of the same id"),
])
def test_taken_off_live_reads_the_audit_log(entries, held):
    from flowgate.apply import taken_off_live

    why = taken_off_live(entries, 2)
    assert (why is None) if held is None else why.startswith(held), why


def test_dry_run_shows_the_diff_exits_4_and_changes_nothing(cli, engine, flows_dir):
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    assert cli("flows", "apply", str(flows_dir), "--dry-run")[0] == 0  # in sync
    path = flows_dir / "b.json"
    flow_id = json.loads(path.read_text())["id"]
    path.write_text(json.dumps(echo_flow(flow_id, "New: {question}")))

    code, out, _ = cli("flows", "apply", str(flows_dir), "--dry-run")

    assert code == 4
    assert f"flow '{flow_id}' would get a new version" in out
    assert '-        "template": "Q: {question}"' in out and '+        "template": "New: {question}"' in out
    assert engine_flow(engine, flow_id)["latest_version"] == 1


def test_one_invalid_file_and_nothing_is_applied(cli, engine, flows_dir):
    (flows_dir / "broken.json").write_text(json.dumps({"id": "broken-x", "nodes": []}))

    code, _, err = cli("flows", "apply", str(flows_dir))

    assert code == 1
    assert "broken.json: invalid" in err and "$.nodes" in err
    for flow_id in ids(flows_dir):
        if flow_id != "broken-x":
            assert requests.get(f"{engine.url}/api/v1/flows/{flow_id}", timeout=10,
                                headers={"x-api-key": ADMIN}).status_code == 404


def kb_flow(flow_id: str, knowledge_id: str) -> dict:
    """A flow valid offline whose knowledge base only the engine can know is missing."""
    return {"id": flow_id, "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "kb", "type": "KnowledgeRetriever", "params": {"knowledge_id": knowledge_id}},
        {"id": "p", "type": "PromptTemplate", "params": {"template": "{context} {question}"}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "kb", "target_input": "query"},
                  {"source": "in", "target": "p", "target_input": "question"},
                  {"source": "kb", "target": "p", "target_input": "context"},
                  {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}]}


def test_a_file_the_engine_refuses_fails_the_dry_run_and_nothing_is_applied(cli, engine,
                                                                           flows_dir):
    """Valid offline, refused by the engine (no such knowledge base): CI's dry run must fail
    as the real apply would, and the real apply must not stop halfway (a and b sort first)."""
    prefix = ids(flows_dir)[0][:-2]
    (flows_dir / "c.json").write_text(json.dumps(kb_flow(f"{prefix}-c", "no-such-kb")))
    assert cli("flows", "validate", str(flows_dir / "c.json"))[0] == 0  # offline: fine

    for extra in (["--dry-run"], [], ["--publish"]):
        code, out, err = cli("flows", "apply", str(flows_dir), *extra)

        assert code == 1, (extra, out, err)
        assert "would be created" not in out and "created" not in out, out
        assert f"{flows_dir / 'c.json'}: refused by the engine (1 problem)" in err, err
        assert "$.nodes[1].params.knowledge_id: no knowledge base" in err, err
        assert "a.json" not in err and "b.json" not in err, err
        for flow_id in ids(flows_dir):
            assert requests.get(f"{engine.url}/api/v1/flows/{flow_id}", timeout=10,
                                headers={"x-api-key": ADMIN}).status_code == 404


def test_engine_url_and_key_may_follow_the_command(engine, flows_dir, monkeypatch, capsys):
    for name in ("FLOWGATE_API_KEY", "FLOW_ENGINE_API_KEYS", "FLOWGATE_ENGINE_URL"):
        monkeypatch.delenv(name, raising=False)

    code = main(["flows", "apply", str(flows_dir), "--dry-run", "--engine-url", engine.url,
                 "--api-key", ADMIN])
    assert code == 4, capsys.readouterr()
    # before the command it still works, and a value after the command wins
    code = main(["flows", "--engine-url", "http://127.0.0.1:9", "--api-key", ADMIN, "list",
                 "--engine-url", engine.url])
    assert code == 0, capsys.readouterr()
    assert main(["flows", "--engine-url", "http://127.0.0.1:9", "--api-key", ADMIN,
                 "list"]) == 3


@pytest.mark.parametrize(("command", "codes"), [
    (["flows", "apply"], ["0  done", "1  a file is invalid", "2  usage", "3  the engine is "
                          "unreachable", "4  --dry-run: something would change"]),
    (["flows", "publish"], ["1  the engine refused", "3  the engine is unreachable"]),
    (["flows", "history"], ["1  the engine refused", "3  the engine is unreachable"]),
    (["flows", "validate"], ["1  a file is invalid", "2  an unreadable"]),
])
def test_help_lists_the_exit_codes(command, codes, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for line in codes:
        assert f"  {line}" in out, out


def test_two_files_for_one_flow_is_a_usage_error(cli, flows_dir):
    (flows_dir / "c.json").write_text((flows_dir / "a.json").read_text())

    code, _, err = cli("flows", "apply", str(flows_dir))

    assert code == 2 and "both define flow" in err


def test_prune_needs_confirmation_and_the_admin_role(cli, engine, flows_dir, tmp_path):
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    only_a = tmp_path / "only-a"
    only_a.mkdir()
    (only_a / "a.json").write_text((flows_dir / "a.json").read_text())
    a_id, b_id = ids(flows_dir)

    assert cli("flows", "apply", str(only_a), "--prune")[0] == 2
    code, out, _ = cli("flows", "apply", str(only_a), "--prune", "--dry-run")
    assert code == 4 and f"flow '{b_id}' would be deleted" in out
    code, _, err = cli("flows", "apply", str(only_a), "--prune", "--yes", key=PUBLISHER)
    assert code == 1 and "403 forbidden" in err
    assert engine_flow(engine, b_id)["id"] == b_id

    code, out, _ = cli("flows", "apply", str(only_a), "--prune", "--yes")
    assert code == 0 and f"flow '{b_id}' deleted" in out
    assert requests.get(f"{engine.url}/api/v1/flows/{b_id}", headers={"x-api-key": ADMIN},
                        timeout=10).status_code == 404
    assert engine_flow(engine, a_id)["id"] == a_id


def test_export_round_trips_with_apply(cli, flows_dir, tmp_path):
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    out_dir = tmp_path / "exported"

    assert cli("flows", "export", str(out_dir))[0] == 0

    code, out, _ = cli("flows", "apply", str(out_dir), "--dry-run")
    assert code == 0, out  # every exported flow is what the engine holds


def test_publish_without_a_version_publishes_the_latest(cli, engine, flows_dir):
    assert cli("flows", "apply", str(flows_dir))[0] == 0
    path = flows_dir / "a.json"
    flow_id = json.loads(path.read_text())["id"]
    path.write_text(json.dumps(echo_flow(flow_id, "V2 {question}")))
    assert cli("flows", "apply", str(path))[0] == 0

    code, out, _ = cli("flows", "publish", flow_id, key=PUBLISHER)

    assert code == 0 and "now serves version 2" in out


def test_the_engine_refusing_a_flow_prints_each_problem_once(cli, tmp_path):
    bad = echo_flow("bad-one")
    bad["nodes"][2]["params"]["temperature"] = 9
    bad["nodes"][1]["params"]["template"] = "{x.y}"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))

    code, _, err = cli("flows", "push", str(path))

    assert code == 1
    assert "3 problems" in err
    for fragment in ("$.nodes[2].params.temperature", "$.nodes[1].params.template"):
        assert err.count(fragment) == 1, err


def test_components_from_the_engine_match_the_offline_registry(cli):
    code, from_engine, _ = cli("components")
    assert code == 0 and "ChatModel" in from_engine
    offline = cli("components", "--offline")[1]
    assert from_engine == offline

    code, out, _ = cli("components", "ChatModel")
    assert code == 0 and "provider: one of openai, echo" in out and "outputs: message" in out

    code, _, err = cli("components", "Chatmodel")
    assert code == 1 and "did you mean 'ChatModel'" in err


# -- history and diff ------------------------------------------------------------------------


def test_history_shows_who_changed_what_and_why_and_diff_shows_the_change(cli, tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(echo_flow("hist-flow")))
    assert cli("flows", "push", str(path), "-m", "first cut")[0] == 0
    path.write_text(json.dumps(echo_flow("hist-flow", "Answer briefly: {question}")))
    assert cli("flows", "push", str(path), "--publish", "-m", "déploiement: shorter answers",
               key=PUBLISHER)[0] == 0
    assert cli("flows", "rollback", "hist-flow", "--message", "too short")[0] == 0

    code, out, _ = cli("flows", "history", "hist-flow")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[4] for line in lines] == ["rollback", "publish", "new_version", "create"]
    assert "ops" in lines[0] and '"too short"' in lines[0] and "v2 → v1" in lines[0]
    assert "ci" in lines[1] and '"déploiement: shorter answers"' in lines[1]
    assert '"first cut"' in lines[3]

    code, out, _ = cli("flows", "diff", "hist-flow", "1", "2")
    assert code == 0
    assert out.splitlines() == [
        "flow 'hist-flow' v1 → v2",
        "~ node p",
        '    template: "Q: {question}" → "Answer briefly: {question}"']
    code, out, _ = cli("flows", "history", "hist-flow", "--json", "--limit", "1")
    assert code == 0 and [e["action"] for e in json.loads(out)["entries"]] == ["rollback"]


def test_history_and_diff_of_what_does_not_exist_exit_1(cli):
    code, _, err = cli("flows", "history", "no-such-flow")
    assert code == 1 and "404" in err
    assert cli("flows", "diff", "no-such-flow", "1", "2")[0] == 1
