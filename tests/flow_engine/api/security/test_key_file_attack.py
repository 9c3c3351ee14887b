"""A key file is edited by hand: comments (indented, too), blank lines, named entries. Nothing
but a real entry may become a key — above all not a comment, which would be an admin key
whose "secret" anyone can read in the file or guess (``#``). An entry the engine cannot use
safely (a secret too short, or with whitespace in it) stops the engine at start with the
line's number, never its text."""

from __future__ import annotations

import pytest
from support.keys import SECRETS

from flow_engine.auth import KeyConfigError, parse_key, parse_keys
from flow_engine.config import ConfigError, Settings

KEY_FILE = f"""\
# engine keys: name:role:secret, one a line
  # indented, the platform team's CLI
platform:admin:{SECRETS['admin']}

\t# rotate quarterly
   #
orders-app:runner:{SECRETS['runner']}
    ambassador:runner+proxy:{SECRETS['proxy']}\t
#
"""
COMMENTS = ["#", "# rotate quarterly", "# engine keys: name:role:secret, one a line",
            "# indented, the platform team's CLI"]


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "engine-keys"
    path.write_text(KEY_FILE, encoding="utf-8")
    return path


def test_a_key_file_holds_its_named_entries_and_nothing_else(key_file):
    keys = Settings.load({"api_key_file": str(key_file)}, environ={}).check_auth()

    assert {(k.name, k.role, k.proxy) for k in keys.keys} == {
        ("platform", "admin", False), ("orders-app", "runner", False),
        ("ambassador", "runner", True)}


@pytest.mark.parametrize("comment", COMMENTS)
def test_a_comment_of_the_key_file_never_authenticates(make_app, key_file, comment):
    client = make_app(api_keys="", api_key_file=str(key_file)).test_client()

    for headers in ({"Authorization": f"Bearer {comment}"}, {"x-api-key": comment}):
        resp = client.get("/api/v1/flows", headers=headers)
        assert resp.status_code == 401, (comment, resp.status_code)
        assert client.delete("/api/v1/flows/any", headers=headers).status_code == 401
    assert client.get("/api/v1/flows",
                      headers={"Authorization": f"Bearer {SECRETS['admin']}"}).status_code == 200


@pytest.mark.parametrize(("line", "fragment"), [
    pytest.param("short7!", "at least 8 characters", id="short-bare-secret"),
    pytest.param("#!", None, id="comment-is-skipped"),
    pytest.param("rotate quarterly", "whitespace", id="bare-secret-with-a-space"),
    pytest.param("ops:admin:two words-secret", "whitespace", id="named-secret-with-a-space"),
    pytest.param("ops:admin:tab\tsecret-1", "whitespace", id="named-secret-with-a-tab"),
    pytest.param("ops:admin:short", "at least 8 characters", id="short-named-secret"),
])
def test_an_unsafe_entry_stops_the_engine_naming_its_line(tmp_path, line, fragment):
    path = tmp_path / "keys"
    path.write_text(f"# keys\n\nplatform:admin:{SECRETS['admin']}\n  {line}\n", encoding="utf-8")
    settings = Settings.load({"api_key_file": str(path)}, environ={})
    if fragment is None:
        assert settings.check_auth().names() == ("platform",)
        return
    with pytest.raises(ConfigError) as info:
        settings.check_auth()
    message = str(info.value)
    assert "FLOW_ENGINE_API_KEY_FILE" in message and "line 4" in message
    assert fragment in message
    secret = line.rsplit(":", 1)[-1]
    assert secret not in message, "a secret is never printed"


@pytest.mark.parametrize("entry", ["#", "short", "# rotate quarterly", "a b c d e f g h"])
def test_an_unsafe_bare_secret_in_the_environment_stops_the_engine(entry):
    settings = Settings.load(environ={"FLOW_ENGINE_API_KEYS": f"ops:admin:{SECRETS['admin']},{entry}"})
    with pytest.raises(ConfigError, match=r"FLOW_ENGINE_API_KEYS \(entry 2\)") as info:
        settings.check_auth()
    assert len(entry) == 1 or entry not in str(info.value), "a secret is never printed"


@pytest.mark.parametrize("entry", ["#", "#######", "# rotate quarterly", "secret 12345"])
def test_parse_key_refuses_what_a_comment_or_a_typo_would_make(entry):
    with pytest.raises(KeyConfigError):
        parse_key(entry)


def test_duplicates_across_the_variable_and_the_file_are_refused(key_file):
    settings = Settings.load({"api_key_file": str(key_file),
                              "api_keys": f"cli:admin:{SECRETS['admin']}"}, environ={})
    with pytest.raises(ConfigError, match="the same secret is configured twice"):
        settings.check_auth()
    with pytest.raises(KeyConfigError, match="configured twice"):
        parse_keys([f"a:runner:{SECRETS['runner']}", f"a:admin:{SECRETS['admin']}"])
