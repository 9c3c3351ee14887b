"""Each knowledge module imports on its own, first, in a fresh interpreter: the component
registry imports components/knowledge.py, which imports the knowledge model, so a model that
imported flow validation (and with it the registry) back failed with a circular import when
it was the first thing imported (bench/knowledge.py did exactly that)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flow_engine.flows.validate import ID_RE as FLOW_ID_RE
from flow_engine.knowledge.vocab import ID_RE

ROOT = Path(__file__).resolve().parents[3]
MODULES = sorted(f"flow_engine.knowledge.{p.stem}" for p in
                 (ROOT / "flow_engine" / "knowledge").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", [*MODULES, "flow_engine.components.knowledge",
                                    "flow_engine.api.knowledge"])
def test_the_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_knowledge_ids_follow_the_flow_id_rule() -> None:
    assert "flow_engine.knowledge.model" in MODULES
    assert ID_RE.pattern == FLOW_ID_RE.pattern
