"""The README's Quick start, followed in a fresh clone: the run command (``make run``) in the
background, then the curl commands it prints — so the README stays true.

The clone holds what is committed (not the working tree). ``make run`` would first build a
virtualenv (pip install: minutes); instead the clone gets a ``.venv/bin/flowgate`` that is
the console script pip writes, on this interpreter, with ``PYTHONPATH`` naming the clone,
so the clone's code runs with the installed dependencies (checked below, as is that ``make``
has nothing to build but runs ``.venv/bin/flowgate up``).

Ports: the run command takes no port options, so it needs the defaults of ``flowgate up``
(8080, 8000, 9100) free. On a shared machine one may be taken (someone's ``make run``); the
test then runs the very command the Makefile's recipe runs with free ports instead, since
the banner prints the curl for the ports in use, and says so in a warning. That is neither a
skip nor a failure: a busy port is not a defect of the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from support.procs import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 60
STOP_S = 45  # `flowgate up` gives its services 35 s to stop gracefully
# Environment that would change what `flowgate up` or the CLI talk to.
FOREIGN_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR",
               "AMBASSADOR_CONFIG", "AMBASSADOR_UPSTREAM_URL", "AMBASSADOR_UPSTREAM_KEY",
               "FLOW_ENGINE_API_KEYS", "FLOW_ENGINE_API_KEY_FILE", "FLOW_ENGINE_INSECURE_NO_AUTH",
               "FLOWGATE_API_KEY", "FLOWGATE_ENGINE_URL", "PYTHONPATH", "VIRTUAL_ENV",
               # a make running this test must not hand its jobserver or flags to the inner make
               "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
CONSOLE_SCRIPT = """#!{python}
import sys
from flowgate.cli import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""


