"""Credential parsing (flowgate/common/credentials.py), as both services read it: the
x-api-key header first (blank counts as absent), then ``Authorization: Bearer`` (any case,
surrounding blanks stripped), never another scheme."""

from __future__ import annotations

import pytest

from flowgate.common.credentials import bearer_token, presented_key


@pytest.mark.parametrize(("authorization", "token"), [
    pytest.param("Bearer abc", "abc", id="bearer"),
    pytest.param("bearer abc", "abc", id="lower-case"),
    pytest.param("BEARER   abc  ", "abc", id="blanks-stripped"),
    pytest.param("Bearer ", None, id="empty-token"),
    pytest.param("Bearer    ", None, id="blank-token"),
    pytest.param("Bearerabc", None, id="no-space"),
    pytest.param("Basic dXNlcjpwdw==", None, id="other-scheme"),
    pytest.param("", None, id="empty"),
    pytest.param(None, None, id="absent"),
])
def test_bearer_token(authorization, token) -> None:
    assert bearer_token(authorization) == token


@pytest.mark.parametrize(("x_api_key", "authorization", "key"), [
    pytest.param("k1", "Bearer k2", "k1", id="x-api-key-first"),
    pytest.param(" k1 ", None, "k1", id="x-api-key-stripped"),
    pytest.param("  ", "Bearer k2", "k2", id="blank-x-api-key-falls-back"),
    pytest.param(None, "bearer k2", "k2", id="bearer-only"),
    pytest.param(None, "Basic k2", None, id="other-scheme"),
    pytest.param("", "", None, id="both-empty"),
    pytest.param(None, None, None, id="none"),
])
def test_presented_key(x_api_key, authorization, key) -> None:
    assert presented_key(x_api_key, authorization) == key
