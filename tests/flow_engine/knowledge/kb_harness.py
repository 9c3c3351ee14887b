"""What the knowledge tests share: :func:`attach` (the hooks of /tmp/knowledge-hooks.patch,
applied in-process to an app built by ``create_app``), a fake ``sleep`` and small API
helpers. Imported by name (``from kb_harness import ...``), like tests/ambassador/app_harness.py.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask
from support.keys import as_
from support.waiting import wait_until

from flow_engine.api import knowledge as knowledge_api
from flow_engine.auth import ROUTE_ROLES
from flow_engine.components import default_registry
from flow_engine.components.base import ComponentRegistry, Limits
from flow_engine.components.knowledge import KnowledgeRetriever
from flow_engine.knowledge.service import KnowledgeService
from flow_engine.knowledge.settings import KnowledgeSettings

WAIT_S = 30.0
EMBEDDING = {"provider": "openai", "model": "flowgate-sim-embedding", "dimensions": 128}
KNOWLEDGE_ROLES = {  # the auth.py entries of the hooks patch
    "knowledge.create_knowledge": "editor", "knowledge.list_knowledge": "runner",
    "knowledge.get_knowledge": "runner", "knowledge.delete_knowledge": "admin",
    "knowledge.upload_document": "editor", "knowledge.list_documents": "runner",
    "knowledge.get_document": "runner", "knowledge.delete_document": "editor",
    "knowledge.search": "runner",
}


@dataclasses.dataclass(frozen=True)
class LimitsWithLookups(Limits):
    """Limits plus the ``extra`` lookups the hooks patch adds to Limits itself."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def attach(app: Flask, *, sleep: Callable[[float], None], poll_s: float = 0.05,
           **overrides: Any) -> KnowledgeService:
    """What the hooks patch does in create_app, applied to an app already built; on an
    engine that has the hooks, its service is replaced by one with these test settings."""
    eng = app.extensions["flowgate"]
    settings = KnowledgeSettings.from_settings(eng.settings, **overrides)
    service = KnowledgeService(eng.store.engine, settings, egress=eng.settings.egress,
                               openai_base_url=eng.settings.openai_base_url,
                               openai_api_key=eng.settings.openai_api_key, sleep=sleep,
                               poll_s=poll_s).start()
    hooked = app.extensions.get(knowledge_api.EXTENSION)
    if hooked is not None:
        hooked.close()
    else:
        app.register_blueprint(knowledge_api.bp, url_prefix="/api/v1")
        ROUTE_ROLES.update(KNOWLEDGE_ROLES)
    app.extensions[knowledge_api.EXTENSION] = service
    flows = eng.flows
    if "KnowledgeRetriever" not in flows.registry:
        flows.registry = ComponentRegistry([*default_registry(), KnowledgeRetriever()])
    limits = {f.name: getattr(flows.limits, f.name) for f in dataclasses.fields(Limits)
              if f.name != "extra"}
    flows.limits = LimitsWithLookups(**limits, extra={"knowledge": service})
    flows.build_context = dataclasses.replace(
        flows.build_context, extra={**flows.build_context.extra, "knowledge": service})
    return service


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
