"""How full a service is: CPU, memory and workers of its whole process tree, for the
dashboards' saturation rows and the HPA.

Under gunicorn the service is a master and its worker processes, and ``/metrics`` is
answered by one worker at a time; prometheus_client's own process collector describes only
that worker (and is off in multiprocess mode). :class:`ProcessTreeCollector` reads, at each
scrape, ``/proc`` of the master (the worker's parent) and of every live worker:

- ``<prefix>_cpu_seconds_total``: CPU time of the master and its workers, reaped workers
  included (the kernel adds them to the master's ``cutime``/``cstime``), so it only grows
  when a worker is restarted;
- ``<prefix>_resident_memory_bytes``: resident memory of them all (what a container's
  memory limit counts, shared pages aside);
- ``<prefix>_workers``: live worker processes (1 outside gunicorn: the process itself).

Linux only (``/proc``); elsewhere the collector yields nothing. Written here rather than
taken from prometheus_client's ProcessCollector because that one reports one pid, with no
way to add a tree up without colliding series.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_PROC = Path("/proc")
_master: int | None = None  # set in a gunicorn worker: the arbiter's pid


def under_master(pid: int | None) -> None:
    """Called in each gunicorn worker before the app is built: the tree to describe is the
    master's."""
    global _master
    _master = pid


class ProcessTreeCollector(Collector):
    def __init__(self, prefix: str, proc: Path = _PROC) -> None:
        self.prefix = prefix
        self.proc = proc
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        root = _master or os.getpid()
        own = self._stat(root)
        if own is None:
            return
        workers = self._children(root) if _master else []
        stats = [s for s in map(self._stat, workers) if s is not None]
        reaped = own[2] + own[3] if _master else 0  # a master's reaped workers
        ticks = own[0] + own[1] + reaped + sum(s[0] + s[1] for s in stats)
        rss = (own[4] + sum(s[4] for s in stats)) * self._page
        yield CounterMetricFamily(
            f"{self.prefix}_cpu_seconds", "CPU time of the service's processes (a gunicorn "
            "master and its workers, restarted workers included).", value=ticks / self._tick)
        yield GaugeMetricFamily(
            f"{self.prefix}_resident_memory_bytes", "Resident memory of the service's processes.",
            value=rss)
        yield GaugeMetricFamily(
            f"{self.prefix}_workers", "Live worker processes of the service.",
            value=len(stats) if _master else 1)

    def _stat(self, pid: int) -> tuple[int, int, int, int, int] | None:
        """(utime, stime, cutime, cstime, rss pages) of ``pid``; None when it is gone."""
        try:
            raw = (self.proc / str(pid) / "stat").read_bytes()
            # the command name is in parentheses and may hold spaces, ')' or bytes that are
            # not UTF-8: the fields follow the last ')'
            fields = raw[raw.rindex(b")") + 2:].split()
            # man 5 proc: utime(14) stime(15) cutime(16) cstime(17) … rss(24), 1-based
            return (int(fields[11]), int(fields[12]), int(fields[13]), int(fields[14]),
                    int(fields[21]))
        except (OSError, ValueError, IndexError):
            return None

    def _children(self, pid: int) -> list[int]:
        try:
            return [int(p) for p in (self.proc / str(pid) / "task" / str(pid) / "children")
                    .read_text().split()]
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look at every process
            found = []
            for entry in self.proc.iterdir():
                if entry.name.isdigit():
                    if self._ppid(entry) == pid:
                        found.append(int(entry.name))
            return found

    @staticmethod
    def _ppid(entry: Path) -> int | None:
        try:
            raw = (entry / "stat").read_bytes()
            return int(raw[raw.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            return None
