"""``flowgate knowledge`` against an engine served over real HTTP (werkzeug in a thread),
and the demo knowledge base ``flowgate up`` creates from examples/handbook/."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.keys import SECRETS
from werkzeug.serving import make_server

from flowgate import knowledge_cli
from flowgate.client import EngineClient

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.parametrize("kb_database", ["sqlite"], indirect=True)


@pytest.fixture
def engine_url(kapp):
    server = make_server("127.0.0.1", 0, kapp, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def _cli(engine_url: str, who: str, *args: str) -> list[str]:
    return ["--engine-url", engine_url, "--api-key", SECRETS[who], *args]


def test_create_upload_list_and_search(engine_url, tmp_path, capsys) -> None:
    (tmp_path / "refunds.md").write_text("Refunds are issued within 5 business days.")
    (tmp_path / "page.html").write_text("<p>Shipping is free over 50 EUR.</p>")
    assert knowledge_cli.main(_cli(engine_url, "editor", "create", "Handbook", "--id", "handbook",
                                   "--model", "sim", "--dimensions", "128")) == 0
    assert knowledge_cli.main(_cli(engine_url, "editor", "upload", "handbook",
                                   str(tmp_path / "refunds.md"), str(tmp_path / "page.html"),
                                   "--metadata", '{"team": "support"}', "--wait")) == 0
    out = capsys.readouterr().out
    assert "refunds.md: ready (1 chunks)" in out and "page.html: ready" in out
    assert knowledge_cli.main(_cli(engine_url, "runner", "list")) == 0
    assert "handbook" in capsys.readouterr().out
    assert knowledge_cli.main(_cli(engine_url, "runner", "list", "handbook")) == 0
    assert "refunds.md" in capsys.readouterr().out
    assert knowledge_cli.main(_cli(engine_url, "runner", "search", "handbook", "refund days",
                                   "-k", "1", "--filter", "team=support")) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. refunds.md #0") and "5 business days" in out


def test_exit_codes(engine_url, tmp_path, capsys) -> None:
    assert knowledge_cli.main(_cli(engine_url, "runner", "create", "x", "--model", "m")) == 1
    assert "403 forbidden" in capsys.readouterr().err
    assert knowledge_cli.main(_cli(engine_url, "runner", "search", "nope", "q")) == 1
    assert "404 knowledge_not_found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        knowledge_cli.main(_cli(engine_url, "editor", "upload", "kb", str(tmp_path / "missing.md")))
    assert info.value.code == 2
    assert knowledge_cli.main(["--engine-url", "http://127.0.0.1:9", "--api-key", "k", "list"]) == 3
    assert knowledge_cli.main(_cli(engine_url, "runner", "search", "kb", "q", "--filter", "x")) == 2


def test_a_failed_document_makes_upload_wait_exit_1(engine_url, tmp_path, capsys) -> None:
    knowledge_cli.main(_cli(engine_url, "editor", "create", "kb", "--id", "kb", "--model", "m"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n" + b"\x8f" * 500)
    assert knowledge_cli.main(_cli(engine_url, "editor", "upload", "kb",
                                   str(tmp_path / "broken.pdf"), "--wait")) == 1
    assert "broken.pdf: failed" in capsys.readouterr().out


def test_the_demo_handbook_and_its_flow(engine_url) -> None:
    client = EngineClient(engine_url, SECRETS["admin"])
    names = knowledge_cli.ensure_demo(client, REPO / "examples" / "handbook", dimensions=128)
    assert names == ["refunds.md", "shipping.md", "support.md", "warranty.md"]
    docs = client.call("GET", "/knowledge/handbook/documents")["documents"]
    assert {d["status"] for d in docs} == {"ready"}
    assert knowledge_cli.ensure_demo(client, REPO / "examples" / "handbook", dimensions=128) == names
    assert all(d["version"] == 1 for d in client.call(
        "GET", "/knowledge/handbook/documents")["documents"])  # unchanged files: not re-sent
    import json

    flow = json.loads((REPO / "examples" / "handbook-qa.json").read_text())
    flow["nodes"][3]["params"] = {"provider": "echo"}
    client.call("POST", "/flows", flow)
    out = client.call("POST", "/run/handbook-qa", {"input_value": "How long do refunds take?"})
    assert "Refunds are issued within 5 business days" in out["output"]
