"""One rule for tests that need something the machine may lack (Redis, PostgreSQL, a tool):
skip with the reason on a developer's machine, fail under CI (``CI`` set), where a green run
must have exercised everything."""

from __future__ import annotations

import os

import pytest


def missing(reason: str) -> None:
    """Skip locally, fail under CI; ``reason`` says what is missing and how to provide it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this test must run)", pytrace=False)
    pytest.skip(reason)
