"""``flowgate flows import FILE.json``: a LangFlow export becomes a Flowgate flow on the
engine (``POST /api/v1/flows/import``; nothing in the export is ever executed).

    flowgate flows import FILE.json [--publish] [--id ID] [--message TEXT] [--dry-run]

It prints what became of each LangFlow node (the Flowgate node(s) it became, or why it was
dropped), the warnings (keys and custom code left out, …), then the flow and version. With
``--id`` naming an existing flow the import is a new version of it (live with
``--publish``, which needs the publisher role). ``--dry-run`` translates and validates here,
with this installation's node types, without an engine (provider origins and knowledge
bases are the engine's to check). Exit codes as ``flowgate flows``: 1 when the export cannot
be imported (every problem is printed, at its path in the file, ``$.flow`` being the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO


def add_command(sub: Any) -> None:
    imp = sub.add_parser("import", help="import a LangFlow export (its code is never run)")
    imp.add_argument("file", type=Path, help="a LangFlow flow export (.json)")
    imp.add_argument("--format", default="langflow", choices=["langflow"])
    imp.add_argument("--id", dest="flow_id", default=None,
                     help="add a version to this flow (or create it with this id)")
    imp.add_argument("--publish", action="store_true", help="make the new version live")
    imp.add_argument("--message", default=None, help="why (shown in the answer and the log)")
    imp.add_argument("--dry-run", action="store_true",
                     help="translate and validate offline; store nothing")
    imp.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from flowgate.flows_cli import _client, load_json

    export = load_json(args.file)
    if args.dry_run:
        return _dry_run(args.file, export)
    body: dict[str, Any] = {"format": args.format, "flow": export, "publish": args.publish}
    if args.flow_id:
        body["id"] = args.flow_id
    if args.message:
        body["message"] = args.message
    result = _client(args).call("POST", "/flows/import", body)
    print_report(result["report"], sys.stdout)
    flow, version = result["flow"], result["version"]
    what = ("created" if version == 1 and flow["latest_version"] == 1 else
            "added and published" if result["live"] else "added (not live)")
    print(f"{args.file}: flow '{flow['id']}' version {version} {what}")
    return 0


def _dry_run(path: Path, export: Any) -> int:
    from flow_engine.components import default_registry
    from flow_engine.errors import FlowInvalid
    from flow_engine.flows.validate import validate_flow
    from flow_engine.interop.langflow import LangFlowImportError, translate
    from flowgate.flows_cli import offline_limits

    registry = default_registry()
    try:
        translation = translate(export, registry)
        try:
            validate_flow(translation.definition, registry, offline_limits(), flow_id="dry-run")
        except FlowInvalid as exc:
            raise LangFlowImportError(translation.locate(exc.problems), []) from None
    except LangFlowImportError as exc:
        n = len(exc.problems)
        print(f"{path}: cannot be imported ({n} problem{'s' if n != 1 else ''})")
        for problem in exc.problems:
            print(f"  {problem.path}: {problem.message}")
        return 1
    print_report(translation.report, sys.stdout)
    nodes = translation.definition["nodes"]
    print(f"{path}: valid — would become {len(nodes)} Flowgate nodes (nothing was stored)")
    return 0


def print_report(report: dict[str, Any], out: TextIO) -> None:
    for node in report["nodes"]:
        name = f"{node['langflow_id']} ({node['langflow_type']})"
        if node["flowgate"]:
            made = ", ".join(f"{f['type']} '{f['id']}'" for f in node["flowgate"])
            print(f"  {name} → {made}", file=out)
        else:
            print(f"  {name} {node['status']}: {node.get('reason') or ''}", file=out)
    for warning in report["warnings"]:
        print(f"  warning: {warning['message']}", file=out)
