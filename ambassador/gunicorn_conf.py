"""gunicorn settings of the ambassador sidecar — workers, connections, timeouts.

One gevent worker is the default: a sidecar serves one app pod, and one process keeps the
circuit breaker, retry budget and in-memory cache coherent. Each value can be overridden by
the environment variable named next to it.
"""

import os

workers = int(os.environ.get("AMBASSADOR_WORKERS", "1"))
worker_class = "gevent"
worker_connections = int(os.environ.get("AMBASSADOR_WORKER_CONNECTIONS", "2000"))
timeout = int(os.environ.get("AMBASSADOR_WORKER_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("AMBASSADOR_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("AMBASSADOR_KEEPALIVE", "75"))
# Slow clients (flowgate/common/gevent_worker.py): a request head must arrive within
# AMBASSADOR_HEADER_TIMEOUT_S (a new connection's first byte too), its body within
# AMBASSADOR_BODY_TIMEOUT_S (408 after); a body left unread (413) is drained up to
# AMBASSADOR_DRAIN_BYTES (twice the default body limit), then the connection
# lingers-closes so the client can read the answer.
flowgate_header_timeout = float(os.environ.get("AMBASSADOR_HEADER_TIMEOUT_S") or 10)
flowgate_body_timeout = float(os.environ.get("AMBASSADOR_BODY_TIMEOUT_S") or 30)
flowgate_drain_bytes = int(os.environ.get("AMBASSADOR_DRAIN_BYTES") or 2 * 1024 * 1024)
proc_name = "flowgate-ambassador"
accesslog = None  # the app writes JSON access lines itself
errorlog = "-"
loglevel = os.environ.get("AMBASSADOR_GUNICORN_LOGLEVEL", "warning")


def child_exit(server, worker):
    """Forget a dead worker's live gauges (prometheus multiprocess mode)."""
    from flowgate.common.prometheus import forget_worker

    forget_worker(worker.pid)
