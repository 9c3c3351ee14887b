"""What node outputs look like in events, run records and results (flows/values.py)."""

from __future__ import annotations

import math

from flow_engine.flows.values import to_jsonable


def test_node_outputs_carry_no_nan_or_infinity():
    """A model's JSON may hold NaN (LangChain's JSON parser accepts it): not JSON, so a
    browser's JSON.parse and PostgreSQL's jsonb refuse it; the run's events carry null."""
    out = to_jsonable({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": 2})
    assert out == {"a": None, "b": [None, None, 1.5], "c": 2}
