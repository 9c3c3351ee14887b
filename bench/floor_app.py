"""The HTTP floor for bench/engine_http.py: a bare Flask JSON endpoint served exactly like the
engine (same gunicorn config file, same gevent workers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flask import Flask, jsonify, request


def create_app() -> Flask:
    app = Flask("floor")

    @app.post("/api/v1/run/<flow>")
    def run(flow: str):
        body = request.get_json()
        return jsonify({"flow_id": flow, "output": body.get("input_value")})

    @app.get("/readyz")
    def ready():
        return jsonify({"status": "ready"})

    return app


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flowgate.common.serving import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    conf = Path(__file__).resolve().parent.parent / "flow_engine" / "gunicorn_conf.py"
    serve(create_app, host="127.0.0.1", port=args.port, workers=None, config_file=str(conf),
          proc_name="flowgate-floor")


if __name__ == "__main__":
    main()
