"""The floor for bench/ambassador.py: the least a Python sidecar on the ambassador's stack can
add. A bare WSGI callable (no Flask, no filters, no metrics, no logs) that forwards
``POST /run-flow`` to the engine over the ambassador's own HTTP/1.1 client
(``ambassador.http1``), served exactly like the ambassador (its gunicorn config file, one
gevent worker, ``flowgate.common.serving``). What the ambassador adds beyond this is the cost of
its features; what this adds over the engine is the cost of the stack itself.

    python bench/proxy_floor.py --port P --engine-port E --key K
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def create_app(engine_port: int, key: str):
    from ambassador import http1

    pool = http1.Pool("http", "127.0.0.1", engine_port)
    upstream_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/run-flow":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        upstream_body = json.dumps({"input_value": body.get("input")}).encode()
        response = pool.request("POST", f"/api/v1/run/{body['flow_id']}", upstream_headers,
                                upstream_body, connect_timeout=2, read_timeout=60)
        data = response.read()
        start_response(f"{response.status} -", [
            ("Content-Type", response.header("content-type") or "application/json"),
            ("Content-Length", str(len(data)))])
        return [data]

    return app


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flowgate.common.serving import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    conf = Path(__file__).resolve().parent.parent / "ambassador" / "gunicorn_conf.py"
    serve(lambda: create_app(args.engine_port, args.key), host="127.0.0.1", port=args.port,
          workers=None, config_file=str(conf), proc_name="flowgate-proxy-floor")


if __name__ == "__main__":
    main()