def section(readme: str, title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert found, f"README.md has no '## {title}' section"
    return found.group(1)


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def commands(block: str, program: str) -> list[list[str]]:
    """The commands (as argument lists) in a shell block or printed text that start with
    ``program``, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in map(str.strip, joined.splitlines())
            if line.startswith(program + " ")]


def readme_run_command(readme: str) -> list[str]:
    blocks = sh_blocks(section(readme, "Quick start"))
    assert blocks, "README.md: Quick start has no ```sh block"
    runs = [c for c in commands(blocks[0], "make") if c[:2] == ["make", "run"]]
    assert len(runs) == 1, \
        f"README.md: the first ```sh block of Quick start has no single `make run` line:\n{blocks[0]}"
    return runs[0]


def readme_curls(readme: str) -> list[list[str]]:
    """The curl commands the Quick start says `make run` prints."""
    text = section(readme, "Quick start")
    after = text[text.index("prints a curl"):] if "prints a curl" in text else text
    blocks = sh_blocks(after)
    return commands(blocks[0], "curl") if blocks else []


def readme_cli_lines(readme: str) -> list[str]:
    """The lines of the Quick start's CLI block (the one after "is the CLI"), as written."""
    text = section(readme, "Quick start")
    assert "is the CLI" in text, "README.md: Quick start no longer shows the CLI"
    blocks = sh_blocks(text[text.index("is the CLI"):])
    assert blocks, "README.md: no ```sh block after the CLI's introduction"
    lines = [line.strip() for line in re.sub(r"\\\n\s*", " ", blocks[0]).splitlines()]
    return [line for line in lines if line.startswith(".venv/bin/flowgate ")]


def printed_curls(output: str) -> list[list[str]]:
    banner = output[output.rindex("Flowgate is up."):]
    return commands(banner, "curl")


def up_defaults(clone: Path, env: dict[str, str]) -> dict[str, int]:
    """The clone's `flowgate up` port defaults (flowgate/stack.py)."""
    code = ("import argparse, json\nfrom flowgate import stack\np = argparse.ArgumentParser()\n"
            "stack.add_arguments(p)\na = p.parse_args([])\n"
            "print(json.dumps({'ambassador': a.ambassador_port, 'engine': a.engine_port,\n"
            "                  'llm': a.llm_port}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def code_origin(clone: Path, env: dict[str, str]) -> dict[str, str]:
    """Where the interpreter `flowgate up` uses imports the packages from, as it starts them
    (same interpreter, environment and working directory)."""
    code = ("import json, flowgate.cli, flowgate.stack, flow_engine.app, ambassador.app\n"
            "print(json.dumps({m.__name__: m.__file__ for m in (flowgate.cli, flowgate.stack, "
            "flow_engine.app, ambassador.app)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) of a text/event-stream body."""
    events = []
    for chunk in re.split(r"\r?\n\r?\n", text):
        lines = [line for line in chunk.splitlines() if ": " in line and not line.startswith(":")]
        fields = dict(line.split(": ", 1) for line in lines)
        if "event" in fields:
            events.append((fields["event"], fields.get("data", "")))
    return events


@pytest.fixture
def clone(tmp_path: Path, processes) -> Path:
    git = processes.tool("git", "apt-get install git")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    target = tmp_path / "flowgate"
    out = subprocess.run([git, "clone", "--quiet", str(REPO), str(target)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, f"git clone {REPO} failed:\n{out.stderr}"
    # The virtualenv `make run` would build: pip's console script for this interpreter.
    script = target / ".venv" / "bin" / "flowgate"
    script.parent.mkdir(parents=True)
    script.write_text(CONSOLE_SCRIPT.format(python=sys.executable), encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    old = time.time() - 60  # older than the venv, as after `make run` built it
    for prerequisite in ("pyproject.toml", "requirements.lock"):
        os.utime(target / prerequisite, (old, old))
    return target


def test_readme_quick_start_run_command_and_printed_curl(clone: Path, processes, tmp_path: Path):
    make = processes.tool("make", "apt-get install make")
    curl = processes.tool("curl", "apt-get install curl")
    readme = (clone / "README.md").read_text(encoding="utf-8")
    run_args = readme_run_command(readme)
    run_command = shlex.join(run_args)
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(PYTHONPATH=str(clone), PYTHONUNBUFFERED="1")

    # The clone's code runs, and make has nothing to build: it runs `flowgate up` at once.
    origin = code_origin(clone, env)
    for module in ("flowgate.cli", "flowgate.stack", "flow_engine.app", "ambassador.app"):
        assert Path(origin[module]).is_relative_to(clone), f"{module} is imported from {origin[module]}, " \
                                                           f"not from the clone {clone}"
    recipe = subprocess.run([make, "-n", *run_args[1:]], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert recipe.returncode == 0 and recipe.stdout.split("\n")[:1] == [".venv/bin/flowgate up"] \
        and not recipe.stdout.strip().count("\n"), \
        f"`{shlex.join([make, '-n', *run_args[1:]])}` in the clone should only run .venv/bin/flowgate up:\n" \
        f"{recipe.stdout}{recipe.stderr}"

    ports = up_defaults(clone, env)
    busy = sorted(p for p in ports.values() if processes.port_in_use(p))
    if busy:
        ports = {name: free_port() for name in ports}
        args = [".venv/bin/flowgate", "up", "--ambassador-port", str(ports["ambassador"]),
                "--engine-port", str(ports["engine"]), "--llm-port", str(ports["llm"])]
        warnings.warn(f"ports {busy} are in use on this machine: ran `{' '.join(args)}` (what "
                      f"`{run_command}` runs) on free ports instead of `{run_command}`", stacklevel=1)
    else:
        args = run_args
    up = processes.start(args, cwd=clone, env=env, log=tmp_path / "run.out")
    try:
        up.wait_for_output(r"^Ctrl-C stops everything\.", STARTUP_S)
        output = up.output()

        # The curl commands the banner prints, run as printed: a JSON answer, then SSE.
        curls = printed_curls(output)
        assert len(curls) == 2, f"`{run_command}` should print two curl commands:\n{output}"
        answers = []
        for command in curls:
            done = subprocess.run([curl, *command[1:], "--write-out", "\n%{http_code}"], cwd=clone,
                                  capture_output=True, text=True, timeout=60, check=False)
            body, _, status = done.stdout.rpartition("\n")
            assert done.returncode == 0 and status == "200", \
                f"{shlex.join(command)}\nexited {done.returncode} with HTTP {status}:\n" \
                f"{done.stdout}{done.stderr}"
            answers.append(body)
        plain = json.loads(answers[0])
        assert isinstance(plain.get("output"), str) and plain["output"].strip(), \
            f"{shlex.join(curls[0])}\nanswered {plain}"
        events = sse_events(answers[1])
        names = [name for name, _data in events]
        assert names[:1] == ["run_started"] and "token" in names and names[-1:] == ["run_finished"], \
            f"{shlex.join(curls[1])}\nstreamed the events {names}"
        assert json.loads(events[-1][1]).get("output"), \
            f"{shlex.join(curls[1])}\nrun_finished without an output"

        # What the README says about it: the curls it shows are the ones printed (host
        # aside), the state is in ./.flowgate/, the example flows are pushed, and
        # .venv/bin/flowgate finds the engine and the key `up` wrote.
        shown = [shlex.join(c) for c in readme_curls(readme)]
        local = [shlex.join(c).replace(f"http://127.0.0.1:{ports['ambassador']}", "localhost:8080")
                 for c in curls]
        assert shown == local, "README.md's Quick start shows other curl commands than `make run` prints:\n" \
                               "README:\n  " + "\n  ".join(shown) + "\nprinted:\n  " + "\n  ".join(local)
        key = clone / ".flowgate" / "engine.key"
        assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600, f"{key}: missing or not 0600"
        for log in ("llm-sim.log", "engine.log", "ambassador.log"):
            assert (clone / ".flowgate" / log).is_file(), f".flowgate/{log} missing"
        examples = sorted(json.loads(p.read_text(encoding="utf-8"))["id"]
                          for p in (clone / "examples").glob("*.json"))
        flows_line = re.search(r"^\s*flows\s+(.*)$", output, re.MULTILINE)
        assert flows_line and sorted(flows_line.group(1).split(", ")) == examples, \
            f"the banner should list the pushed example flows {examples}:\n{output}"
        cli_env = dict(env)
        if busy:
            cli_env["FLOWGATE_ENGINE_URL"] = f"http://127.0.0.1:{ports['engine']}"
        listed = subprocess.run([".venv/bin/flowgate", "flows", "list"], cwd=clone, env=cli_env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert listed.returncode == 0 and all(flow in listed.stdout for flow in examples), \
            f".venv/bin/flowgate flows list exited {listed.returncode}:\n{listed.stdout}{listed.stderr}"

        # Every line of the README's CLI block, in order, as written (a line may hold two
        # commands: bash -e runs it, so each must succeed), against the running stack.
        failed = []
        lines = readme_cli_lines(readme)
        assert len(lines) >= 5, f"README.md's CLI block has only {len(lines)} flowgate lines"
        for line in lines:
            done = subprocess.run(["bash", "-e", "-c", line], cwd=clone, env=cli_env,
                                  capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                failed.append(f"{line}\n  exited {done.returncode}:\n{done.stdout}{done.stderr}")
        assert not failed, "README.md's CLI lines that fail:\n" + "\n".join(failed)
    finally:
        # Ctrl-C: SIGINT to the foreground process group (make and `flowgate up`).
        code, took, survivors = up.interrupt(STOP_S)
        up.kill()
    assert not survivors, f"still running {STOP_S} s after Ctrl-C:\n" + "\n".join(map(str, survivors))
    assert code is not None, f"`{' '.join(args)}` did not exit within {STOP_S} s of Ctrl-C"
    stopped = up.output()
    assert "stopped." in stopped, f"`{' '.join(args)}` did not report a clean stop:\n{stopped[-2000:]}"
    in_use = sorted(p for p in ports.values() if processes.port_in_use(p))
    assert not in_use, f"ports {in_use} still in use after Ctrl-C"
    print(f"`{' '.join(args)}`: stopped {took:.1f} s after Ctrl-C with exit code {code}")
