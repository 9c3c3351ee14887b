"""ambassador.config: YAML + env + dotted overrides, validation messages that name the bad key,
and ConfigHolder's hot reload (fake clock, explicit mtimes)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from ambassador import config as config_module
from ambassador.config import ConfigError, ConfigHolder, Settings, load

FULL = """
upstream:
  url: http://flow-engine:8000/
  key: from-yaml
  timeouts: {connect_s: 2, per_try_s: 30, total_s: 90}
inbound_auth:
  mode: api_keys
  api_keys:
    - {key: "app-secret-1", identity: orders-app, tenant: shop, flows: [faq-rag]}
filters: [trace, auth, cache, breaker, retry, timeout]
retry: {max_attempts: 4, budget_ratio: 0.1}
breaker: {consecutive_failures: 7, open_s: 20}
flows:
  faq-rag: {cache: {ttl_s: 300, stale_if_error_s: 3600}}
"""


def write(path: Path, text: str, mtime: float | None = None) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture(autouse=True)
def _no_ambassador_env(monkeypatch) -> None:
    """ConfigHolder reloads with load(path), which reads os.environ: keep it neutral."""
    for name in ("AMBASSADOR_CONFIG", "AMBASSADOR_UPSTREAM_URL", "AMBASSADOR_UPSTREAM_KEY",
                 "AMBASSADOR_LOG_LEVEL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    return write(tmp_path / "ambassador.yaml", FULL, mtime=1_000_000)


# -- loading ----------------------------------------------------------------------------------

def test_load_reads_every_section_of_the_yaml(cfg_file: Path) -> None:
    s = load(cfg_file, environ={})
    assert s.upstream.url == "http://flow-engine:8000"  # trailing slash dropped
    assert s.upstream.key == "from-yaml"
    assert (s.upstream.timeouts.connect_s, s.upstream.timeouts.per_try_s,
            s.upstream.timeouts.total_s) == (2, 30, 90)
    assert s.inbound_auth.mode == "api_keys"
    key = s.inbound_auth.api_keys[0]
    assert (key.key, key.identity, key.tenant, key.flows) == ("app-secret-1", "orders-app", "shop",
                                                              ["faq-rag"])
    assert s.filters == ["trace", "auth", "cache", "breaker", "retry", "timeout"]
    assert (s.retry.max_attempts, s.retry.budget_ratio) == (4, 0.1)
    assert (s.breaker.consecutive_failures, s.breaker.open_s) == (7, 20)
    assert s.flows["faq-rag"].cache.ttl_s == 300
    assert s.flows["faq-rag"].cache.stale_if_error_s == 3600


def test_no_file_and_no_env_gives_the_defaults() -> None:
    assert load(None, environ={}) == Settings()


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty-file"),
    pytest.param("# only a comment\n", id="only-comments"),
])
def test_an_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert load(write(tmp_path / "a.yaml", text), environ={}) == Settings()


def test_config_path_comes_from_AMBASSADOR_CONFIG(cfg_file: Path) -> None:
    s = load(environ={"AMBASSADOR_CONFIG": str(cfg_file)})
    assert s.upstream.key == "from-yaml"


def test_env_overrides_the_yaml(cfg_file: Path) -> None:
    env = {"AMBASSADOR_UPSTREAM_URL": "http://10.0.0.7:9000/",
           "AMBASSADOR_UPSTREAM_KEY": "from-env",
           "REDIS_URL": "redis://redis:6379/1"}
    s = load(cfg_file, environ=env)
    assert s.upstream.url == "http://10.0.0.7:9000"
    assert s.upstream.key == "from-env"
    assert s.upstream_key() == "from-env"
    assert s.redis_url == "redis://redis:6379/1"
    assert s.upstream.timeouts.total_s == 90  # the rest of the section is kept


def test_env_overrides_apply_without_a_file() -> None:
    s = load(None, environ={"AMBASSADOR_UPSTREAM_URL": "http://engine:8000",
                            "AMBASSADOR_UPSTREAM_KEY": "k"})
    assert (s.upstream.url, s.upstream.key) == ("http://engine:8000", "k")


def test_dotted_overrides_beat_env_and_yaml(cfg_file: Path) -> None:
    s = load(cfg_file, environ={"AMBASSADOR_UPSTREAM_URL": "http://env:1"},
             overrides={"upstream.url": "http://override:2", "retry.max_attempts": 2,
                        "breaker.open_s": 5, "flows.other.cache.ttl_s": 9})
    assert s.upstream.url == "http://override:2"
    assert s.retry.max_attempts == 2
    assert s.retry.budget_ratio == 0.1  # sibling keys from the YAML are kept
    assert s.breaker.open_s == 5
    assert s.flows["other"].cache.ttl_s == 9
    assert s.flows["faq-rag"].cache.ttl_s == 300


def test_upstream_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  svc-key-from-file\n")
    s = load(None, environ={}, overrides={"upstream.key_file": str(key_file)})
    assert s.upstream_key() == "svc-key-from-file"


# -- validation: every error names the bad key ------------------------------------------------

@pytest.mark.parametrize(("yaml_text", "key", "words"), [
    pytest.param("bogus: 1", "bogus", "unknown key", id="unknown-top-level-key"),
    pytest.param("upstream: {urll: http://x}", "upstream.urll", "unknown key", id="unknown-nested-key"),
    pytest.param("flows: {faq: {cach: {ttl_s: 1}}}", "flows.faq.cach", "unknown key",
                 id="unknown-key-in-a-flow-policy"),
    pytest.param("retry: {max_attempts: many}", "retry.max_attempts", "integer", id="bad-type-int"),
    pytest.param("breaker: {open_s: soon}", "breaker.open_s", "number", id="bad-type-float"),
    pytest.param("filters: trace", "filters", "list", id="bad-type-list"),
    pytest.param("retry: {max_attempts: 0}", "retry.max_attempts", "greater than", id="out-of-range"),
    pytest.param("upstream: {url: ftp://engine}", "upstream.url", "http://", id="bad-url-scheme"),
    pytest.param("upstream: {timeouts: {per_try_s: 200, total_s: 100}}", "upstream.timeouts",
                 "per_try_s", id="per-try-over-total"),
    pytest.param("inbound_auth: {mode: api_keys}", "inbound_auth", "api_keys",
                 id="api-keys-mode-without-keys"),
    pytest.param("inbound_auth: {mode: basic}", "inbound_auth.mode", "jwt", id="unknown-auth-mode"),
    pytest.param("inbound_auth: {mode: api_keys, api_keys: [{key: short, identity: a}]}",
                 "inbound_auth.api_keys.0.key", "8", id="api-key-too-short"),
    pytest.param("inbound_auth: {mode: jwt}", "inbound_auth", "jwt", id="jwt-mode-without-section"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {algorithm: HS256, audience: a}}",
                 "inbound_auth.jwt", "secret", id="jwt-hs256-without-secret"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {algorithm: RS256, secret: s, audience: a}}",
                 "inbound_auth.jwt", "public_key_file", id="jwt-rs256-without-key"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {secret: s}}", "inbound_auth.jwt.audience",
                 "any other service", id="jwt-without-audience"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {secret: s, audience: ''}}",
                 "inbound_auth.jwt.audience", "required", id="jwt-empty-audience"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {secret: s, audience: a, missing_flows_claim: any}}",
                 "inbound_auth.jwt.missing_flows_claim", "'none' or 'all'",
                 id="jwt-missing-flows-claim-unknown"),
    pytest.param("inbound_auth: {mode: api_keys, api_keys: [{key: 12345678, identity: 'a b'}]}",
                 "inbound_auth.api_keys.0.identity", "pattern", id="api-key-identity-with-a-space"),
    pytest.param("inbound_auth: {mode: api_keys, api_keys: [{key: 12345678, identity: a, "
                 "tenant: \"s\\u00e9\"}]}", "inbound_auth.api_keys.0.tenant", "pattern",
                 id="api-key-tenant-not-ascii"),
    pytest.param("websocket: {allowed_origins: ['https://app.example.com/path']}",
                 "websocket.allowed_origins", "not an origin", id="origin-with-a-path"),
    pytest.param("websocket: {allowed_origins: ['app.example.com']}",
                 "websocket.allowed_origins", "not an origin", id="origin-without-a-scheme"),
    pytest.param("websocket: {allowed_origin: []}", "websocket.allowed_origin", "unknown key",
                 id="websocket-unknown-key"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {algorithm: none, secret: s}}",
                 "inbound_auth.jwt.algorithm", "HS256", id="jwt-alg-none"),
    pytest.param("filters: [trace, gzip]", "filters", "gzip", id="unknown-filter"),
    pytest.param("filters: [trace, retry, trace]", "filters", "twice", id="duplicate-filter"),
    pytest.param("flows: {faq: {cache: {}}}", "flows.faq.cache.ttl_s", "required",
                 id="flow-cache-without-ttl"),
    pytest.param("ratelimit: {requests_per_s: 0, burst: 1}", "ratelimit.requests_per_s",
                 "greater than", id="ratelimit-zero-rate"),
])
def test_validation_errors_name_the_bad_key(tmp_path: Path, yaml_text: str, key: str,
                                            words: str) -> None:
    path = write(tmp_path / "bad.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    message = str(info.value)
    assert f"  {key}: " in message, message
    assert words.lower() in message.lower(), message
    assert str(path) in message  # says which file


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "retry: {max_attempts: 0}\nbreaker: {open_s: -1}\nnope: 1\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    message = str(info.value)
    for key in ("retry.max_attempts", "breaker.open_s", "nope"):
        assert f"  {key}: " in message, message


@pytest.mark.parametrize(("environ", "overrides", "key"), [
    pytest.param({"AMBASSADOR_UPSTREAM_URL": "engine:8000"}, {}, "upstream.url", id="env-url"),
    pytest.param({}, {"retry.max_attempts": "lots"}, "retry.max_attempts", id="dotted-bad-type"),
    pytest.param({}, {"retry.maxattempts": 2}, "retry.maxattempts", id="dotted-unknown-key"),
])
def test_bad_env_or_override_values_name_the_key(environ, overrides, key) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
        load(None, environ=environ, overrides=overrides)


@pytest.mark.parametrize(("text", "words"), [
    pytest.param("upstream: {url: [unclosed\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("upstream:\n  url: a\n   bad-indent: b\n", "not valid YAML", id="bad-indentation"),
    pytest.param("- a\n- b\n", "mapping", id="top-level-list"),
    pytest.param("just a string\n", "mapping", id="top-level-scalar"),
])
def test_unreadable_yaml_is_a_config_error(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=words) as info:
        load(path, environ={})
    assert str(path) in str(info.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load(path, environ={})
    assert str(path) in str(info.value)


def test_env_override_into_an_empty_yaml_section(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "upstream:\n  # url: commented out\n")
    s = load(path, environ={"AMBASSADOR_UPSTREAM_URL": "http://engine:8000"})
    assert s.upstream.url == "http://engine:8000"


def test_override_below_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "upstream: http://engine:8000\n")
    with pytest.raises(ConfigError, match="upstream"):
        load(path, environ={"AMBASSADOR_UPSTREAM_URL": "http://engine:8000"})


# -- ConfigHolder: hot reload -----------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.changes: list[Settings] = []
        self.errors: list[str] = []


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def holder(cfg_file: Path, clock, rec: Recorder) -> ConfigHolder:
    return ConfigHolder(load(cfg_file, environ={}), str(cfg_file), check_every_s=2.0,
                        on_change=rec.changes.append, on_reload_error=rec.errors.append, clock=clock)


def edit(path: Path, text: str, mtime: float = 2_000_000) -> None:
    write(path, text, mtime=mtime)


def test_reloads_when_the_file_changes(holder, cfg_file, clock, rec) -> None:
    edit(cfg_file, FULL.replace("max_attempts: 4", "max_attempts: 6"))
    clock.advance(2.0)
    assert holder.maybe_reload() is True
    assert holder.settings.retry.max_attempts == 6
    assert rec.changes == [holder.settings]  # on_change rebuilds with the fresh settings
    assert holder.last_error is None and rec.errors == []


def test_unchanged_file_is_not_reloaded(holder, clock, rec) -> None:
    before = holder.settings
    for _ in range(3):
        clock.advance(5)
        assert holder.maybe_reload() is False
    assert holder.settings is before and rec.changes == []


def test_checks_at_most_every_check_every_s(holder, cfg_file, clock, rec, monkeypatch) -> None:
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path) == str(cfg_file):
            stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(config_module.os, "stat", counting_stat)
    for _ in range(10):  # 10 requests within the first interval: no stat at all
        clock.advance(0.19)
        assert holder.maybe_reload() is False
    assert stats == []
    clock.advance(0.1)  # 2.0 s since construction
    assert holder.maybe_reload() is False
    assert len(stats) == 1
    edit(cfg_file, FULL.replace("open_s: 20", "open_s: 30"))
    clock.advance(1.9)  # changed, but the next check is not due yet
    assert holder.maybe_reload() is False
    assert holder.settings.breaker.open_s == 20 and len(stats) == 1
    clock.advance(0.1)
    assert holder.maybe_reload() is True
    assert holder.settings.breaker.open_s == 30 and len(stats) == 2
    assert len(rec.changes) == 1


@pytest.mark.parametrize(("bad_text", "words"), [
    pytest.param("retry: {max_attempts: 0}\n", "retry.max_attempts", id="invalid-value"),
    pytest.param("retry: {max_attempts: [\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("filters: [trace, trace]\n", "filters", id="duplicate-filter"),
])
def test_invalid_new_file_keeps_the_last_good_config(holder, cfg_file, clock, rec, bad_text,
                                                     words) -> None:
    good = holder.settings
    edit(cfg_file, bad_text)
    clock.advance(2.0)
    assert holder.maybe_reload() is False
    assert holder.settings is good
    assert rec.changes == []
    assert len(rec.errors) == 1 and words in rec.errors[0]
    assert holder.last_error is not None and words in holder.last_error
    # the same bad file is not reported again on every check
    clock.advance(2.0)
    assert holder.maybe_reload() is False and len(rec.errors) == 1
    # fixing the file recovers and clears the error
    edit(cfg_file, FULL.replace("max_attempts: 4", "max_attempts: 5"), mtime=3_000_000)
    clock.advance(2.0)
    assert holder.maybe_reload() is True
    assert holder.settings.retry.max_attempts == 5 and holder.last_error is None


def test_deleted_file_keeps_the_config(holder, cfg_file, clock, rec) -> None:
    good = holder.settings
    cfg_file.unlink()
    clock.advance(2.0)
    assert holder.maybe_reload() is False
    assert holder.settings is good and rec.changes == [] and rec.errors == []


def test_a_reload_may_be_refused_by_the_check(cfg_file, clock, rec) -> None:
    """Bound to a non-loopback address without --force, a reload may not turn auth off."""
    holder = ConfigHolder(load(cfg_file, environ={}), str(cfg_file), check_every_s=2.0,
                          on_change=rec.changes.append, on_reload_error=rec.errors.append,
                          check=config_module.refuse_no_auth, clock=clock)
    good = holder.settings
    edit(cfg_file, FULL.replace("mode: api_keys", "mode: none"))
    clock.advance(2.0)
    assert holder.maybe_reload() is False
    assert holder.settings is good and holder.settings.inbound_auth.mode == "api_keys"
    assert rec.changes == [] and len(rec.errors) == 1 and "non-loopback" in rec.errors[0]
    # any other change still applies
    edit(cfg_file, FULL.replace("max_attempts: 4", "max_attempts: 5"), mtime=3_000_000)
    clock.advance(2.0)
    assert holder.maybe_reload() is True and holder.settings.retry.max_attempts == 5


def test_without_a_path_nothing_is_reloaded(clock) -> None:
    h = ConfigHolder(Settings(), None, check_every_s=0.1, clock=clock)
    clock.advance(100)
    assert h.maybe_reload() is False


@pytest.mark.parametrize(("given", "level"), [("info", "INFO"), ("Warning", "WARNING"),
                                               ("warn", "WARNING"), ("DEBUG", "DEBUG")])
def test_log_level_takes_any_case(given: str, level: str) -> None:
    assert load(None, overrides={"log_level": given}).log_level == level


def test_an_unknown_log_level_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"log_level: log level must be one of DEBUG, INFO"):
        load(None, overrides={"log_level": "verbose"})


# -- new keys: websocket, jwt --------------------------------------------------------------

def test_websocket_origins_are_normalized(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "websocket: {allowed_origins: ['HTTPS://App.Example.com', "
                                      "'http://localhost:3000', 'http://[::1]:8080']}")
    assert load(path, environ={}).websocket.allowed_origins == [
        "https://app.example.com:443", "http://localhost:3000", "http://[::1]:8080"]


def test_new_keys_default_to_the_safe_side() -> None:
    s = load(None, environ={}, overrides={"inbound_auth.mode": "jwt",
                                          "inbound_auth.jwt": {"secret": "s", "audience": "a"}})
    assert s.inbound_auth.jwt.missing_flows_claim == "none"
    assert s.websocket.allowed_origins == []


def test_a_reload_the_rebuild_refuses_keeps_the_last_good_config(holder, cfg_file, clock,
                                                                 rec) -> None:
    """``on_change`` may refuse a valid file (a key file it cannot use): the config in
    force stays, and the error is reported like an invalid file."""
    def refuse(settings: Settings) -> None:
        raise ConfigError("inbound_auth.jwt.jwks_file: cannot use it (no RS256 signing key)")

    holder._on_change = refuse
    good = holder.settings
    edit(cfg_file, FULL.replace("max_attempts: 4", "max_attempts: 6"))
    clock.advance(2.0)
    assert holder.maybe_reload() is False
    assert holder.settings is good
    assert rec.errors and "jwks_file" in rec.errors[0]
    assert "jwks_file" in holder.last_error


# -- issue #11: when breaker trials go, the cache's bytes, Redis's pause -----------------------

def test_reliability_keys_and_their_defaults() -> None:
    s = load(None, environ={})
    b = s.breaker
    assert (b.open_s, b.backoff_base_s, b.readiness_path, b.probe_interval_s,
            b.probe_timeout_s) == (10.0, 0.5, "/readyz", 0.5, 1.0)
    assert (s.cache.max_entries, s.cache.max_bytes) == (10_000, 64 * 1_048_576)
    assert s.redis_pause_s == 5.0
    off = load(None, environ={}, overrides={"breaker.readiness_path": None})
    assert off.breaker.readiness_path is None  # trials go without asking


@pytest.mark.parametrize(("overrides", "key"), [
    pytest.param({"breaker.readiness_path": "readyz"}, "breaker.readiness_path", id="not-a-path"),
    pytest.param({"breaker.readiness_path": "/ready z"}, "breaker.readiness_path",
                 id="path-with-a-space"),
    pytest.param({"breaker.backoff_base_s": 0}, "breaker.backoff_base_s", id="no-backoff"),
    pytest.param({"breaker.probe_interval_s": -1}, "breaker.probe_interval_s",
                 id="negative-interval"),
    pytest.param({"breaker.probe_timeout_s": 0}, "breaker.probe_timeout_s", id="no-timeout"),
    pytest.param({"cache.max_bytes": 100}, "cache.max_bytes", id="max-bytes-under-1-kib"),
    pytest.param({"redis_pause_s": 0}, "redis_pause_s", id="no-pause"),
])
def test_reliability_keys_are_validated(overrides, key) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(key)}: ") as info:
        load(None, environ={}, overrides=overrides)
    assert "unknown key" not in str(info.value)  # a known key, with a bad value
