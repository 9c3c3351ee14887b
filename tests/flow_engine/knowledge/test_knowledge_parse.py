"""Uploaded bytes → text (flow_engine/knowledge/parse.py): types, checks, HTML, PDF limits."""

from __future__ import annotations

import pytest
from kb_harness import make_pdf

from flow_engine.knowledge import parse
from flow_engine.knowledge.errors import DocumentInvalid, ParseError, UnsupportedDocument


@pytest.mark.parametrize(("filename", "ctype", "kind"), [
    ("a.txt", None, "text"), ("A.MD", None, "markdown"), ("x.markdown", "", "markdown"),
    ("page.htm", "application/octet-stream", "html"), ("doc.pdf", None, "pdf"),
    ("noext", "text/plain; charset=utf-8", "text"), (None, "application/pdf", "pdf"),
])
def test_kind_from_extension_then_content_type(filename, ctype, kind) -> None:
    assert parse.kind_of(filename, ctype) == kind


@pytest.mark.parametrize(("filename", "ctype"), [
    ("run.exe", "text/plain"),  # a known content type does not rescue an unknown extension
    ("x.docx", None), ("noext", "application/octet-stream"), (None, None), ("a.py", "text/x-python"),
])
def test_other_types_are_415(filename, ctype) -> None:
    with pytest.raises(UnsupportedDocument) as info:
        parse.kind_of(filename, ctype)
    assert info.value.status == 415 and ".pdf" in info.value.message


@pytest.mark.parametrize(("kind", "data", "reason"), [
    ("text", b"", "empty"), ("text", b"  \n\t ", "empty"), ("markdown", b"\xff\xfe\x00bin", "NUL"),
    ("text", b"caf\xe9", "UTF-8"), ("pdf", b"hello, not a pdf", "%PDF-"),
])
def test_check_upload_refuses_what_cannot_be_text(kind, data, reason) -> None:
    with pytest.raises(DocumentInvalid, match=reason):
        parse.check_upload(kind, data)


def test_html_text_drops_scripts_styles_and_head() -> None:
    html = (b"<html><head><title>t</title><style>p{}</style></head><body><h1>Refunds</h1>"
            b"<script>alert('x')</script><p>Take 5&nbsp;days &amp; <b>more</b></p>"
            b"<noscript>enable js</noscript><ul><li>one</li><li>two</li></ul></body></html>")
    assert parse.extract("html", html) == "Refunds\n\nTake 5 days & more\n\none\n\ntwo"


def test_markdown_and_text_are_tidied_not_rewritten() -> None:
    assert parse.extract("markdown", "\ufeff# Title\r\n\r\n\r\n  body  text ".encode()) == \
        "# Title\n\nbody text"


def test_a_document_without_text_fails_with_a_reason() -> None:
    with pytest.raises(ParseError, match="no text"):
        parse.extract("html", b"<html><script>only code</script></html>")


def test_pdf_text_page_by_page() -> None:
    data = make_pdf(["Warranty lasts two years", "Batteries (AA) excluded"])
    assert parse.extract("pdf", data) == "Warranty lasts two years\n\nBatteries (AA) excluded"


def test_a_pdf_with_too_many_pages_stops_at_the_limit() -> None:
    data = make_pdf(["cover"], blank_pages=60)
    with pytest.raises(ParseError, match="61 pages; the limit is 50"):
        parse.extract("pdf", data, parse.Limits(max_pages=50))


def test_a_pdf_with_too_many_objects_stops_at_the_limit() -> None:
    data = make_pdf(["text"], extra_objects=2_000)
    with pytest.raises(ParseError, match=r"objects; the limit is 1000"):
        parse.extract("pdf", data, parse.Limits(max_objects=1_000))


def test_a_pdf_whose_text_is_too_long_stops_at_the_limit() -> None:
    data = make_pdf(["x" * 80] * 5)
    with pytest.raises(ParseError, match="characters of text; the limit is 200"):
        parse.extract("pdf", data, parse.Limits(max_chars=200))


@pytest.mark.parametrize("data", [
    b"%PDF-1.7\n" + b"garbage" * 100,
    b"%PDF-1.4\n1 0 obj\n" + b"[" * 5_000 + b"\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF",
])
def test_an_unreadable_pdf_fails_with_a_reason_not_a_crash(data: bytes) -> None:
    with pytest.raises(ParseError, match=r"not a readable PDF|no text"):
        parse.extract("pdf", data)
