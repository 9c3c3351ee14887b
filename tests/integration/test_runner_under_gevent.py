"""The runner inside a gevent-patched process (as in a gunicorn gevent worker): runs are
synchronous, need no asyncio loop, stream tokens, and do not block one another."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import asyncio, json, sys, time
    import gevent
    from flow_engine.components import BuildContext, default_registry
    from flow_engine.flows.compile import compile_flow
    from flow_engine.flows.model import FlowVersion
    from flow_engine.flows.validate import validate_flow
    from flow_engine.runs.runner import RunInput, stream

    flow = {"id": "g", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "openai", "model": "m",
                                                      "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}
    registry = default_registry()
    ctx = BuildContext(openai_base_url=sys.argv[1], openai_api_key="k")
    compiled = compile_flow(FlowVersion("g", 1, validate_flow(flow, registry)), registry, ctx)

    def one(i):
        loop_running = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            loop_running = False
        events = list(stream(compiled, RunInput(f"question {i}")))
        return {"last": events[-1].type, "tokens": sum(e.type == "token" for e in events),
                "loop": loop_running}

    import requests
    stats_url = sys.argv[1].removesuffix("/v1") + "/sim/stats"
    jobs = [gevent.spawn(one, i) for i in range(int(sys.argv[2]))]
    most_at_once = 0  # LLM requests in flight together (each waits ttft_s for its first token)
    while not all(j.ready() for j in jobs):
        most_at_once = max(most_at_once, requests.get(stats_url, timeout=10).json()["active_streams"])
        gevent.sleep(0.05)
    gevent.joinall(jobs, timeout=60)
    print(json.dumps({"most_at_once": most_at_once, "results": [j.value for j in jobs]}))
    """
)


def test_concurrent_streamed_runs_under_gevent(fresh_llm_sim, tmp_path):
    fresh_llm_sim.configure(ttft_s=3, reply_tokens=10)
    script = tmp_path / "gevent_runs.py"
    script.write_text(SCRIPT)
    runs = 20
    done = subprocess.run(
        [sys.executable, str(script), fresh_llm_sim.base_url, str(runs)],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["last"] for r in report["results"]] == ["run_finished"] * runs
    assert all(r["tokens"] == 10 for r in report["results"])
    assert not any(r["loop"] for r in report["results"])
    # Under gevent the runs overlap: all 20 wait for their first token at the same time (one
    # after another, one would be in flight at a time). No clock is read: a slow machine only
    # needs to start 20 requests within the 3 s each of them waits.
    assert report["most_at_once"] == runs, report["most_at_once"]
    assert fresh_llm_sim.stats()["chat_completions_completed"] == runs
