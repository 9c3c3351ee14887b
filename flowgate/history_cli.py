"""``flowgate flows history`` and ``flowgate flows diff``: who changed a flow, when and why,
and what changed between two of its versions (the engine's audit log and diff routes).

    flowgate flows history ID [--limit N] [--json]
    flowgate flows diff ID A B [--json]

``history`` prints one line per change, newest first: sequence number, time, actor,
action, versions, message — and for the engine's automatic actions (a canary aborted or
promoted, a publish rolled back) the figures it decided on. ``diff`` prints nodes added
(``+``), removed (``-``) and changed (``~``, each param ``from → to``), edges added and
removed, and changed top-level fields. ``--json`` prints the engine's answer as it is.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_commands(sub: Any) -> None:
    history = sub.add_parser("history", help="a flow's changes: who, when, what, why")
    history.add_argument("flow")
    history.add_argument("--limit", type=int, default=50, help="how many changes (default 50)")
    history.add_argument("--json", action="store_true", help="the engine's answer, as JSON")
    history.set_defaults(handler=_history)
    diff = sub.add_parser("diff", help="what changed between two versions of a flow")
    diff.add_argument("flow")
    diff.add_argument("a", type=int, metavar="A")
    diff.add_argument("b", type=int, metavar="B")
    diff.add_argument("--json", action="store_true", help="the engine's answer, as JSON")
    diff.set_defaults(handler=_diff)


def _history(args: argparse.Namespace) -> int:
    from flowgate.flows_cli import _client

    limit = max(1, min(args.limit, 1000))
    body = _client(args).call("GET", f"/flows/{args.flow}/audit", params={"limit": limit})
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for line in history_lines(body["entries"]):
        print(line)
    if not body["entries"]:
        print(f"no changes recorded for flow '{args.flow}'")
    return 0


def history_lines(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        versions = _versions(e.get("from_version"), e.get("to_version"))
        when = (e.get("at") or "")[:19].replace("T", " ")
        line = f"#{e['seq']:<6} {when}  {e['actor']:<16} {e['action']:<17} {versions}"
        canary = ((e.get("routing") or {}).get("canary") or {})
        if e["action"] in ("routing", "canary_step") and canary:
            line += f"  canary v{canary.get('version')} at {canary.get('percent')}%"
        if e.get("message"):
            line += f"  \"{e['message']}\""
        lines.append(line.rstrip())
        if e.get("reason"):
            lines.append("        " + _reason(e["reason"]))
    return lines


def _versions(before: int | None, after: int | None) -> str:
    if before is None and after is None:
        return ""
    if before is None:
        return f"v{after}"
    if after is None:
        return f"v{before}"
    return f"v{before} → v{after}"


def _reason(reason: dict[str, Any]) -> str:
    """The figures of an automatic action, in one line."""
    parts = []
    if reason.get("breach"):
        parts.append(f"breach: {reason['breach']}")
    for name in ("candidate", "canary", "new", "baseline", "live", "previous"):
        figures = reason.get(name)
        if isinstance(figures, dict):
            p95 = figures.get("p95_s")
            parts.append(f"{name} {figures.get('runs')} runs, {figures.get('failed')} failed "
                         f"({figures.get('error_rate', 0):.1%}), p95 "
                         + (f"{p95:g} s" if p95 is not None else "n/a"))
    return "; ".join(parts) or json.dumps(reason)


def _diff(args: argparse.Namespace) -> int:
    from flowgate.flows_cli import _client

    body = _client(args).call("GET", f"/flows/{args.flow}/diff",
                              params={"from": args.a, "to": args.b})
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    lines = diff_lines(body)
    print(f"flow '{body['flow_id']}' v{args.a} → v{args.b}"
          + ("" if lines else ": no differences"))
    for line in lines:
        print(line)
    return 0


def diff_lines(body: dict[str, Any]) -> list[str]:
    lines = [f"  field {name}: {_show(c['from'])} → {_show(c['to'])}"
             for name, c in body.get("fields", {}).items()]
    nodes = body["nodes"]
    lines += [f"+ node {n['id']} ({n['type']})" for n in nodes["added"]]
    lines += [f"- node {n['id']} ({n['type']})" for n in nodes["removed"]]
    for n in nodes["changed"]:
        lines.append(f"~ node {n['id']}")
        if "type" in n:
            lines.append(f"    type: {n['type']['from']} → {n['type']['to']}")
        for param, c in (n.get("params") or {}).items():
            lines.append(f"    {param}: {_show(c['from'])} → {_show(c['to'])}")
    lines += [f"+ edge {_edge(e)}" for e in body["edges"]["added"]]
    lines += [f"- edge {_edge(e)}" for e in body["edges"]["removed"]]
    return lines


def _edge(e: dict[str, Any]) -> str:
    source = e["source"] + (f".{e['source_output']}" if e.get("source_output") else "")
    target = e["target"] + (f".{e['target_input']}" if e.get("target_input") else "")
    return f"{source} → {target}"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."
