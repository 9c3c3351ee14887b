"""Fixtures the ambassador's integration modules share (tests/integration/test_ambassador*.py):
the engine most of their tests share, one per module, and ambassadors of one test each. A
module that needs another engine (test_engine_gunicorn.py, test_engine_ws.py) defines its
own ``engine``, which takes precedence."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support.procs import ServerProcess
from test_ambassador import Ambassador, Ambassadors, ensure_flow, quick_stop, start_engine, warm_up


@pytest.fixture(scope="module")
def engine(tmp_path_factory, llm_sim) -> Iterator[ServerProcess]:
    """The engine the module's tests share (never stopped by a test)."""
    proc = start_engine(tmp_path_factory.mktemp("engine"), llm_sim)
    try:
        ensure_flow(proc.url)
        warm_up(proc.url, llm_sim)
        yield proc
    finally:
        quick_stop(proc)


@pytest.fixture
def start_ambassador(tmp_path) -> Iterator[Callable[..., Ambassador]]:
    """``start_ambassador(config, upstream_url, redis_url=None)`` → a running ambassador of
    this test alone (stopped after it)."""
    ambassadors = Ambassadors(tmp_path)
    try:
        yield ambassadors.start
    finally:
        ambassadors.stop_all()
