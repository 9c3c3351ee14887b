"""The console in a real browser: headless Chromium (Debian's ``chromium``, which ``.ci/run``
installs when missing) driven by Playwright for Python with that executable — no browser
download. The engine is a real ``flowgate engine`` (gunicorn, SQLite) whose LLM is the
session's llm-sim; keys of each role sign in as a user would.

Every test's page collects console errors and uncaught exceptions (asserted empty at the
end unless the test expects some) and leaves a screenshot in its output directory
(``tmp_path``, printed on failure; ``FLOWGATE_SCREENSHOTS=DIR`` copies them there too)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from support.keys import KEYS, SECRETS
from support.needs import missing
from support.procs import ServerProcess, free_port

ADMIN = SECRETS["admin"]
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def chromium() -> str:
    path = os.environ.get("FLOWGATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        missing("Chromium is not installed: apt-get install chromium (or set FLOWGATE_CHROMIUM)")
    return path


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed: pip install -e '.[dev]'")
    executable = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


class Engine:
    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.url = proc.url

    def call(self, method: str, path: str, body=None, key: str = ADMIN, **kw) -> dict:
        resp = requests.request(method, f"{self.url}/api/v1{path}", json=body,
                                headers={"x-api-key": key, **kw.pop("headers", {})}, timeout=15, **kw)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else {}

    def push(self, definition: dict) -> dict:
        """Create the flow, or add it as a new version (not published) if it exists."""
        exists = requests.get(f"{self.url}/api/v1/flows/{definition['id']}",
                              headers={"x-api-key": ADMIN}, timeout=15).status_code == 200
        if exists:
            return self.call("PUT", f"/flows/{definition['id']}", definition)
        return self.call("POST", "/flows", definition)


@pytest.fixture(scope="module")
def engine(llm_sim, tmp_path_factory) -> Iterator[Engine]:
    workdir = tmp_path_factory.mktemp("console-engine")
    port = free_port()
    env = {"FLOW_ENGINE_API_KEYS": KEYS, "REDIS_URL": "", "OPENAI_API_KEY": "",
           "OPENAI_BASE_URL": f"{llm_sim.url}/v1",
           "DATABASE_URL": f"sqlite:///{workdir / 'engine.db'}"}
    with ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                       port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=workdir, env=env) as proc:
        engine = Engine(proc)
        for name in ("chat", "support-router"):
            engine.push(json.loads((EXAMPLES / f"{name}.json").read_text()))
        yield engine


@dataclass
class Page:
    """A browser tab with what it logged."""

    page: object
    url: str
    errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # substrings of errors a test expects

    def goto(self, path: str) -> None:
        self.page.goto(f"{self.url}{path}")

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("form.login button[type=submit]")
        self.page.wait_for_selector("form.login", state="detached")

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def open_page(browser, engine, tmp_path, request):
    """``open_page(width=1280, height=800)`` → a Page in a fresh browser context."""
    opened: list[tuple[Page, object]] = []

    def open_(width: int = 1280, height: int = 800) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        tab = context.new_page()
        page = Page(tab, engine.url)
        tab.on("console", lambda m: page.errors.append(f"console {m.type}: {m.text}")
               if m.type == "error" else None)
        tab.on("pageerror", lambda e: page.errors.append(f"uncaught: {e}"))
        tab.on("dialog", lambda d: (page.errors.append(f"dialog: {d.message}"), d.dismiss()))
        opened.append((page, context))
        return page

    yield open_
    out = Path(os.environ.get("FLOWGATE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    for i, (page, context) in enumerate(opened):
        shot = out / f"{request.node.name}-{i}.png"
        try:
            page.page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
        print(f"screenshot: {shot}")
    for page, _context in opened:
        assert not page.unexpected(), f"the page logged errors: {page.unexpected()}"
