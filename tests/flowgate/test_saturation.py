"""Saturation series (flowgate/common/saturation.py) from a real ``flowgate engine`` under gunicorn
with two workers: they describe the whole process tree whichever worker answers the scrape,
and the CPU counter does not go back when a worker dies and is replaced."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import requests
from support.procs import ServerProcess, free_port
from support.prom import metric_value
from support.waiting import wait_until

from flowgate.common.saturation import ProcessTreeCollector

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def engine(tmp_path):
    port = free_port()
    with ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                       port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=tmp_path, env={"FLOW_ENGINE_WORKERS": "2", "REDIS_URL": "",
                                          "FLOW_ENGINE_API_KEYS": "ops:admin:saturation-key-01",
                                          "DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}) as proc:
        yield proc


def scrape(engine) -> str:
    # a fresh connection each time: gunicorn hands it to either worker
    return requests.get(f"{engine.url}/metrics", timeout=10, headers={"Connection": "close"}).text


def test_the_tree_is_described_whichever_worker_answers(engine):
    master = engine.proc.pid
    wait_until(lambda: len(children(master)) == 2, "two workers")
    workers = children(master)
    seen = [scrape(engine) for _ in range(6)]
    for text in seen:
        assert metric_value(text, "flowgate_engine_workers") == 2
        rss = metric_value(text, "flowgate_engine_resident_memory_bytes")
        # the master and both workers: more than the largest one alone
        assert rss > max(rss_bytes(p) for p in workers | {master}), rss
        assert metric_value(text, "flowgate_engine_cpu_seconds_total") > 0


def test_cpu_time_survives_a_worker_being_replaced(engine):
    master = engine.proc.pid
    wait_until(lambda: len(children(master)) == 2, "two workers")
    before = metric_value(scrape(engine), "flowgate_engine_cpu_seconds_total")
    workers = children(master)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(master)) == 2 and victim not in children(master),
               "gunicorn replaced the killed worker")
    wait_until(lambda: requests.get(f"{engine.url}/readyz", timeout=10).ok, "ready again")
    (replacement,) = children(master) - workers
    spent = cpu_seconds(replacement)
    after = metric_value(scrape(engine), "flowgate_engine_cpu_seconds_total")
    # Everything counted before still counts — the killed worker's start-up CPU too, reaped
    # into the master's cutime — plus what its replacement spent since: the counter never
    # looks reset to rate(). Without the reaped time it would fall by the victim's share.
    assert after >= before + spent, (before, spent, after)
    assert metric_value(scrape(engine), "flowgate_engine_workers") == 2


def test_outside_gunicorn_the_process_is_its_own_worker():
    families = {m.name: m.samples[0].value for m in ProcessTreeCollector("x").collect()}
    assert families["x_workers"] == 1
    # this process alone (not the servers other tests started as its children)
    assert families["x_resident_memory_bytes"] == pytest.approx(rss_bytes(os.getpid()), rel=0.2)


def test_a_proc_without_children_files_is_scanned(tmp_path):
    """Kernels without CONFIG_PROC_CHILDREN: children are found by their parent pid."""
    proc = tmp_path / "proc"
    for pid, ppid, utime, rss in ((10, 1, 100, 50), (11, 10, 30, 20), (12, 10, 20, 20),
                                  (13, 99, 500, 900)):
        (proc / str(pid)).mkdir(parents=True)
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), "5", "7", "3"] + ["0"] * 6 + [str(rss)]
        (proc / str(pid) / "stat").write_text(f"{pid} (gunicorn: worker (x)) " + " ".join(fields))
    from flowgate.common import saturation

    saturation.under_master(10)
    try:
        families = {m.name: m.samples[0].value for m in ProcessTreeCollector("t", proc).collect()}
    finally:
        saturation.under_master(None)
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    # master 100+5+7+3 (its reaped children too), workers 30+5 and 20+5; pid 13 is not ours
    assert families["t_cpu_seconds"] == pytest.approx((115 + 35 + 25) / tick)
    assert families["t_resident_memory_bytes"] == (50 + 20 + 20) * page
    assert families["t_workers"] == 2
