"""``flowgate flows apply``: make the engine hold the flows of a directory (GitOps), and
``flowgate flows export``: write the engine's flows out as such a directory.

Declarative and idempotent, like ``kubectl apply``. A file is the desired definition of the
flow its ``id`` names (the file's stem when it has none):

- no such flow on the engine → it is created (version 1, live at once);
- the definition equals the flow's latest version → nothing changes (no new version);
- it differs → a new version; with ``--publish`` it is made live;
- with ``--publish``, a flow whose latest version equals the file but is not live has
  that version published (a run that created a version and failed before publishing it
  finishes the job when run again) — unless the engine's audit log shows that version was
  taken off live (rolled back, by hand or by the engine, or its canary aborted): then it is
  *held* and reported, like Flagger holding a failed revision until git changes, so a
  delivery job re-run never undoes a rollback; change the file to publish again;
- with ``--prune --yes``, engine flows that no file names are deleted (admin role).

Every file is validated offline, then by the engine (``POST /api/v1/flows/validate``: the
knowledge bases, provider origins and limits only it knows) before anything changes, also
under ``--dry-run``: one refused file and nothing is applied, each problem printed with its
file, exit 1 — so a CI dry run fails where the real apply would. ``--dry-run`` then prints
what would change (a diff per flow) and changes nothing. ``export DIR`` writes each
flow's latest version to ``DIR/<id>.json``; applying that directory changes nothing.

Each change's audit message is ``--message``, or else, in a git checkout, the last commit
that touched the files (``git log -1 --format='%h %s'``), so the engine's history names the
commit a version came from.

Exit codes (also ``flowgate flows apply --help``): 0 done, or nothing to do; 1 a file invalid
offline or refused by the engine (nothing applied), or the engine refused a change;
2 usage (unreadable file, two files for one flow, ``--prune`` without ``--yes``);
3 engine unreachable; 4 ``--dry-run`` found changes to make (for CI checks).
"""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PENDING = 4  # the exit code of a dry run that found something to change
MAX_GIT_MESSAGE = 200  # characters of a commit's "<sha> <subject>" kept as the message


@dataclass
class Change:
    flow_id: str
    action: str  # create | update | publish | held | delete | none
    path: Path | None = None
    definition: dict[str, Any] | None = None
    diff: str = ""
    version: int | None = None  # an existing version to publish (or held back)
    reason: str = ""  # why a version is held back


