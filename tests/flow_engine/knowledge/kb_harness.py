"""What the knowledge tests share: :func:`engine_app` (an engine built by ``create_app``, so
knowledge bases are wired exactly as in production: the service, the blueprint, the route
roles, the KnowledgeRetriever component and the lookups given to validation and
compilation), a fake ``sleep`` and small API helpers. Imported by name (``from kb_harness
import ...``), like tests/ambassador/app_harness.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry
from support.keys import KEYS, as_
from support.waiting import wait_until

from flow_engine.api import knowledge as knowledge_api
from flow_engine.app import create_app
from flow_engine.knowledge.service import KnowledgeService
from flow_engine.metrics import EngineMetrics

WAIT_S = 30.0
EMBEDDING = {"provider": "openai", "model": "flowgate-sim-embedding", "dimensions": 128}


class FakeSleep:
    """Records the delays the service would wait (retries, backoff) and returns at once;
    ``hold()`` makes the next sleep block until ``release()`` (a retry held open)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._gate: threading.Event | None = None
        self.waiting = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        gate = self._gate
        if gate is not None:
            self.waiting.set()
            assert gate.wait(WAIT_S), "a held sleep was never released"

    def hold(self) -> None:
        self._gate = threading.Event()
        self.waiting.clear()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()


def engine_app(database_url: str, openai_base_url: str, *, sleep: Callable[[float], None],
               **config: Any) -> Flask:
    """An engine app as ``create_app`` builds it; ``config`` overrides Settings fields
    (``max_upload_bytes``, ``knowledge``, ``knowledge_*``). Only time is faked: the
    service's retry ``sleep``, and its idle loop polls every 50 ms instead of every second."""
    app = create_app({"database_url": database_url, "api_keys": KEYS,
                      "openai_base_url": openai_base_url, "maintenance_interval_s": 0,
                      "rollout_interval_s": 0, "outcome_flush_s": 0, **config},
                     metrics=EngineMetrics(CollectorRegistry()))
    service = knowledge_service(app)
    service.sleep = sleep
    service.ingestor.poll_s = 0.05
    return app


def knowledge_service(app: Flask) -> KnowledgeService:
    return app.extensions[knowledge_api.EXTENSION]


def close_app(app: Flask) -> None:
    knowledge_service(app).close()
    app.extensions["flowgate"].maintenance.stop()
    app.extensions["flowgate"].store.close()


# -- helpers ------------------------------------------------------------------------------------


def create_base(client, kb_id: str = "handbook", **body: Any) -> dict[str, Any]:
    resp = client.post("/api/v1/knowledge", headers=as_("editor"),
                       json={"id": kb_id, "name": body.pop("name", kb_id),
                             "embedding": body.pop("embedding", EMBEDDING), **body})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def upload_text(client, kb_id: str, name: str, text: str, **metadata: Any) -> dict[str, Any]:
    resp = client.post(f"/api/v1/knowledge/{kb_id}/documents", headers=as_("editor"),
                       json={"name": name, "text": text, "metadata": metadata})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()


def wait_document(client, kb_id: str, doc: str, statuses=("ready", "failed"),
                  timeout_s: float = WAIT_S) -> dict[str, Any]:
    """Poll the document until its status is one of ``statuses`` (bounded)."""
    seen: list[dict[str, Any]] = []

    def settled() -> dict[str, Any] | None:
        body = client.get(f"/api/v1/knowledge/{kb_id}/documents/{doc}",
                          headers=as_("runner")).get_json()
        seen[:] = [body]
        return body if body.get("status") in statuses else None

    return wait_until(settled, lambda: f"document {doc} to be {' or '.join(statuses)} "
                      f"(it stayed {seen})", timeout_s)


def search(client, kb_id: str, query: str, *, k: int = 4, mode: str = "hybrid",
           headers: dict[str, str] | None = None, **extra: Any) -> list[dict[str, Any]]:
    resp = client.post(f"/api/v1/knowledge/{kb_id}/search", headers=headers or as_("runner"),
                       json={"query": query, "k": k, "mode": mode, **extra})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["hits"]


def make_pdf(pages: list[str], *, blank_pages: int = 0, extra_objects: int = 0) -> bytes:
    """A real PDF: one page of Helvetica text per entry of ``pages``, plus blank pages and
    unused objects (what a PDF bomb is made of)."""
    import io

    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject, NumberObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for text in pages:
        page = writer.add_blank_page(612, 792)
        stream = DecodedStreamObject()
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
            {NameObject("/F1"): font})})
    for _ in range(blank_pages):
        writer.add_blank_page(612, 792)
    for i in range(extra_objects):
        writer._add_object(NumberObject(i))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
