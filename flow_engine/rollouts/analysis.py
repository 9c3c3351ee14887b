"""Canary analysis, as a pure function: from the outcomes of the live and the canary
version over a sliding window, decide whether a guarded rollout holds, steps, is promoted or
is aborted (Argo Rollouts' and Flagger's analysis, for flow versions).

A failure is a run that failed (LLM error, timeout, node error: a 5xx); bad input (4xx) and
cancelled runs are not outcomes at all. The verdicts:

- ``abort``   with at least ``min_runs`` canary runs in the window, the canary's error rate
              exceeds both ``max_error_rate`` and the live version's, or its p95 duration
              exceeds ``max_latency_ratio`` × live's (when live has ``min_runs`` too);
- ``promote`` a healthy canary on its last step (100 %) for ``step_after_s``;
- ``step``    a healthy canary on an earlier step for ``step_after_s``: to the next percent;
- ``hold``    anything else (too few runs to judge, or not yet time to step).

A guarded *publish* is judged the same way with the previous live version as the baseline:
``rollback`` where a canary would ``abort``, and ``done`` once ``window_s`` has passed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Duration buckets (seconds) of the outcome histograms: upper bounds 10 ms × 1.2^i up to
# ~14 min, then the rest. Neighbours 1.2× apart and p95 interpolated within its bucket keep
# the latency guard's error within ±20 % of the true ratio (a 1.22× slowdown holds at a
# ratio of 1.5, a 1.8× one breaches it) — coarser buckets rounded p95 up by 2–3×. The store
# has a column per bucket (flow_engine/store/schema.py: OUTCOME_BUCKETS).
BUCKET_GROWTH = 1.2
BUCKETS = (*(round(0.01 * BUCKET_GROWTH ** i, 6) for i in range(63)), math.inf)


@dataclass
class Outcomes:
    """Runs of one version in the window: counts and a duration histogram (BUCKETS)."""

    ok: int = 0
    failed: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))

    @property
    def runs(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.runs if self.runs else 0.0

    def add(self, failed: bool, seconds: float) -> None:
        if failed:
            self.failed += 1
        else:
            self.ok += 1
        self.histogram[bucket_of(seconds)] += 1

    def merge(self, other: Outcomes) -> None:
        self.ok += other.ok
        self.failed += other.failed
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    def p95(self) -> float | None:
        """The 95th percentile duration, interpolated linearly within the bucket that holds
        it (as Prometheus' ``histogram_quantile``); inf when that is the last, unbounded
        bucket; None: no runs."""
        total = sum(self.histogram)
        if not total:
            return None
        rank, seen = 0.95 * total, 0
        for i, count in enumerate(self.histogram):
            if count and seen + count >= rank:
                upper = BUCKETS[i]
                if math.isinf(upper):
                    return upper
                lower = BUCKETS[i - 1] if i else 0.0
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
        return BUCKETS[-1]

    def as_dict(self) -> dict[str, Any]:
        p95 = self.p95()
        return {"runs": self.runs, "failed": self.failed,
                "error_rate": round(self.error_rate, 4),
                "p95_s": None if p95 is None or math.isinf(p95) else round(p95, 4)}


def bucket_of(seconds: float) -> int:
    """The first bucket whose upper bound is at least ``seconds``."""
    return min(bisect.bisect_left(BUCKETS, seconds), len(BUCKETS) - 1)


@dataclass(frozen=True)
class Guard:
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0
    min_runs: int = 20
    window_s: float = 300.0

    @classmethod
    def parse(cls, raw: Any, where: str) -> Guard:
        """From a request body; ValueError naming ``where`` and the bad field."""
        if not isinstance(raw, dict) or set(raw) - {"max_error_rate", "max_latency_ratio",
                                                   "min_runs", "window_s"}:
            raise ValueError(f"{where} must be an object with max_error_rate, "
                             "max_latency_ratio, min_runs, window_s (all optional)")
        values = {}
        for name, low, high, kind in (("max_error_rate", 0.0, 1.0, float),
                                      ("max_latency_ratio", 1.0, 100.0, float),
                                      ("min_runs", 1, 1_000_000, int),
                                      ("window_s", 10.0, 3600.0, float)):
            if name not in raw:
                continue
            value = raw[name]
            ok = not isinstance(value, bool) and isinstance(value, int | float) and (
                kind is float or isinstance(value, int))
            if not ok or not low <= value <= high:
                raise ValueError(f"{where}.{name} must be a number from {low} to {high}")
            values[name] = kind(value)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {"max_error_rate": self.max_error_rate,
                "max_latency_ratio": self.max_latency_ratio, "min_runs": self.min_runs,
                "window_s": self.window_s}


@dataclass(frozen=True)
class Verdict:
    action: str  # hold | step | promote | abort | rollback | done
    reason: dict[str, Any]
    percent: float | None = None  # the next step's percent


def breach(candidate: Outcomes, baseline: Outcomes, guard: Guard) -> dict[str, Any] | None:
    """The measured figures when ``candidate`` breaches ``guard`` against ``baseline``."""
    if candidate.runs < guard.min_runs:
        return None
    figures = {"candidate": candidate.as_dict(), "baseline": baseline.as_dict(),
               "guard": guard.as_dict()}
    if candidate.error_rate > guard.max_error_rate and candidate.error_rate > baseline.error_rate:
        return {"breach": "error_rate", **figures}
    mine, theirs = candidate.p95(), baseline.p95()
    if (baseline.runs >= guard.min_runs and mine is not None and theirs is not None
            and not math.isinf(theirs) and mine > guard.max_latency_ratio * theirs):
        return {"breach": "latency", **figures}
    return None


def judge_canary(canary: Outcomes, live: Outcomes, guard: Guard, steps: Sequence[float],
                 percent: float, seconds_on_step: float, step_after_s: float) -> Verdict:
    """The verdict on a guarded canary now at ``percent`` for ``seconds_on_step``."""
    figures = breach(canary, live, guard)
    if figures is not None:
        return Verdict("abort", figures)
    if seconds_on_step < step_after_s or canary.runs < guard.min_runs:
        return Verdict("hold", {"canary": canary.as_dict(), "live": live.as_dict()})
    healthy = {"canary": canary.as_dict(), "live": live.as_dict()}
    later = [s for s in steps if s > percent]
    if not later:
        return Verdict("promote", healthy)
    return Verdict("step", healthy, percent=later[0])


def judge_publish(new: Outcomes, previous: Outcomes, guard: Guard,
                  seconds_since_publish: float) -> Verdict:
    """The verdict on a guarded publish watched against the previous live version."""
    figures = breach(new, previous, guard)
    if figures is not None:
        return Verdict("rollback", figures)
    if seconds_since_publish >= guard.window_s:
        return Verdict("done", {"new": new.as_dict(), "previous": previous.as_dict()})
    return Verdict("hold", {})
