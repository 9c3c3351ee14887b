"""gunicorn settings of the flow engine — the one file for workers, connections, timeouts.

``flowgate engine`` loads it; each value can be overridden by the environment variable
named next to it. gevent workers: one process per core, thousands of concurrent runs per
process (a run waiting on an LLM costs a greenlet, not a thread).
"""

import os

# One worker per core. Without REDIS_URL the run event log and cancellation live in the
# worker's memory, so a reconnecting stream could land on a worker that never saw its run:
# the embedded default is then one worker (still hundreds of runs/s).
workers = int(os.environ.get("FLOW_ENGINE_WORKERS") or (2 if os.environ.get("REDIS_URL") else 1))
worker_class = "gevent"
worker_connections = int(os.environ.get("FLOW_ENGINE_WORKER_CONNECTIONS", "1000"))
# Heartbeat timeout: a worker that stops answering its arbiter this long is restarted.
# Long LLM runs do not count (they yield to the gevent hub while they wait).
timeout = int(os.environ.get("FLOW_ENGINE_WORKER_TIMEOUT", "60"))
# SIGTERM: stop accepting, let in-flight runs finish for up to this long, then exit.
graceful_timeout = int(os.environ.get("FLOW_ENGINE_GRACEFUL_TIMEOUT", "30"))
# Idle keep-alive connections hold a graceful shutdown open, so keep this short.
keepalive = int(os.environ.get("FLOW_ENGINE_KEEPALIVE", "5"))
# What one connection may cost (flowgate/common/gevent_worker.py ConnectionLimits): a request
# head must arrive within FLOW_ENGINE_HEADER_TIMEOUT_S (a new connection's first byte too), its body
# within FLOW_ENGINE_BODY_TIMEOUT_S (408 after); a body left unread (413) is drained up to
# twice the body limit so the client reads the answer; idle connections make room for new
# ones when a worker is nearly full.
flowgate_header_timeout = float(os.environ.get("FLOW_ENGINE_HEADER_TIMEOUT_S") or 10)
flowgate_body_timeout = float(os.environ.get("FLOW_ENGINE_BODY_TIMEOUT_S") or 30)
flowgate_drain_bytes = 2 * int(os.environ.get("FLOW_ENGINE_MAX_BODY_BYTES") or 4 * 1024 * 1024)
proc_name = "flowgate-engine"
accesslog = None  # the app writes JSON access lines itself
errorlog = "-"
loglevel = os.environ.get("FLOW_ENGINE_GUNICORN_LOGLEVEL", "warning")


def child_exit(server, worker):
    """Forget a dead worker's live gauges (prometheus multiprocess mode)."""
    from flowgate.common.prometheus import forget_worker

    forget_worker(worker.pid)
