"""Fault drills, like Envoy's fault filter: delays and aborts injected in front of the engine,
so a team can watch its app (and the ambassador's retry, breaker and fallback) meet a slow
or failing engine on purpose.

Off by default: without configuration this filter passes every request on untouched.

- **Per flow**, in the config (``flows.<flow_id>.fault``, hot-reloaded)::

      flows:
        faq-rag:
          fault: {delay: {percent: 10, ms: 800}, abort: {percent: 5, status: 503}}

  ``percent`` is 0-100 (a float: 0.5 is one attempt in 200), ``ms`` 0-60000, ``status``
  400-599. Each attempt draws anew (the delay first, then the abort), and only
  ``POST /run-flow`` requests of that flow are concerned.
- **Per request**, with the header ``X-Flowgate-Fault: delay=500;abort=503`` (or
  ``delay=500``, or ``abort=503``), on every proxied route (``/run-flow`` and
  ``/runs/{id}/events``; not WebSocket messages), applied to every attempt at 100 %
  instead of the flow's configured fault. Only callers the config allows may send it: an
  API key with ``allow_fault_header: true``, or in ``jwt`` mode an identity listed in
  ``inbound_auth.jwt.fault_header_identities``. Anyone else — and every caller with
  inbound auth ``none``, which knows no identity — is refused 403 ``fault_not_allowed``.
  The value is parsed strictly: at most 64 characters, ``;``-separated ``delay=<ms>`` and
  ``abort=<status>`` (ASCII digits, no sign or leading zero; each at most once; spaces
  around a part are allowed); anything else, or a value out of range, is 400
  ``bad_request``.

Where it sits: last in the chain, just before the upstream (``... retry, timeout, fault``;
the config refuses it anywhere else). So

- an injected **abort** is answered as the engine would — ``{"error": {"code":
  "fault_injected", ...}}`` with the status asked for (503 and 429 with ``Retry-After: 1``,
  as the engine's) and ``meta["engine_answered"]`` — which the breaker counts (500/503/504;
  a config fault only: a header's fault is that caller's own and never counted, or one
  caller allowed to drill could open the circuit for every app behind the sidecar)
  and retry (503 with ``Retry-After``) and fallback act on exactly as on a real answer;
- an injected **delay** happens inside the attempt, after the timeout filter set its
  deadlines: it uses up the attempt's per-try (for a stream, first-byte) limit, what is
  left goes to the engine, and a delay as long as that limit is the upstream's own 504
  ``upstream_timeout`` (``meta["upstream_error"] = "timeout"``), retried like one. The
  delay is counted as upstream time, not as the ambassador's overhead.

A request another filter answers first (an open breaker, a rate limit) meets no fault,
and its header is not looked at; a request with the header is never answered from the
cache nor coalesced with others (ambassador/filters/cache.py). Each injected fault is counted in
``flowgate_ambassador_faults_injected_total{flow, kind}`` (``kind`` = delay | abort), noted
on the request's span, and logged (one warning line per attempt, with the trace id). The
sleep and the random draw are injected (``sleep``, ``rand``) so tests never wait.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ambassador.chain import Handler, Request, Response, error_response, note
from ambassador.config import FAULT_MAX_DELAY_MS, FAULT_STATUSES, FlowFault, InboundAuth, Settings

log = logging.getLogger(__name__)
HEADER = "x-flowgate-fault"
MAX_HEADER_CHARS = 64
_NUMBER = re.compile(r"0|[1-9][0-9]{0,5}")  # no sign, no leading zero
_RETRY_AFTER = frozenset({429, 503})  # the engine says when to come back with these
_UNSET = object()


class BadFaultHeader(ValueError):
    """The X-Flowgate-Fault value is malformed or out of range; the message says how."""


@dataclass(frozen=True)
class Injection:
    """What to do to one attempt: a delay (ms) and/or an abort (status)."""

    delay_ms: int | None = None
    abort_status: int | None = None


def parse_header(value: str) -> Injection:
    """``delay=500;abort=503`` (either part alone, in either order) → Injection; strict."""
    if len(value) > MAX_HEADER_CHARS:
        raise BadFaultHeader(f"at most {MAX_HEADER_CHARS} characters")
    if not value.strip():
        raise BadFaultHeader("empty; send delay=<ms>, abort=<status>, or both: delay=500;abort=503")
    seen: dict[str, int] = {}
    for part in value.split(";"):
        key, equals, number = part.strip().partition("=")
        if key not in ("delay", "abort"):
            raise BadFaultHeader(f"unknown part {part.strip()[:20]!r}; send delay=<ms>, "
                                 "abort=<status>, or both: delay=500;abort=503")
        if not equals or _NUMBER.fullmatch(number) is None:
            raise BadFaultHeader(f"{key} must be {key}=<{'ms' if key == 'delay' else 'status'}>"
                                 " in ASCII digits, without sign or leading zero")
        if key in seen:
            raise BadFaultHeader(f"{key} is given twice")
        seen[key] = int(number)
    delay, abort = seen.get("delay"), seen.get("abort")
    if delay is not None and delay > FAULT_MAX_DELAY_MS:
        raise BadFaultHeader(f"delay is at most {FAULT_MAX_DELAY_MS} ms")
    if abort is not None and abort not in FAULT_STATUSES:
        raise BadFaultHeader(f"abort must be a status from {FAULT_STATUSES.start} to "
                             f"{FAULT_STATUSES.stop - 1}")
    return Injection(delay, abort)


def header_identities(auth: InboundAuth) -> frozenset[str]:
    """The identities that may send X-Flowgate-Fault (none in mode none)."""
    if auth.mode == "api_keys":
        return frozenset(k.identity for k in auth.api_keys if k.allow_fault_header)
    if auth.mode == "jwt" and auth.jwt is not None:
        return frozenset(auth.jwt.fault_header_identities)
    return frozenset()


class Fault:
    name = "fault"

    def __init__(self, settings: Settings, *,
                 on_fault: Callable[[str | None, str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self._timeouts = settings.upstream.timeouts
        self._flows: dict[str, FlowFault] = {
            flow: policy.fault for flow, policy in settings.flows.items() if policy.fault}
        self._allowed = header_identities(settings.inbound_auth)
        self._on_fault = on_fault or (lambda flow, kind: None)
        self._sleep, self._rand = sleep, rand

    def __call__(self, request: Request, next: Handler) -> Response:
        raw = request.headers.get(HEADER)
        if raw is not None:
            identity = request.ctx.get("identity")
            if identity is None or identity.name not in self._allowed:
                who = f"'{identity.name}'" if identity is not None else "a caller without identity"
                return error_response(403, "fault_not_allowed",
                                      f"{who} may not send X-Flowgate-Fault", request)
            try:
                injection = parse_header(raw)
            except BadFaultHeader as exc:
                return error_response(400, "bad_request", f"X-Flowgate-Fault: {exc}", request)
            source = "header"
        else:
            fault = self._flows.get(request.flow_id or "") if self._flows else None
            if fault is None or request.route != "/run-flow":
                return next(request)
            injection = self._draw(fault)
            source = "config"
        if not injection.delay_ms and injection.abort_status is None:
            return next(request)
        return self._inject(request, next, injection, source)

    def _draw(self, fault: FlowFault) -> Injection:
        delay = fault.delay.ms if fault.delay and self._hit(fault.delay.percent) else None
        abort = fault.abort.status if fault.abort and self._hit(fault.abort.percent) else None
        return Injection(delay, abort)

    def _hit(self, percent: float) -> bool:
        return percent >= 100 or (percent > 0 and self._rand() * 100 < percent)

    def _inject(self, request: Request, next: Handler, injection: Injection,
                source: str) -> Response:
        identity = request.ctx.get("identity")
        log.warning("fault injected", extra={
            "fault_source": source, "route": request.route, "flow_id": request.flow_id,
            "delay_ms": injection.delay_ms or None, "abort_status": injection.abort_status,
            "attempt": request.ctx.get("attempt", 1),
            "identity": identity.name if identity is not None else None})
        note(request, "fault_injected", **{
            "flowgate.fault.source": source, "flowgate.fault.delay_ms": injection.delay_ms or 0,
            "flowgate.fault.abort_status": injection.abort_status or 0})
        left = None
        if injection.delay_ms:
            self._on_fault(request.flow_id, "delay")
            budget = self._budget(request)
            seconds = injection.delay_ms / 1000
            slept = min(seconds, budget)
            self._sleep(slept)
            request.ctx["upstream_s"] = request.ctx.get("upstream_s", 0.0) + slept
            if seconds >= budget:
                return self._marked(self._timed_out(request, budget, seconds), source)
            left = budget - slept
        if injection.abort_status is not None:
            self._on_fault(request.flow_id, "abort")
            return self._marked(self._abort(request, injection.abort_status), source)
        return next(request) if left is None else self._send(request, next, left)

    @staticmethod
    def _marked(response: Response, source: str) -> Response:
        """Where the fault came from: the breaker counts the config's faults (the platform
        team's drill of the whole sidecar) but not a header's — one caller allowed to drill
        must not open the circuit for every app behind this sidecar."""
        response.meta["fault_source"] = source
        return response

    def _budget(self, request: Request) -> float:
        """The attempt's limit a delay uses up, as upstream.py reads it."""
        per_try = request.ctx.get("per_try_s", self._timeouts.per_try_s)
        return min(self._timeouts.stream_first_byte_s, per_try) if request.stream else per_try

    @staticmethod
    def _send(request: Request, next: Handler, left: float) -> Response:
        """The attempt goes upstream with what the delay left of its limit."""
        before = request.ctx.get("per_try_s", _UNSET)
        request.ctx["per_try_s"] = left
        try:
            return next(request)
        finally:  # the next attempt's limit is the timeout filter's (or the default) again
            if before is _UNSET:
                request.ctx.pop("per_try_s", None)
            else:
                request.ctx["per_try_s"] = before

    @staticmethod
    def _timed_out(request: Request, budget: float, seconds: float) -> Response:
        """A delay as long as the attempt's limit: the upstream's own timeout answer."""
        response = error_response(
            504, "upstream_timeout", f"the flow engine did not answer within {budget:g} s "
            f"(an injected delay of {seconds * 1000:g} ms)", request)
        response.meta.update(upstream_error="timeout", sent=True, fault="delay",
                             upstream_s=request.ctx["upstream_s"])
        return response

    @staticmethod
    def _abort(request: Request, status: int) -> Response:
        response = error_response(
            status, "fault_injected", f"a fault drill answered {status} instead of the flow "
            "engine (flows.<id>.fault in the ambassador config, or X-Flowgate-Fault)", request,
            headers={"Retry-After": "1"} if status in _RETRY_AFTER else None)
        # an engine answer of this status for retry, breaker and fallback (no X-Run-ID)
        response.meta.update(engine_answered=True, fault="abort",
                             upstream_s=request.ctx.get("upstream_s", 0.0))
        return response
