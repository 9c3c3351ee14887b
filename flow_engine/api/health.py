"""Probes and metrics (no auth: the kubelet and Prometheus call these)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from flow_engine.api.common import engine
from flow_engine.errors import FlowgateError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process serves requests. Depends on nothing else."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Readiness: the store answers and the component registry is loaded."""
    eng = engine()
    checks = {"components": len(list(eng.flows.registry)) > 0}
    try:
        eng.store.ping()
        checks["store"] = True
    except FlowgateError:
        checks["store"] = False
    ready = all(checks.values())
    return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), (
        200 if ready else 503)


@bp.get("/metrics")
def metrics():
    body, content_type = engine().metrics.render()
    return Response(body, content_type=content_type)
