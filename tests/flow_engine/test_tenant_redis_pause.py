"""The engine's tenant limits leave a failing Redis alone for PAUSE_S
(flowgate/common/redis_guard.py, shared with the ambassador's stores): one failure, then
the process counts alone without calling Redis again until the pause is over."""

from __future__ import annotations

import pytest

from flow_engine import tenants
from flow_engine.errors import TenantLimited
from flow_engine.tenants import TenantLimits, TenantPolicy
from flowgate.common.redis_guard import RedisPause


class DeadRedis:
    """A Redis client whose every script call fails, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, _source: str):
        def script(**_kwargs):
            self.calls += 1
            raise ConnectionError("redis is down")
        return script


def test_a_failure_pauses_redis_and_the_process_counts_alone() -> None:
    now = [100.0]
    errors: list[str] = []
    redis = DeadRedis()
    limits = TenantLimits(TenantPolicy.parse(1, 0, ""), redis, on_error=errors.append,
                          pause=RedisPause(tenants.PAUSE_S, lambda: now[0]))

    limits.admit("shop", "run-1")  # Redis fails: a local slot
    assert (redis.calls, errors) == (1, ["tenants"])
    with pytest.raises(TenantLimited):
        limits.admit("shop", "run-2")  # paused: counted locally, Redis not called
    assert (redis.calls, errors) == (1, ["tenants"])
    limits.release("run-1")
    now[0] += tenants.PAUSE_S
    limits.admit("shop", "run-3")  # the pause is over: Redis is tried again
    assert (redis.calls, errors) == (2, ["tenants", "tenants"])
