"""`flowgate up` gives each process the least key it needs: an admin key for the CLI (in a
file only its owner can ever read) and a runner+proxy key that only the ambassador gets.
The keys are parsed here exactly as the engine parses them (flow_engine.auth)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flow_engine.auth import parse_keys
from flowgate import stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_engine_gets_an_admin_key_for_the_cli_and_a_runner_proxy_key_for_the_ambassador():
    keys = stack.StackKeys.generate()
    cli, sidecar = parse_keys(keys.engine_keys().split(","))
    assert (cli.name, cli.role, cli.proxy, cli.secret.decode()) == ("cli", "admin", False, keys.admin)
    assert (sidecar.name, sidecar.role, sidecar.proxy, sidecar.secret.decode()) == (
        "ambassador", "runner", True, keys.ambassador)
    assert len(keys.admin) >= 32 and len(keys.ambassador) >= 32
    assert stack.StackKeys.generate().admin != keys.admin, "every `up` makes fresh keys"


def test_keys_never_show_their_secrets():
    keys = stack.StackKeys.generate()
    for shown in (repr(keys), str(keys)):
        assert keys.admin not in shown and keys.ambassador not in shown
        assert "admin" in shown and "runner+proxy" in shown


def test_the_key_file_is_0600_from_its_first_byte(tmp_path, monkeypatch):
    """Every write lands in a file that is already 0600, whatever the umask: never written
    first and chmod-ed after."""
    target = tmp_path / "engine.key"
    seen_modes = []
    real_write = os.write

    def checking_write(fd: int, data: bytes) -> int:
        seen_modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", checking_write)
    old_umask = os.umask(0)  # the most permissive umask: 0600 must not come from it
    try:
        stack.write_private(target, "s3cret-admin\n")
    finally:
        os.umask(old_umask)
    assert seen_modes and set(seen_modes) == {0o600}
    assert mode(target) == 0o600
    assert target.read_text(encoding="utf-8") == "s3cret-admin\n"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.key"], "no temporary file left behind"


def test_an_existing_world_readable_key_file_is_replaced_by_a_private_one(tmp_path):
    target = tmp_path / "engine.key"
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o644)
    with open(target, encoding="utf-8") as earlier_reader:  # opened while it was 0644
        stack.write_private(target, "new-secret\n")
        assert earlier_reader.read() == "old\n", "a reader of the old file never sees the new secret"
    assert mode(target) == 0o600
    assert target.read_text(encoding="utf-8") == "new-secret\n"


def test_a_symlink_at_the_key_path_is_replaced_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched\n", encoding="utf-8")
    target = tmp_path / "engine.key"
    target.symlink_to(elsewhere)
    stack.write_private(target, "secret\n")
    assert not target.is_symlink() and mode(target) == 0o600
    assert elsewhere.read_text(encoding="utf-8") == "untouched\n"


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def broken_write(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", broken_write)
    with pytest.raises(OSError):
        stack.write_private(tmp_path / "engine.key", "secret\n")
    assert list(tmp_path.iterdir()) == []


def test_only_the_engine_inherits_engine_secrets_from_the_shell(monkeypatch):
    """A shell with keys exported (docs/design.md "The engine service":
    `export FLOW_ENGINE_API_KEYS=...`) must not hand them to the ambassador or the simulator;
    the ambassador gets its runner key only."""
    keys = stack.StackKeys.generate()
    monkeypatch.setenv("FLOW_ENGINE_API_KEYS", "dev-key-from-the-shell")
    monkeypatch.setenv("FLOW_ENGINE_API_KEY_FILE", "/somewhere/keys")
    monkeypatch.setenv("FLOWGATE_API_KEY", "another-shell-key")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/shared")
    monkeypatch.setenv("SOME_OTHER_SETTING", "kept")

    ambassador = stack.service_env("ambassador", {"AMBASSADOR_UPSTREAM_KEY": keys.ambassador})
    for name in stack.ENGINE_ONLY_ENV:
        assert name not in ambassador
    assert keys.admin not in "\n".join(ambassador.values())
    assert ambassador["AMBASSADOR_UPSTREAM_KEY"] == keys.ambassador
    assert ambassador["SOME_OTHER_SETTING"] == "kept"
    assert ambassador["PROMETHEUS_MULTIPROC_DIR"] == ""
    assert "OPENAI_API_KEY" not in stack.service_env("llm-sim", {})

    engine = stack.service_env("engine", {"FLOW_ENGINE_API_KEYS": keys.engine_keys(),
                                          "FLOW_ENGINE_API_KEY_FILE": ""})
    assert engine["FLOW_ENGINE_API_KEYS"] == keys.engine_keys()
    assert engine["FLOW_ENGINE_API_KEY_FILE"] == ""
    assert engine["OPENAI_API_KEY"] == "sk-provider", "the engine is the one that calls the provider"


def test_a_service_that_refuses_to_start_says_why(tmp_path, monkeypatch):
    """`flowgate up` shows the last line the service wrote (e.g. the engine's refusal of an
    unsafe OPENAI_BASE_URL), not only its exit code."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    stack.STATE.mkdir()
    (stack.STATE / "engine.log").write_text("starting\nflowgate engine: OPENAI_BASE_URL is plain http\n",
                                            encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait(30)
    with pytest.raises(RuntimeError) as refused:
        stack._wait_ready("engine", "http://127.0.0.1:9/readyz", proc, timeout_s=30)
    message = str(refused.value)
    assert "exited with 2" in message and "OPENAI_BASE_URL is plain http" in message
    assert ".flowgate/engine.log" in message
