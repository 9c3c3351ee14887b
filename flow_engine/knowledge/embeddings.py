"""A lean client of any OpenAI-compatible ``POST {base_url}/embeddings`` endpoint (OpenAI,
llm-sim, vLLM, Ollama, …), in the engine's own style: pooled keep-alive urllib3 (cooperative
under gevent), no SDK.

It shares the chat model's transport and rules (:mod:`flow_engine.components.openai_compat`):
the same per-origin connection pools, the same error tree (``ProviderStatusError``,
``ProviderConnectionError``, ``ProviderTimeout``, ``ProviderResponseError``) and the same
:class:`~flow_engine.components.openai_compat.RetryPolicy` — connection failures, connect
timeouts and HTTP 408/429/5xx are retried, after ``Retry-After`` when the provider sends one
(within ``max_retry_after_s``) or exponential backoff with jitter; a read timeout is not
(the provider may be working, and billing, on it). Redirects are never followed.

Where it may send the key is decided by the caller through
:class:`~flow_engine.egress.ProviderOrigins` (:func:`client_for`): the key only to keyed
origins, keyless origins without it, any other origin refused.

Vectors come back as a float32 matrix with unit-length rows (so cosine similarity is a dot
product); a response of the wrong shape, a non-finite number or a zero vector is an error.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import urllib3
from urllib3.exceptions import HTTPError

from flow_engine.components.openai_compat import (
    ProviderError,
    ProviderResponseError,
    RetryPolicy,
    _discard,
    _pool_for,
    _status_error,
    _translate,
)
from flow_engine.egress import DEFAULT_BASE_URL, ProviderOrigins

_MAX_BODY_BYTES = 256 * 1024 * 1024


class EmbeddingClient:
    """``embed(texts)`` → an ``(n, d)`` float32 matrix of unit vectors."""

    def __init__(self, base_url: str, model: str, *, dimensions: int | None = None,
                 api_key: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        self.base_url = base_url
        self.model = model
        self.dimensions = dimensions
        self._url = base_url.rstrip("/") + "/embeddings"
        self._path = urllib3.util.parse_url(self._url).request_uri
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "flowgate"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.retry = retry or RetryPolicy()
        self._pool: urllib3.HTTPConnectionPool | None = None

    @property
    def sends_key(self) -> bool:
        return "Authorization" in self._headers

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions or 0), dtype=np.float32)
        body: dict[str, Any] = {"model": self.model, "input": list(texts),
                                "encoding_format": "float"}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        payload = json.dumps(body).encode()
        attempt = 0
        while True:
            try:
                return self._parse(self._post(payload), len(texts))
            except ProviderError as exc:
                attempt += 1
                delay = self.retry.delay(attempt, exc)
                if delay is None:
                    exc.attempts = attempt  # type: ignore[attr-defined]
                    raise
            self.retry.sleep(delay)

    def _post(self, payload: bytes) -> bytes:
        if self._pool is None:  # at the first call: building a client stays offline
            self._pool = _pool_for(self._url)
        try:
            response = self._pool.urlopen("POST", self._path, body=payload, headers=self._headers,
                                          timeout=self._timeout, retries=False, redirect=False,
                                          assert_same_host=False, preload_content=False)
        except HTTPError as exc:
            raise _translate(exc) from exc
        if response.status != 200:
            raise _status_error(response)
        try:
            data = response.read(_MAX_BODY_BYTES + 1)
        except HTTPError as exc:
            _discard(response)
            raise _translate(exc) from exc
        if len(data) > _MAX_BODY_BYTES:
            _discard(response)  # not read to the end: never reuse the connection
            raise ProviderResponseError(f"the embeddings answer is over {_MAX_BODY_BYTES} bytes")
        response.release_conn()
        return data

    def _parse(self, data: bytes, n: int) -> np.ndarray:
        try:
            items = json.loads(data)["data"]
            rows = sorted(items, key=lambda item: item["index"])
            if [row["index"] for row in rows] != list(range(n)):
                raise ValueError(f"expected {n} embeddings indexed 0..{n - 1}")
            matrix = np.array([_vector(row["embedding"]) for row in rows], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderResponseError(f"not an embeddings answer: {exc}") from None
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise ProviderResponseError("the embeddings have no dimensions")
        if self.dimensions and matrix.shape[1] != self.dimensions:
            raise ProviderResponseError(f"the model returned {matrix.shape[1]} dimensions; "
                                        f"{self.dimensions} were asked for")
        if not np.isfinite(matrix).all():
            raise ProviderResponseError("an embedding holds a number that is not finite")
        norms = np.linalg.norm(matrix, axis=1)
        if (norms == 0).any():
            raise ProviderResponseError("the model returned a zero vector")
        return matrix / norms[:, None]


def _vector(value: Any) -> Any:
    if isinstance(value, str):  # encoding_format=base64 (a server that ignores "float")
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    if not isinstance(value, list):
        raise ValueError("an embedding is neither a list of numbers nor base64")
    return value


def client_for(base_url: str | None, model: str, *, dimensions: int | None,
               engine_base_url: str | None, api_key: str | None,
               egress: ProviderOrigins | None, timeout_s: float,
               retry: RetryPolicy, aliases: Mapping[str, str] | None = None) -> EmbeddingClient:
    """The client for a knowledge base's embedding spec: ``base_url`` or the engine's
    OPENAI_BASE_URL; the key only where ``egress`` says it may go. ValueError when
    ``egress`` refuses the origin (the rules may have changed since the base was created).

    ``aliases`` (FLOW_ENGINE_MODEL_ALIASES) rename the model as for chat models: they name
    what the engine's endpoint serves (``text-embedding-3-small=nomic-embed-text`` on
    Ollama), so a base sent to another endpoint keeps its model name."""
    url = base_url or engine_base_url or DEFAULT_BASE_URL
    if aliases and (not base_url or base_url == engine_base_url):
        model = aliases.get(model, model)
    key = api_key or None
    if egress is not None:
        problem = egress.problem(url)
        if problem:
            raise ValueError(problem)
        key = egress.key_for(url, key)
    return EmbeddingClient(url, model, dimensions=dimensions, api_key=key, timeout_s=timeout_s,
                           retry=retry)
