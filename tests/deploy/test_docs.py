"""The docs stay true: every relative link in README.md and docs/ resolves inside the
repository, and the tutorial (docs/tutorial.md) runs — every ```sh block, in order, against
`flowgate up` in a fresh clone, as a reader would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import free_port
from test_readme_commands import FOREIGN_ENV, STARTUP_S, STOP_S, clone, sh_blocks  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links that do not resolve in the repo: {broken}"


def test_nothing_points_outside_the_repository():
    for doc in DOCS:
        assert "../shared" not in doc.read_text(encoding="utf-8"), doc


@pytest.mark.integration
def test_the_tutorial_runs_from_start_to_end(clone: Path, processes, tmp_path: Path):  # noqa: F811
    processes.tool("curl", "apt-get install curl")
    tutorial = (clone / "docs" / "tutorial.md").read_text(encoding="utf-8")
    blocks = sh_blocks(tutorial)
    assert len(blocks) >= 6, "docs/tutorial.md lost its ```sh blocks"
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(PYTHONPATH=str(clone), PYTHONUNBUFFERED="1")
    ports = {"ambassador": free_port(), "engine": free_port(), "llm": free_port()}
    up = processes.start([sys.executable, "-m", "flowgate.cli", "up",
                          "--ambassador-port", str(ports["ambassador"]),
                          "--engine-port", str(ports["engine"]), "--llm-port", str(ports["llm"])],
                         cwd=clone, env=env, log=tmp_path / "up.out")
    try:
        up.wait_for_output(r"^Ctrl-C stops everything\.", STARTUP_S)
        shell_env = {**env, "FLOWGATE_ENGINE_URL": f"http://127.0.0.1:{ports['engine']}"}
        for i, block in enumerate(blocks, 1):
            # the reader's default ports, here the test's free ones
            script = block.replace("localhost:8080", f"127.0.0.1:{ports['ambassador']}")
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone,
                                  env=shell_env, capture_output=True, text=True, timeout=120,
                                  check=False)
            assert done.returncode == 0, \
                f"docs/tutorial.md block {i} failed ({done.returncode}):\n{block}\n" \
                f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            if '"stream": true' in block:
                assert "event: run_finished" in done.stdout, done.stdout
        versions = subprocess.run([".venv/bin/flowgate", "flows", "versions", "greeter"], cwd=clone,
                                  env=shell_env, capture_output=True, text=True, timeout=60)
        assert re.search(r"^v1\s+live", versions.stdout, re.MULTILINE), versions.stdout  # rolled back
    finally:
        up.interrupt(STOP_S)
        up.kill()


def test_the_test_files_the_docs_name_exist():
    """A doc that says "run by tests/…" sends the reader to that file."""
    missing = [f"{doc.relative_to(REPO)}: {name}" for doc in DOCS
               for name in sorted(set(re.findall(r"\btests/[\w/.-]+\.py\b",
                                                 doc.read_text(encoding="utf-8"))))
               if not (REPO / name).is_file()]
    assert not missing, f"test files the docs name that do not exist: {missing}"


def test_doc_commands_run_on_macos_too():
    """BSD sed (macOS) takes `-i` only with a suffix: `sed -i 's/…/'` fails there, and
    `sed -i.bak 's/…/' FILE && rm FILE.bak` works with both seds."""
    gnu_only = [f"{doc.relative_to(REPO)}: {line.strip()}" for doc in DOCS
                for block in sh_blocks(doc.read_text(encoding="utf-8"))
                for line in block.splitlines() if re.search(r"\bsed\s+(-\w*\s+)*-i(\s|$)", line)]
    assert not gnu_only, f"GNU-only `sed -i`: {gnu_only}"


def test_the_readme_stays_short_and_points_at_the_docs():
    """What it is, the two commands, the first curl, where to go next: the rest is in docs/."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 120, "README.md grew: move the detail to docs/"
    linked = {target.split("#", 1)[0] for target in LINK.findall(readme)}
    for page in ("tutorial", "design", "production", "configuration", "security", "runbooks"):
        assert f"docs/{page}.md" in linked, f"README.md does not link docs/{page}.md"
