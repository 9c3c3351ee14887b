"""Uploaded bytes → text: plain text, Markdown, HTML and PDF (pypdf, pure Python).

Two steps. :func:`check_upload`, in the request: the file type is one the engine reads (415
otherwise) and the bytes look like it (422: empty, text that is not UTF-8 or holds NUL
bytes, a "PDF" without the ``%PDF-`` header). :func:`extract`, in the background job:
the text itself, or :class:`ParseError` with the reason the document failed.

Nothing here touches the disk or runs what it reads: HTML is tokenised by the standard
library's parser (scripts and styles are dropped, not run); PDFs are read from memory
with hard limits on pages, objects and extracted characters (a PDF bomb stops at the first
limit it reaches, with that limit in the reason), on top of pypdf's own limits on
decompressed stream sizes. Extraction yields to other greenlets between pages.
"""

from __future__ import annotations

import html.parser
import io
import logging
import re
import time
from dataclasses import dataclass

from flow_engine.knowledge.errors import DocumentInvalid, ParseError, UnsupportedDocument

KINDS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
         ".html": "html", ".htm": "html", ".pdf": "pdf"}
CONTENT_TYPES = {"text/plain": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
                 "text/html": "html", "application/pdf": "pdf"}
MIME = {"text": "text/plain", "markdown": "text/markdown", "html": "text/html",
        "pdf": "application/pdf"}
SUPPORTED = ".txt, .md, .html, .pdf"


@dataclass(frozen=True)
class Limits:
    max_pages: int = 2_000
    max_objects: int = 200_000
    max_chars: int = 20_000_000


def kind_of(filename: str | None, content_type: str | None) -> str:
    """The document kind from the file name's extension, else from its Content-Type;
    415 when neither is one the engine reads."""
    ext = ("." + filename.rsplit(".", 1)[-1].lower()) if filename and "." in filename else ""
    if ext in KINDS:
        return KINDS[ext]
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if not ext and mime in CONTENT_TYPES:
        return CONTENT_TYPES[mime]
    shown = ext or mime or "no type"
    raise UnsupportedDocument(f"cannot index {shown[:60]!r} files; supported: {SUPPORTED}")


def check_upload(kind: str, data: bytes) -> None:
    """Cheap checks made before the upload is accepted (422 when they fail)."""
    if not data.strip():
        raise DocumentInvalid("the document is empty")
    if kind == "pdf":
        if not data.lstrip()[:5] == b"%PDF-":
            raise DocumentInvalid("not a PDF: the file does not start with %PDF-")
        return
    if b"\x00" in data:
        raise DocumentInvalid(f"not a {kind} file: it holds NUL bytes (a binary file?)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentInvalid(f"not UTF-8 text: invalid byte at offset {exc.start}") from None


def extract(kind: str, data: bytes, limits: Limits = Limits()) -> str:
    """The document's text (whitespace tidied); ParseError when there is none."""
    if kind == "pdf":
        text = _pdf_text(data, limits)
    else:
        text = data.decode("utf-8-sig", errors="replace")
        if kind == "html":
            text = html_text(text)
    text = _tidy(text)
    if len(text) > limits.max_chars:
        raise ParseError(f"the document has {len(text)} characters of text; the limit is "
                         f"{limits.max_chars}")
    if not text:
        raise ParseError("the document holds no text")
    return text


_BLOCKS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article",
                     "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
                     "dt", "dd", "hr", "title"})
_SKIP = frozenset({"script", "style", "template", "noscript", "head", "svg", "iframe", "object"})


class _HtmlText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self._skipping.append(tag)
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self._skipping and tag == self._skipping[-1]:
            self._skipping.pop()
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """The visible text of an HTML document (title and body; no scripts, styles, head)."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


def _pdf_text(data: bytes, limits: Limits) -> str:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a malformed file is our reason, not a log
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        objects = _object_count(reader)
        if objects > limits.max_objects:
            raise ParseError(f"the PDF has {objects} objects; the limit is {limits.max_objects}")
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("the PDF is encrypted with a password")
        pages = len(reader.pages)
        if pages > limits.max_pages:
            raise ParseError(f"the PDF has {pages} pages; the limit is {limits.max_pages}")
        texts, total = [], 0
        for i, page in enumerate(reader.pages):
            if i >= limits.max_pages:  # a page tree that lied about its /Count
                raise ParseError(f"the PDF has more than {limits.max_pages} pages; the limit "
                                 f"is {limits.max_pages}")
            text = page.extract_text() or ""
            total += len(text)
            if total > limits.max_chars:
                raise ParseError(f"the PDF holds more than {limits.max_chars} characters of "
                                 "text; the limit is " + str(limits.max_chars))
            texts.append(text)
            time.sleep(0)  # let other greenlets (runs) in between pages
        return "\n\n".join(texts)
    except ParseError:
        raise
    except RecursionError:
        raise ParseError("not a readable PDF: its objects nest too deeply") from None
    except Exception as exc:  # pypdf raises many kinds on malformed input; all mean "unreadable"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ParseError(f"not a readable PDF: {reason}") from None


def _object_count(reader) -> int:
    """Objects the PDF declares (trailer /Size) or its cross-reference tables list."""
    declared = reader.trailer.get("/Size", 0)
    listed = sum(len(v) for v in reader.xref.values()) + len(reader.xref_objStm)
    try:
        return max(int(declared), listed)
    except (TypeError, ValueError):
        return listed


_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANKS = re.compile(r"\n\s*\n\s*(?:\n\s*)*")


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", text.replace("\x00", ""))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()