def flow_files(paths: list[Path]) -> list[Path]:
    """The JSON files named, directories contributing their ``*.json`` (not recursive)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.glob("*.json") if p.is_file())
        else:
            files.append(path)
    return files


def desired(files: list[Path], load_json, limits) -> dict[str, tuple[Path, dict[str, Any]]] | int:
    """``{flow_id: (file, definition)}``, every one valid; or an exit code after printing
    every problem of every file."""
    from flow_engine.components import default_registry
    from flow_engine.errors import FlowInvalid
    from flow_engine.flows.validate import validate_flow

    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    invalid = 0
    for path in files:
        data = load_json(path)
        try:
            flow = validate_flow(data, default_registry(), limits, flow_id=path.stem)
        except FlowInvalid as exc:
            invalid += 1
            print(f"{path}: invalid", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem.path}: {problem.message}", file=sys.stderr)
            continue
        if flow.id in found:
            print(f"flowgate: {path} and {found[flow.id][0]} both define flow '{flow.id}'",
                  file=sys.stderr)
            return 2
        found[flow.id] = (path, {**data, "id": flow.id})
    return 1 if invalid else found


def engine_refusals(client, wanted: dict[str, tuple[Path, dict[str, Any]]]) -> int:
    """Have the engine validate every file, printing each refused one's problems; how many it
    refused. Refusals that are not about a file (no key, wrong role) raise ``ApiError``."""
    from flowgate.client import ApiError

    refused = 0
    for path, definition in wanted.values():
        try:
            client.call("POST", "/flows/validate", definition)
        except ApiError as exc:
            if not exc.problems and exc.status not in (400, 413, 422):
                raise
            refused += 1
            problems = exc.problems or [{"path": "$", "message": exc.message}]
            n = len(problems)
            print(f"{path}: refused by the engine ({n} problem{'s' if n != 1 else ''})",
                  file=sys.stderr)
            for problem in problems:
                print(f"  {problem.get('path')}: {problem.get('message')}", file=sys.stderr)
    return refused


def plan(client, wanted: dict[str, tuple[Path, dict[str, Any]]], *, publish: bool,
         prune: bool) -> list[Change]:
    """What the engine needs to hold ``wanted`` (see the module docstring)."""
    from flowgate.client import ApiError

    changes: list[Change] = []
    for flow_id, (path, definition) in wanted.items():
        try:
            flow = client.call("GET", f"/flows/{flow_id}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            changes.append(Change(flow_id, "create", path, definition,
                                  _diff(None, definition, flow_id)))
            continue
        latest = client.call("GET", f"/flows/{flow_id}/versions/{flow['latest_version']}")
        stored = latest["definition"]
        mine = {**definition, "name": definition.get("name", stored.get("name"))}
        if _canonical(mine) != _canonical(stored):
            changes.append(Change(flow_id, "update", path, definition,
                                  _diff(stored, mine, flow_id)))
        elif publish and flow["live_version"] != flow["latest_version"]:
            version = flow["latest_version"]
            entries = client.call("GET", f"/flows/{flow_id}/audit?limit=200")["entries"]
            why = taken_off_live(entries, version)
            changes.append(Change(flow_id, "held" if why else "publish", path, version=version,
                                  reason=why or ""))
        else:
            changes.append(Change(flow_id, "none", path))
    if prune:
        for flow in _all_flows(client):
            if flow["id"] not in wanted:
                changes.append(Change(flow["id"], "delete"))
    return changes


_TAKEN_OFF = ("rollback", "auto_rollback")


def taken_off_live(entries: list[dict[str, Any]], version: int) -> str | None:
    """Why ``version`` must not be published again by a re-run (newest ``entries`` first, as
    the audit API lists them): a rollback away from it, or the abort of its canary, since it
    was created. None when nothing took it off live."""
    aborted: dict[str, Any] | None = None
    for entry in entries:
        if entry["action"] in _TAKEN_OFF and entry.get("from_version") == version:
            return _taken_off(entry)
        if entry["action"] == "canary_aborted" and aborted is None:
            aborted = entry
        canary = ((entry.get("routing") or {}).get("canary") or {}).get("version")
        if canary is not None and entry["action"] != "canary_aborted":
            if canary == version and aborted:
                return _taken_off(aborted)  # an abort belongs to the canary before it
            aborted = None
        if entry["action"] in ("create", "new_version") and entry.get("to_version") == version:
            return None  # its birth: nothing older can be about it
    return None


def _taken_off(entry: dict[str, Any]) -> str:
    reason = entry.get("reason") or entry.get("message")
    return (f"{entry['action']} by {entry['actor']} (audit #{entry['seq']})"
            + (f": {reason}" if reason else ""))


def execute(client, changes: list[Change], *, publish: bool) -> None:
    """Make the changes, printing one line each; the first refusal stops (ApiError)."""
    for change in changes:
        where = f"{change.path}: " if change.path else ""
        if change.action == "create":
            flow = client.call("POST", "/flows", change.definition)
            print(f"{where}flow '{flow['id']}' created (version 1, live)")
        elif change.action == "update":
            version = client.call("PUT", f"/flows/{change.flow_id}", change.definition)["version"]
            if publish:
                client.call("POST", f"/flows/{change.flow_id}/publish", {"version": version})
                print(f"{where}flow '{change.flow_id}' version {version} added and published")
            else:
                print(f"{where}flow '{change.flow_id}' version {version} added (not live; "
                      f"flowgate flows publish {change.flow_id} {version})")
        elif change.action == "publish":
            client.call("POST", f"/flows/{change.flow_id}/publish", {"version": change.version})
            print(f"{where}flow '{change.flow_id}' version {change.version} published")
        elif change.action == "delete":
            client.call("DELETE", f"/flows/{change.flow_id}")
            print(f"flow '{change.flow_id}' deleted (no file defines it)")
        elif change.action == "held":
            print(f"{where}flow '{change.flow_id}' version {change.version} held, not published: "
                  f"{change.reason}; change the file to publish a new version")
        else:
            print(f"{where}flow '{change.flow_id}' unchanged")


def show(changes: list[Change]) -> None:
    """A dry run's report: each change and its diff."""
    for change in changes:
        if change.action in ("none", "held"):
            held = f" (version {change.version} held: {change.reason})" if change.reason else ""
            print(f"{change.path}: flow '{change.flow_id}' unchanged{held}")
            continue
        what = {"create": "would be created", "update": "would get a new version",
                "publish": f"would have version {change.version} published",
                "delete": "would be deleted (no file defines it)"}[change.action]
        print(f"{(str(change.path) + ': ') if change.path else ''}flow '{change.flow_id}' {what}")
        if change.diff:
            print(change.diff, end="" if change.diff.endswith("\n") else "\n")


def git_message(paths: list[Path]) -> str | None:
    """``<short sha> <subject>`` of the last commit touching ``paths``; None outside git."""
    git = shutil.which("git")
    if git is None:
        return None
    first = paths[0] if paths[0].is_dir() else paths[0].parent
    try:
        done = subprocess.run(  # noqa: S603 - no shell; the arguments are paths
            [git, "-C", str(first), "log", "-1", "--format=%h %s", "--",
             *(str(p.resolve()) for p in paths)],
            capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    # printable and short: the engine refuses a message it could not keep (a control
    # character, thousands of characters), which would fail every re-run of a delivery job
    message = "".join(c for c in done.stdout.strip() if c.isprintable())[:MAX_GIT_MESSAGE]
    return message or None  # empty: files git does not track


def export(client, folder: Path) -> int:
    """Write each flow's latest version to ``folder/<id>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    flows = _all_flows(client)
    for flow in flows:
        version = client.call("GET", f"/flows/{flow['id']}/versions/{flow['latest_version']}")
        path = folder / f"{flow['id']}.json"
        path.write_text(json.dumps(version["definition"], indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        note = "" if flow["live_version"] == flow["latest_version"] else \
            f" (live is version {flow['live_version']})"
        print(f"{path}: flow '{flow['id']}' version {flow['latest_version']}{note}")
    if not flows:
        print("no flows on the engine")
    return 0


def _all_flows(client) -> list[dict[str, Any]]:
    flows: list[dict[str, Any]] = []
    while True:
        page = client.call("GET", f"/flows?limit=1000&offset={len(flows)}")["flows"]
        flows += page
        if len(page) < 1000:
            return flows


def _canonical(definition: dict[str, Any]) -> str:
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _diff(before: dict[str, Any] | None, after: dict[str, Any], flow_id: str) -> str:
    def lines(value):
        if value is None:
            return []
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines(True)

    return "".join(difflib.unified_diff(lines(before), lines(after),
                                        f"engine/{flow_id} (latest)", f"file/{flow_id}"))
