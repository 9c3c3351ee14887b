"""The engine's embeddings client (flow_engine/knowledge/embeddings.py) against the real
llm-sim over HTTP: shapes and unit vectors, the chat model's retry rules (only the sleep is
faked), and where the provider key may go."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import requests
from kb_harness import FakeSleep
from support.procs import free_port

from flow_engine.components.openai_compat import (
    ProviderConnectionError,
    ProviderStatusError,
    ProviderTimeout,
    RetryPolicy,
)
from flow_engine.egress import ProviderOrigins
from flow_engine.knowledge.embeddings import EmbeddingClient, client_for


def _seen(sim: Any) -> list[dict[str, Any]]:
    return requests.get(f"{sim.url}/sim/embedding-requests", timeout=10).json()


def test_embeds_a_batch_as_unit_vectors(fresh_llm_sim: Any) -> None:
    client = EmbeddingClient(fresh_llm_sim.base_url, "emb", dimensions=256)
    matrix = client.embed(["refunds take five days", "refund policy", "shipping costs"])
    assert matrix.shape == (3, 256) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert matrix[0] @ matrix[1] > matrix[0] @ matrix[2]
    assert _seen(fresh_llm_sim)[0]["dimensions"] == 256


@pytest.mark.parametrize(("kind", "status", "delays"), [
    pytest.param("500", 500, None, id="500-backoff"),
    pytest.param("429", 429, [1.0, 1.0], id="429-retry-after"),
])
def test_server_errors_are_retried_then_raised(fresh_llm_sim: Any, kind: str, status: int,
                                               delays: list[float] | None) -> None:
    fresh_llm_sim.configure(embedding_error_rate=1, error_kinds=[kind])
    sleep = FakeSleep()
    client = EmbeddingClient(fresh_llm_sim.base_url, "emb",
                             retry=RetryPolicy(max_retries=2, backoff_s=0.5, sleep=sleep,
                                               jitter=lambda: 1.0))
    with pytest.raises(ProviderStatusError) as info:
        client.embed(["x"])
    assert info.value.status_code == status and info.value.attempts == 3
    assert sleep.delays == (delays or [0.5, 1.0])  # Retry-After, else doubling backoff
    assert len(_seen(fresh_llm_sim)) == 3


def test_a_refused_connection_is_retried(fresh_llm_sim: Any) -> None:
    sleep = FakeSleep()
    client = EmbeddingClient(f"http://127.0.0.1:{free_port()}/v1", "emb",
                             retry=RetryPolicy(max_retries=3, sleep=sleep))
    with pytest.raises(ProviderConnectionError, match="could not connect"):
        client.embed(["x"])
    assert len(sleep.delays) == 3


def test_a_read_timeout_is_not_retried(fresh_llm_sim: Any) -> None:
    """The provider may be working, and billing, on it."""
    fresh_llm_sim.configure(embedding_latency_s=2)
    sleep = FakeSleep()
    client = EmbeddingClient(fresh_llm_sim.base_url, "emb", timeout_s=0.3,
                             retry=RetryPolicy(max_retries=3, sleep=sleep))
    with pytest.raises(ProviderTimeout):
        client.embed(["x"])
    assert sleep.delays == []


def test_the_key_goes_only_to_keyed_origins(fresh_llm_sim: Any) -> None:
    keyed = fresh_llm_sim.base_url  # http://127.0.0.1:PORT/v1
    same_server_other_origin = keyed.replace("127.0.0.1", "localhost")
    egress = ProviderOrigins.from_settings(keyed, "sk-secret",
                                           [f"keyless:{same_server_other_origin.rsplit('/v1', 1)[0]}"])
    options = {"dimensions": 8, "engine_base_url": keyed, "api_key": "sk-secret",
               "egress": egress, "timeout_s": 10, "retry": RetryPolicy(max_retries=0)}
    client_for(None, "emb", **options).embed(["x"])
    client_for(same_server_other_origin, "emb", **options).embed(["y"])
    first, second = _seen(fresh_llm_sim)
    assert first["headers"]["Authorization"] == "Bearer sk-secret"
    assert "Authorization" not in second["headers"]
    with pytest.raises(ValueError, match="not an allowed provider origin"):
        client_for("https://attacker.example/v1", "emb", **options)
    assert len(_seen(fresh_llm_sim)) == 2


def test_model_aliases_rename_the_model_the_engine_s_endpoint_is_asked_for(fresh_llm_sim: Any) -> None:
    """FLOW_ENGINE_MODEL_ALIASES name what the engine's endpoint serves (Ollama has no
    text-embedding-3-small); a base sent to another endpoint keeps its model name."""
    engine_url = fresh_llm_sim.base_url
    other = engine_url.replace("127.0.0.1", "localhost")
    options = {"dimensions": 8, "engine_base_url": engine_url, "api_key": None, "egress": None,
               "timeout_s": 10, "retry": RetryPolicy(max_retries=0),
               "aliases": {"text-embedding-3-small": "nomic-embed-text"}}
    client_for(None, "text-embedding-3-small", **options).embed(["x"])
    client_for(engine_url, "text-embedding-3-small", **options).embed(["x"])
    client_for(None, "other-model", **options).embed(["x"])
    client_for(other, "text-embedding-3-small", **options).embed(["x"])
    assert [seen["model"] for seen in _seen(fresh_llm_sim)] == [
        "nomic-embed-text", "nomic-embed-text", "other-model", "text-embedding-3-small"]


def test_the_engine_applies_its_model_aliases_to_embeddings(make_kapp, fresh_llm_sim: Any) -> None:
    from kb_harness import EMBEDDING, create_base, search, upload_text, wait_document

    api = make_kapp(model_aliases="gpt-4o-mini=sim-chat,text-embedding-3-small=sim-embed").test_client()
    create_base(api, embedding={**EMBEDDING, "model": "text-embedding-3-small"})
    doc = upload_text(api, "handbook", "refunds.md", "Refunds are issued within five days.")
    assert wait_document(api, "handbook", doc["id"])["status"] == "ready"
    assert search(api, "handbook", "refunds", mode="vector")[0]["document"] == "refunds.md"
    models = [seen["model"] for seen in _seen(fresh_llm_sim)]
    assert models and set(models) == {"sim-embed"}, models
