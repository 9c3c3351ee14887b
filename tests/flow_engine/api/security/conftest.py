"""Attack tests: each module tries one thing a hostile tenant would, against an engine with
one named key per role (flow_engine/auth.py), on both store backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from support.keys import KEYS


@pytest.fixture
def keyed_app(make_app: Callable[..., Flask]) -> Callable[..., Flask]:
    """An engine app with the named keys above (plus any extra config)."""

    def make(**config: Any) -> Flask:
        return make_app(api_keys=KEYS, **config)

    return make


@pytest.fixture
def api(keyed_app) -> Any:
    """A test client of a keyed app."""
    return keyed_app().test_client()
