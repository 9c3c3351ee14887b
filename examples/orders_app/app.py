"""Orders: a tiny business app that answers customer questions through its Flowgate sidecar.

It knows one address, ``http://localhost:8080`` — the ambassador in the same pod (Kubernetes)
or network namespace (docker compose) — and never the engine's address or API key. Retries,
timeouts, the circuit breaker, caching and metrics are the sidecar's job, not this app's.

    gunicorn --bind 0.0.0.0:5000 --worker-class gevent --chdir examples orders_app.app:app

    curl -s localhost:5000/faq -H 'Content-Type: application/json' \\
         -d '{"question": "How long do refunds take?"}'
    curl -s localhost:5000/orders/1001/help -H 'Content-Type: application/json' \\
         -d '{"message": "I want my money back"}'
"""

from __future__ import annotations

import os

import requests
from flask import Flask, jsonify, request

ORDERS = {
    "1001": {"item": "espresso machine", "status": "delivered"},
    "1002": {"item": "coffee grinder", "status": "shipped"},
}


def create_app(ambassador_url: str | None = None) -> Flask:
    app = Flask("orders_app")
    run_flow = (ambassador_url or os.environ.get("AMBASSADOR_URL", "http://localhost:8080")) + "/run-flow"
    http = requests.Session()

    def ask(flow_id: str, text: str, session_id: str | None = None):
        try:
            resp = http.post(run_flow, json={"flow_id": flow_id, "input": text, "session_id": session_id},
                             timeout=130)  # the sidecar's own total timeout is 120 s
        except requests.RequestException as exc:
            return jsonify({"error": f"the Flowgate sidecar is unreachable: {exc}"}), 503
        trace = {"trace_id": resp.headers.get("X-Trace-ID"), "cache": resp.headers.get("X-Cache")}
        if resp.status_code != 200:  # the sidecar's JSON error, passed on with its status
            return jsonify({**resp.json(), **trace}), resp.status_code
        return jsonify({"answer": resp.json().get("output"), **trace})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/faq")
    def faq():
        question = (request.get_json(silent=True) or {}).get("question")
        if not question:
            return {"error": "send {\"question\": \"...\"}"}, 400
        return ask("faq-rag", question)

    @app.post("/orders/<order_id>/help")
    def order_help(order_id: str):
        order = ORDERS.get(order_id)
        message = (request.get_json(silent=True) or {}).get("message")
        if order is None:
            return {"error": f"no order {order_id}"}, 404
        if not message:
            return {"error": "send {\"message\": \"...\"}"}, 400
        text = f"Order {order_id} ({order['item']}, {order['status']}): {message}"
        return ask("support-router", text, session_id=f"order-{order_id}")

    return app


app = create_app()
