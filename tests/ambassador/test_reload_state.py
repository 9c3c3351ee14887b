"""A config reload rebuilds policy and keeps state (ambassador/parts.py, pipeline.py).

Each test edits the config file the app was started with and reloads it as the watch (or
the next request) would; what the ambassador learned before the edit — an open breaker,
spent rate-limit tokens, cached answers — is still there after it, and an edit to a part's
own settings applies them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from app_harness import assert_error_contract, run_flow
from support.waiting import wait_until

BASE = """
retry: {max_attempts: 1}
breaker: {consecutive_failures: %(failures)d, readiness_path: null, open_s: 3600, backoff_base_s: 3600}
ratelimit: {requests_per_s: 0.001, burst: %(burst)d}
flows:
  faq: {cache: {ttl_s: %(ttl)d}}
"""


def write(cfg: Path, stamp: int, *, failures: int = 1, burst: int = 100, ttl: int = 60) -> None:
    cfg.write_text(BASE % {"failures": failures, "burst": burst, "ttl": ttl})
    os.utime(cfg, (stamp, stamp))  # a distinct mtime each edit, with no real wait


def reload(amb) -> None:
    before = amb.pipeline
    assert amb.holder.maybe_reload(due=True) is True, amb.holder.last_error
    assert amb.pipeline is not before  # a new pipeline, put in force whole


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "ambassador.yaml"
    write(path, 1_000_000)
    return path


def test_an_open_breaker_stays_open_across_an_unrelated_edit(make_app, engine, cfg) -> None:
    client, amb = make_app(path=str(cfg))
    engine.answer(503, {"error": {"code": "unavailable", "message": "down"}})
    assert run_flow(client).status_code == 503
    assert amb.breaker.state == "open"
    breaker = amb.breaker

    write(cfg, 2_000_000, ttl=120)  # one flow's cache TTL: nothing to do with the breaker
    reload(amb)
    assert amb.settings.flows["faq"].cache.ttl_s == 120
    assert amb.breaker is breaker and amb.breaker.state == "open"
    calls = len(engine.requests)
    assert_error_contract(run_flow(client), 503, "circuit_open")
    assert len(engine.requests) == calls  # refused here: the engine is still left alone


def test_an_edit_to_the_breakers_thresholds_applies_them_to_the_same_breaker(
        make_app, engine, cfg) -> None:
    write(cfg, 1_500_000, failures=5)
    client, amb = make_app(path=str(cfg))
    breaker = amb.breaker
    engine.answer(503, {"error": {"code": "unavailable", "message": "down"}})
    assert run_flow(client).status_code == 503
    assert breaker.state == "closed"  # one failure of the five it takes

    write(cfg, 2_000_000, failures=2)
    reload(amb)
    assert amb.breaker is breaker and breaker.s.consecutive_failures == 2
    engine.answer(503, {"error": {"code": "unavailable", "message": "down"}})
    assert run_flow(client).status_code == 503
    assert breaker.state == "open"  # the failure before the edit counted toward the new two


def test_spent_rate_limit_tokens_stay_spent(make_app, engine, cfg) -> None:
    write(cfg, 1_500_000, burst=2)
    client, amb = make_app(path=str(cfg))
    assert [run_flow(client).status_code for _ in range(3)] == [200, 200, 429]

    write(cfg, 2_000_000, burst=2, ttl=120)
    reload(amb)
    assert_error_contract(run_flow(client), 429, "rate_limited")  # no refilled bucket


def test_cached_answers_survive_a_reload(make_app, engine, cfg) -> None:
    client, amb = make_app(path=str(cfg))
    first = run_flow(client)
    assert first.headers["X-Cache"] == "MISS"
    calls = len(engine.requests)

    write(cfg, 2_000_000, ttl=120)
    reload(amb)
    second = run_flow(client)
    assert second.headers["X-Cache"] == "HIT"
    assert second.get_json() == first.get_json() and len(engine.requests) == calls


def test_an_edit_to_the_upstream_gets_a_new_pool(make_app, engine, cfg) -> None:
    client, amb = make_app(path=str(cfg))
    old = amb.upstream
    cfg.write_text(cfg.read_text() + "upstream: {timeouts: {per_try_s: 9, total_s: 9}}\n")
    os.utime(cfg, (2_000_000, 2_000_000))
    reload(amb)
    assert amb.upstream is not old and amb.settings.upstream.timeouts.total_s == 9
    assert run_flow(client).status_code == 200  # the new pool reaches the same engine


def test_an_idle_ambassador_takes_an_edit_without_a_request(make_app, engine, cfg) -> None:
    """The watch checks the file by itself (every second): no request needed."""
    _client, amb = make_app(path=str(cfg))
    write(cfg, 2_000_000, ttl=300)
    wait_until(lambda: amb.settings.flows["faq"].cache.ttl_s == 300,
               "the watch to reload the edited config")


def test_an_edit_that_cannot_be_put_in_force_is_refused_and_shows(make_app, engine, cfg) -> None:
    """Not only an invalid file: one that is valid YAML but fails while the pipeline is
    built (a malformed redis_url) keeps the last good config whole — and says so — instead
    of escaping as a 500 or being dropped silently."""
    client, amb = make_app(path=str(cfg))
    before = amb.pipeline
    cfg.write_text(cfg.read_text() + 'redis_url: "redis//typo:6379"\n')
    os.utime(cfg, (2_000_000, 2_000_000))
    assert amb.holder.maybe_reload(due=True) is False
    assert amb.pipeline is before
    assert "could not be put in force" in amb.holder.last_error
    assert amb.metrics.registry.get_sample_value(
        "flowgate_ambassador_config_reload_errors_total") == 1
    assert run_flow(client).status_code == 200
    assert client.get("/readyz?verbose=1").get_json()["config"]["last_reload_failed"] is True
