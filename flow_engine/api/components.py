"""``GET /api/v1/components``: every node type with its params JSON Schema, inputs, outputs."""

from __future__ import annotations

from flask import Blueprint, jsonify

from flow_engine.api.common import engine

bp = Blueprint("components", __name__)


@bp.get("/components")
def list_components():
    registry = engine().flows.registry
    return jsonify({"components": [c.describe() for c in registry]})
