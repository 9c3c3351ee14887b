"""What both services share, below both: tracing, JSON logs, Prometheus set-up, serving
(gunicorn + gevent), OpenTelemetry, Redis signals and guards, the run-request rules,
credentials and backoff. Nothing here imports ``flow_engine`` or ``ambassador``; the CLI,
the stack runner and llm-sim (``flowgate/*.py``) sit above both services."""
