"""``flowgate flows canary``: start, change or stop a flow's canary from a shell — what an SRE
used to Argo Rollouts does with ``kubectl argo rollouts``, over the engine's routing route.

    flowgate flows canary ID VERSION (--percent P | --steps 5,25,50,100) [--step-after-s S]
                          [--max-error-rate R] [--max-latency-ratio X] [--min-runs N]
                          [--window-s S] [--dry-run] [-m TEXT]
    flowgate flows canary ID --stop [-m TEXT]

The routing is read first and the flow's ``sticky_key`` kept (``PUT .../routing`` replaces
the whole routing: a canary started without it would silently stop sticky sessions).
``--steps`` or any guard option makes the canary guarded: the engine's rollout controller
then walks the steps every ``--step-after-s`` (starting at the first unless ``--percent``
says otherwise) and aborts on a breach (docs/design.md, "Hot updates"); guard values the
command leaves out take the engine's defaults. ``--dry-run`` asks the
engine whether the version builds and changes nothing. Prints the flow's routing after the
change and the audit entry it wrote.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any


def finite(text: str) -> float:
    """A number argument; NaN and infinities are not numbers the engine takes (JSON has none)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


GUARD_OPTIONS = {  # name: (type, help); the engine's defaults where left out
    "max_error_rate": (finite, "guard: abort when the canary fails more often (default 0.05)"),
    "max_latency_ratio": (finite, "guard: abort when its p95 is this × live's (default 2.0)"),
    "min_runs": (int, "guard: judge only after this many canary runs (default 20)"),
    "window_s": (finite, "guard: judge the last this many seconds (default 300)"),
}


def add_command(sub: Any) -> None:
    canary = sub.add_parser("canary", help="start, change or stop a flow's canary (publisher)")
    canary.add_argument("flow")
    canary.add_argument("version", type=int, nargs="?", default=None,
                        help="the canary's version (omit with --stop)")
    canary.add_argument("--percent", type=finite, default=None,
                        help="share of runs sent to it, 0-100 (default: the first step)")
    canary.add_argument("--stop", action="store_true", help="end the canary: live only")
    canary.add_argument("--steps", default=None,
                        help="percents to walk, e.g. 5,25,50,100 (a guarded canary)")
    canary.add_argument("--step-after-s", type=finite, default=None,
                        help="seconds at each step (engine default 60)")
    for name, (kind, text) in GUARD_OPTIONS.items():
        canary.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    canary.add_argument("--dry-run", action="store_true",
                        help="check that it would go live; change nothing")
    canary.add_argument("-m", "--message", default=None,
                        help="why: kept with the change in the audit log")
    canary.set_defaults(handler=_canary)


def routing_body(args: argparse.Namespace, current: dict[str, Any]) -> dict[str, Any]:
    """The routing to PUT: the canary asked for (or none), the flow's sticky key kept.
    ValueError says what is wrong with the arguments."""
    kept = {"sticky_key": current.get("sticky_key")} if current.get("sticky_key") else {}
    if args.stop:
        if args.version is not None or args.percent is not None:
            raise ValueError("--stop takes no VERSION nor --percent")
        return {"canary": None, **kept}
    if args.version is None or (args.percent is None and args.steps is None):
        raise ValueError("give VERSION and --percent or --steps (or --stop)")
    canary: dict[str, Any] = {"version": args.version}
    if args.percent is not None:  # else the first step's
        canary["percent"] = args.percent
    guard = {name: getattr(args, name) for name in GUARD_OPTIONS
             if getattr(args, name) is not None}
    if args.steps is not None:
        try:
            canary["steps"] = [finite(p) for p in args.steps.split(",")]
        except ValueError:
            raise ValueError("--steps is a comma-separated list of percents, e.g. 5,25,50,100"
                             ) from None
    if args.step_after_s is not None:
        canary["step_after_s"] = args.step_after_s
    if guard:  # else, with steps, the engine's default guard
        canary["guard"] = guard
    return {"canary": canary, **kept}


def _canary(args: argparse.Namespace) -> int:
    from flowgate.flows_cli import _client

    try:
        routing_body(args, {})  # the arguments, checked before the engine is called
    except ValueError as exc:
        print(f"flowgate: {exc}", file=sys.stderr)
        return 2
    client = _client(args)
    body = routing_body(args, client.call("GET", f"/flows/{args.flow}").get("routing") or {})
    if args.dry_run:
        body["dry_run"] = True
    answer = client.call("PUT", f"/flows/{args.flow}/routing", body)
    if args.dry_run:
        print(f"flow '{args.flow}': the change would be accepted (nothing changed)")
        return 0
    print(describe(answer))
    entry = answer.get("audit")
    if entry:
        print(f"audit #{entry['seq']}: {entry['action']} by {entry['actor']}"
              + (f" \"{entry['message']}\"" if entry.get("message") else ""))
    return 0


def describe(flow: dict[str, Any]) -> str:
    canary = (flow.get("routing") or {}).get("canary")
    line = f"flow '{flow['id']}': live v{flow.get('live_version')}"
    if not canary:
        return line + ", no canary"
    line += f", canary v{canary['version']} at {canary['percent']:g}%"
    if canary.get("steps"):
        steps = "→".join(f"{p:g}" for p in canary["steps"])
        line += f" (steps {steps} every {canary.get('step_after_s', 60):g} s)"
    if canary.get("guard") is not None:
        line += ", guarded"
    return line
