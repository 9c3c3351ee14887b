"""requirements.lock: every dependency pyproject.toml declares is pinned to one exact version
inside the range pyproject.toml allows, and every install path uses it as constraints."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for number, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{number}: {line!r} is not `name==version`"
        name = canonicalize_name(match[1])
        assert name not in found, f"requirements.lock:{number}: {name} pinned twice"
        found[name] = match[2]
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_declared_dependency_is_pinned_inside_its_range():
    locked = pins()
    problems = []
    for requirement in declared():
        version = locked.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not in requirements.lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} is outside {requirement.specifier}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_the_project_itself_is_not_pinned():
    assert "flowgate" not in pins()  # an editable install of this checkout, never a version


def test_every_install_uses_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*--constraint \$\(LOCK\) -e '\.\[dev\]'", makefile)
    assert re.search(r"^\$\(BIN\)/flowgate: .*\$\(LOCK\)", makefile, re.M), \
        "the venv must be rebuilt when the lock changes"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "pip wheel --constraint requirements.lock" in dockerfile
    assert re.search(r"^COPY .*requirements\.lock", dockerfile, re.M)
