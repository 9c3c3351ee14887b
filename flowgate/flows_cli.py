"""``flowgate flows``: the engine API from a shell.

    flowgate flows push FILE... [--publish]   create, or add a version (published with --publish)
    flowgate flows apply PATH... [--publish] [--dry-run] [--prune --yes]
                                             make the engine hold these flows (see apply.py)
    flowgate flows export DIR                write every flow's latest version to DIR/<id>.json
    flowgate flows list
    flowgate flows versions ID
    flowgate flows publish ID [VERSION]      (default: the latest version)
    flowgate flows rollback ID
    flowgate flows history ID [--limit N]    who changed the flow, when, what, why (history_cli.py)
    flowgate flows diff ID A B               what changed between versions A and B
    flowgate flows canary ID VERSION --percent P [--steps ...] [guard options] | ID --stop
                                             start, change or stop a canary (canary_cli.py)
    flowgate flows run ID --input TEXT [--session S] [--stream]
    flowgate flows validate FILE...          offline, the same messages as the API
    flowgate flows import FILE [--publish] [--id ID] [--dry-run]
                                             a LangFlow export as a flow (import_cli.py)

Engine URL: --engine-url or FLOWGATE_ENGINE_URL (default http://127.0.0.1:8000), given before
or after the command (``flowgate flows apply flows/ --engine-url URL``). Key:
--api-key, FLOWGATE_API_KEY, the admin key of FLOW_ENGINE_API_KEYS (else its highest role),
or the admin key `flowgate up` wrote to .flowgate/engine.key.
Commands that change a flow (push, apply, publish, rollback, canary, import) take ``-m/--message
TEXT``: why, kept with the change in the audit log (``flowgate flows history``); ``apply``
in a git checkout defaults to the last commit of its files.
Exit codes (also in each command's ``--help``): :data:`EXIT_CODES`, :data:`APPLY_EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_CODES = """exit codes:
  0  done
  1  the engine refused (invalid flow, unknown id, wrong role, run failed)
  2  usage: bad arguments, an unreadable or non-JSON file
  3  the engine is unreachable"""
APPLY_EXIT_CODES = """exit codes:
  0  done, or nothing to do (--dry-run: the engine already holds these flows)
  1  a file is invalid offline or refused by the engine (nothing was applied), or the
     engine refused a change (wrong role, a conflict)
  2  usage: an unreadable or non-JSON file, two files for one flow, --prune without --yes
  3  the engine is unreachable
  4  --dry-run: something would change (CI: `flowgate flows apply DIR --dry-run || [ $? -eq 4 ]`)"""
VALIDATE_EXIT_CODES = """exit codes:
  0  every file is valid
  1  a file is invalid (each problem is printed at its path)
  2  an unreadable or non-JSON file"""
_RAW = argparse.RawDescriptionHelpFormatter


def add_commands(flows: argparse.ArgumentParser) -> None:
    flows.epilog, flows.formatter_class = EXIT_CODES + "\n  4  apply --dry-run: something " \
        "would change (see flowgate flows apply --help)", _RAW
    flows.add_argument("--engine-url", default=None, help="default: FLOWGATE_ENGINE_URL or :8000")
    flows.add_argument("--api-key", default=None, help="default: FLOWGATE_API_KEY, ...")
    sub = flows.add_subparsers(title="flows commands", metavar="COMMAND")
    push = sub.add_parser("push", help="create a flow, or add a version to it")
    push.add_argument("files", nargs="+", type=Path)
    push.add_argument("--publish", action="store_true", help="make the new version live")
    _message_option(push)
    push.set_defaults(handler=_push)
    apply = sub.add_parser("apply", help="make the engine hold the flows of files or "
                                         "directories (idempotent)",
                           description="Validate every file offline and on the engine, "
                                       "then create, version, publish or (--prune)\ndelete "
                                       "flows until the engine holds what the files define.",
                           epilog=APPLY_EXIT_CODES, formatter_class=_RAW)
    apply.add_argument("paths", nargs="+", type=Path, help="flow files, or directories of them")
    apply.add_argument("--publish", action="store_true", help="make each applied version live")
    apply.add_argument("--dry-run", action="store_true",
                       help="print what would change and exit 4 if anything would")
    apply.add_argument("--prune", action="store_true",
                       help="delete engine flows no file defines (admin key; needs --yes)")
    apply.add_argument("--yes", action="store_true", help="confirm --prune")
    _message_option(apply)
    apply.set_defaults(handler=_apply)
    export = sub.add_parser("export", help="write every flow's latest version to DIR/<id>.json")
    export.add_argument("folder", type=Path, metavar="DIR")
    export.set_defaults(handler=_export)
    sub.add_parser("list", help="list flows").set_defaults(handler=_list)
    versions = sub.add_parser("versions", help="list a flow's versions")
    versions.add_argument("flow")
    versions.set_defaults(handler=_versions)
    publish = sub.add_parser("publish", help="make a version live (default: the latest)")
    publish.add_argument("flow")
    publish.add_argument("version", type=int, nargs="?", default=None)
    _message_option(publish)
    publish.set_defaults(handler=_publish)
    rollback = sub.add_parser("rollback", help="go back to the previously live version")
    rollback.add_argument("flow")
    _message_option(rollback)
    rollback.set_defaults(handler=_rollback)
    from flowgate import history_cli

    history_cli.add_commands(sub)
    from flowgate import canary_cli

    canary_cli.add_command(sub)
    run = sub.add_parser("run", help="run a flow")
    run.add_argument("flow")
    run.add_argument("--input", required=True)
    run.add_argument("--session", default=None)
    run.add_argument("--version", type=int, default=None)
    run.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    run.set_defaults(handler=_run)
    validate = sub.add_parser("validate", help="validate flow files offline")
    validate.add_argument("files", nargs="+", type=Path)
    validate.set_defaults(handler=_validate, offline=True)
    from flowgate import import_cli

    import_cli.add_command(sub)
    for command in sub.choices.values():
        _engine_options_after(command)


def _engine_options_after(command: argparse.ArgumentParser) -> None:
    """``--engine-url``/``--api-key`` after the command too, and exit codes in its help.
    SUPPRESS: given only before the command, the ``flows`` parser's value stands."""
    if command.epilog is None:
        offline = command.get_default("offline")
        command.epilog = VALIDATE_EXIT_CODES if offline else EXIT_CODES
        command.formatter_class = _RAW
    if command.get_default("offline"):
        return
    command.add_argument("--engine-url", default=argparse.SUPPRESS,
                         help="default: FLOWGATE_ENGINE_URL or :8000")
    command.add_argument("--api-key", default=argparse.SUPPRESS,
                         help="default: FLOWGATE_API_KEY, ...")


