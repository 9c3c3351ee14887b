"""Where `flowgate up` and `flowgate demo` look for the demo flows."""

from __future__ import annotations

from pathlib import Path

from flowgate import stack

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_uses_the_examples_beside_the_package(monkeypatch) -> None:
    monkeypatch.delenv("FLOWGATE_EXAMPLES", raising=False)
    assert stack.examples_dir() == REPO / "examples"
    assert (stack.examples_dir() / "faq-rag.json").is_file()


def test_an_installed_package_uses_the_working_directory(monkeypatch, tmp_path) -> None:
    """A wheel in site-packages has no examples/ beside it; the Docker image runs in /app,
    which holds them."""
    monkeypatch.delenv("FLOWGATE_EXAMPLES", raising=False)
    monkeypatch.setattr(stack, "__file__", str(tmp_path / "site-packages" / "flowgate" / "stack.py"))
    monkeypatch.chdir(tmp_path)
    assert stack.examples_dir() == tmp_path / "examples"


def test_the_environment_names_them_first(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLOWGATE_EXAMPLES", str(tmp_path / "mine"))
    assert stack.examples_dir() == tmp_path / "mine"
