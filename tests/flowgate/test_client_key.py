"""Which key `flowgate flows` sends: --api-key, FLOWGATE_API_KEY, a secret taken from the
engine's own FLOW_ENGINE_API_KEYS (name:role:secret entries: the secret only, of the admin
key when there is one), or the admin key `flowgate up` wrote."""

from __future__ import annotations

import argparse

import pytest

from flowgate import client, flows_cli

ENV = ("FLOWGATE_API_KEY", "FLOW_ENGINE_API_KEYS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .flowgate/engine.key unless a test writes one


def test_an_explicit_key_wins(monkeypatch):
    monkeypatch.setenv("FLOWGATE_API_KEY", "from-env-key")
    monkeypatch.setenv("FLOW_ENGINE_API_KEYS", "cli:admin:engine-admin-secret")
    assert client.resolve_key("given-key") == "given-key"
    assert client.resolve_key(None) == "from-env-key"


@pytest.mark.parametrize(("keys", "expected"), [
    # the admin key, wherever it is in the list; never "name:role:" with it
    ("orders-app:runner+proxy:runner-secret-1,cli:admin:admin-secret-1", "admin-secret-1"),
    ("cli:admin:admin-secret-1,ops:admin:admin-secret-2", "admin-secret-1"),
    # no admin: the highest role there is (publishing needs publisher)
    ("orders-app:runner+proxy:runner-secret-1,ci:publisher:publisher-1", "publisher-1"),
    ("a:runner:runner-secret-1", "runner-secret-1"),
    # a bare secret is an admin key (deployments from before roles)
    ("legacy-bare-secret", "legacy-bare-secret"),
    (" , orders-app:runner:runner-secret-1 , legacy-bare-secret ", "legacy-bare-secret"),
    # a secret may itself hold ':'
    ("cli:admin:with:colons:inside", "with:colons:inside"),
])
def test_the_engine_key_list_gives_the_secret_of_its_strongest_key(monkeypatch, keys, expected):
    monkeypatch.setenv("FLOW_ENGINE_API_KEYS", keys)
    assert client.resolve_key(None) == expected


def test_the_key_flowgate_up_wrote_is_the_last_resort(tmp_path):
    assert client.resolve_key(None) is None
    (tmp_path / ".flowgate").mkdir()
    (tmp_path / ".flowgate" / "engine.key").write_text("up-admin-secret\n", encoding="utf-8")
    assert client.resolve_key(None) == "up-admin-secret"


def test_a_malformed_engine_key_list_is_a_usage_error_that_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setenv("FLOW_ENGINE_API_KEYS", "cli:admin:tiny7")
    parser = argparse.ArgumentParser()
    flows_cli.add_commands(parser)
    args = parser.parse_args(["list"])
    with pytest.raises(SystemExit) as exit_info:
        flows_cli._client(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "FLOW_ENGINE_API_KEYS" in err and "at least 8 characters" in err
    assert "--api-key" in err and "tiny7" not in err, "a secret is never printed"