def _message_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--message", default=None,
                        help="why: kept with the change in the audit log")


def dispatch(args: argparse.Namespace) -> int:
    from flowgate.client import ApiError, Unreachable  # lazily: `flowgate engine` must not load requests

    try:
        return args.handler(args)
    except Unreachable as exc:
        print(f"flowgate: {exc}", file=sys.stderr)
        return 3
    except ApiError as exc:
        if exc.problems:  # the message summarises the first problem: print each one once
            n = len(exc.problems)
            print(f"flowgate: {exc.status} {exc.code}: {n} problem{'s' if n > 1 else ''}:",
                  file=sys.stderr)
        else:
            print(f"flowgate: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem.get('path')}: {problem.get('message')}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace):
    from flow_engine.auth import KeyConfigError
    from flowgate.client import EngineClient, resolve_key

    try:
        key = resolve_key(args.api_key)
    except KeyConfigError as exc:
        print(f"flowgate: FLOW_ENGINE_API_KEYS: {exc}; or give the key with --api-key or "
              "FLOWGATE_API_KEY", file=sys.stderr)
        raise SystemExit(2) from None
    return EngineClient(args.engine_url, key, message=getattr(args, "message", None))


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"flowgate: cannot read {path}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"flowgate: {path} is not valid JSON: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _push(args) -> int:
    client = _client(args)
    for path in args.files:
        flow_id, version, created = client.push(load_json(path), args.publish)
        what = "created" if created else ("published" if args.publish else "added (not live)")
        print(f"{path}: flow '{flow_id}' version {version} {what}")
    return 0


def _list(args) -> int:
    flows = _client(args).call("GET", "/flows")["flows"]
    if not flows:
        print("no flows")
    for f in flows:
        print(f"{f['id']:<28} live v{f['live_version']}  latest v{f['latest_version']}  {f['name']}")
    return 0


def _versions(args) -> int:
    body = _client(args).call("GET", f"/flows/{args.flow}/versions")
    for v in body["versions"]:
        print(f"v{v['version']:<4} {'live' if v['live'] else '    '}  {v['created_at']}")
    return 0


def _publish(args) -> int:
    client = _client(args)
    version = args.version or client.call("GET", f"/flows/{args.flow}")["latest_version"]
    flow = client.call("POST", f"/flows/{args.flow}/publish", {"version": version})
    print(f"flow '{flow['id']}' now serves version {flow['live_version']}")
    return 0


def _rollback(args) -> int:
    flow = _client(args).call("POST", f"/flows/{args.flow}/rollback")
    print(f"flow '{flow['id']}' rolled back to version {flow['live_version']}")
    return 0


def _run(args) -> int:
    body = {"input_value": args.input, "session_id": args.session, "version": args.version}
    body = {k: v for k, v in body.items() if v is not None}
    client = _client(args)
    if not args.stream:
        result = client.call("POST", f"/run/{args.flow}", body)
        print(result["output"])
        return 0
    status, printed = 1, False
    for kind, data in client.stream_run(args.flow, body):
        if kind == "token":
            print(data["text"], end="", flush=True)
            printed = True
        elif kind == "run_finished":
            print() if printed else print(data["output"])
            status = 0
        elif kind == "error":
            print(f"\nflowgate: run failed: {data.get('code')}: {data.get('message')}",
                  file=sys.stderr)
    return status


def _apply(args) -> int:
    from flowgate import apply

    files = apply.flow_files(args.paths)
    if not files:
        print("flowgate: no flow files (*.json) in " + ", ".join(map(str, args.paths)),
              file=sys.stderr)
        return 2
    if args.prune and not args.yes and not args.dry_run:
        print("flowgate: --prune deletes every engine flow no file defines; add --yes to "
              "confirm (or try --dry-run first)", file=sys.stderr)
        return 2
    wanted = apply.desired(files, load_json, offline_limits())
    if isinstance(wanted, int):
        return wanted
    if args.message is None:  # from a git checkout: the commit that last touched the flows
        args.message = apply.git_message(args.paths)
    client = _client(args)
    if apply.engine_refusals(client, wanted):
        return 1
    changes = apply.plan(client, wanted, publish=args.publish, prune=args.prune)
    if args.dry_run:
        apply.show(changes)
        return apply.PENDING if any(c.action not in ("none", "held") for c in changes) else 0
    apply.execute(client, changes, publish=args.publish)
    return 0


def _export(args) -> int:
    from flowgate import apply

    return apply.export(_client(args), args.folder)


def offline_limits():
    """The engine's size limits from this environment; provider origins are not checked
    offline (only the engine knows which it allows)."""
    from flow_engine.components.base import Limits
    from flow_engine.config import ConfigError, Settings

    try:
        s = Settings.load()
    except ConfigError as exc:
        print(f"flowgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return Limits(s.max_nodes, s.max_edges, s.max_template_chars, s.max_definition_bytes)


def _validate(args) -> int:
    from flow_engine.components import default_registry
    from flow_engine.errors import FlowInvalid
    from flow_engine.flows.validate import validate_flow

    limits = offline_limits()
    status = 0
    for path in args.files:
        data = load_json(path)
        try:
            flow = validate_flow(data, default_registry(), limits, flow_id=path.stem)
        except FlowInvalid as exc:
            status = 1
            n = len(exc.problems)
            print(f"{path}: invalid ({n} problem{'s' if n != 1 else ''})")
            for problem in exc.problems:
                print(f"  {problem.path}: {problem.message}")
            continue
        print(f"{path}: valid — flow '{flow.id}', {len(flow.nodes)} nodes, {len(flow.edges)} edges")
    return status
