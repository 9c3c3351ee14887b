"""Prometheus plumbing shared by the engine's and the ambassador's metrics.

Under gunicorn with several workers each worker is a process, so the services use
prometheus_client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the
``flowgate engine|ambassador`` commands set it when they start more than one worker):
``render()`` then aggregates every worker. Tests pass their own ``CollectorRegistry``.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from flowgate.common import gc_pauses
from flowgate.common.saturation import ProcessTreeCollector


class ServiceMetrics:
    """Base of a service's metrics class: subclasses create their metrics with
    ``**self.options``. ``prefix`` names the process-tree series (flowgate/common/saturation.py)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str) -> None:
        self.multiprocess = registry is None and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # multiprocess: values go to mmap files and render() collects them from every worker
        self.options: dict[str, Any] = {"registry": None if self.multiprocess else self.registry}
        self.processes = ProcessTreeCollector(prefix)
        if not self.multiprocess:
            self.registry.register(self.processes)

    def render(self) -> tuple[bytes, str]:
        gc_pauses.drain()
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.processes)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def forget_worker(pid: int) -> None:
    """gunicorn ``child_exit`` hook: drop a dead worker's live gauges (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
