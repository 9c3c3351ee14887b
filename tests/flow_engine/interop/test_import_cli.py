"""``flowgate flows import FILE.json``, against a real engine over HTTP (the app ``create_app``
builds, served by werkzeug in a thread), and ``--dry-run`` offline."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.keys import SECRETS
from werkzeug.serving import make_server

from flowgate import cli

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "langflow"


@pytest.fixture
def engine_url(make_engine) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, make_engine(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def flowgate_flows(*argv: str) -> int:
    """``flowgate flows ARGV``, through the CLI's own entry point."""
    return cli.main(["flows", *argv])


def test_an_import_prints_the_report_and_the_flow(engine_url, capsys) -> None:
    code = flowgate_flows("--engine-url", engine_url, "--api-key", SECRETS["editor"],
                          "import", str(EXAMPLES / "basic-prompting.json"), "--id", "assistant")

    out = capsys.readouterr().out
    assert code == 0
    assert "  ChatInput-a1b2c (ChatInput) → ChatInput 'ChatInput-a1b2c'\n" in out
    assert "  note-k3l4m (note) dropped: a note: notes are not part of a Flowgate flow\n" in out
    assert ("→ ChatModel 'LanguageModelComponent-m0d3l', ChatPromptTemplate "
            "'LanguageModelComponent-m0d3l-prompt'") in out
    assert "  warning: an API key in node 'Language Model' (LanguageModelComponent-m0d3l)" in out
    assert out.endswith("basic-prompting.json: flow 'assistant' version 1 created\n")


def test_a_new_version_published_needs_the_publisher_role(engine_url, capsys) -> None:
    url = ("--engine-url", engine_url)
    file = str(EXAMPLES / "prompt-template.json")
    flowgate_flows(*url, "--api-key", SECRETS["editor"], "import", file, "--id", "qa")

    refused = flowgate_flows(*url, "--api-key", SECRETS["editor"], "import", file, "--id", "qa",
                             "--publish")
    published = flowgate_flows(*url, "--api-key", SECRETS["publisher"], "import", file, "--id",
                               "qa", "--publish", "--message", "v2 from LangFlow")

    captured = capsys.readouterr()
    assert refused == 1 and "403 forbidden: publish: true needs the publisher role" in captured.err
    assert published == 0 and captured.out.endswith("flow 'qa' version 2 added and published\n")


def test_an_export_that_cannot_be_imported_lists_every_problem(engine_url, capsys) -> None:
    code = flowgate_flows("--engine-url", engine_url, "--api-key", SECRETS["editor"], "import",
                          str(EXAMPLES / "unsupported.json"))

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("flowgate: 422 flow_invalid: 3 problems:\n")
    assert "  $.flow.data.nodes[1]: LangFlow node 'URL' (URLComponent-u1r2l)" in err
    assert "  $.flow.data.nodes[3]: LangFlow node 'My Component'" in err


def test_dry_run_translates_and_validates_offline(capsys) -> None:
    ok = flowgate_flows("import", str(EXAMPLES / "agent-calculator.json"), "--dry-run")
    bad = flowgate_flows("import", str(EXAMPLES / "unsupported.json"), "--dry-run")

    out = capsys.readouterr().out
    assert ok == 0 and "agent-calculator.json: valid — would become 5 Flowgate nodes" in out
    assert bad == 1 and "unsupported.json: cannot be imported (3 problems)" in out


def test_an_unreadable_file_is_exit_2(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")

    with pytest.raises(SystemExit) as exited:
        flowgate_flows("import", str(broken), "--dry-run")

    assert exited.value.code == 2
    assert "is not valid JSON" in capsys.readouterr().err
