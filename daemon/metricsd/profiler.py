"""The daemon's own profiler: ``profile_operation(name, category)`` around every hot operation.

Plan
----
- ``with profiler.profile_operation("numeric_stats", "stats"):`` costs two ``perf_counter_ns``
  calls and one store into a preallocated ``array('q')`` ring per operation: no allocation, no
  lock, no NumPy scalar on the hot path. Operation objects are created once per name and reused.
- ``report(now)`` turns the durations recorded since the previous report into per-operation figures
  (count, total, mean, p50/p95/p99/max in microseconds) with the same window-statistics code the
  daemon applies to training data (``stats.quantiles``), then starts a new interval.
- The profiler measures its own cost once at construction (a calibration loop of empty
  operations) and reports ``tick_overhead_fraction`` = calls inside ticks x cost per call / tick
  time, and ``overhead_fraction``, the same over everything it timed (ticks and ingests).

Not re-entrant per operation: the same name must not be nested inside itself (different names may
nest freely). No I/O and no clock of its own beyond ``perf_counter_ns`` for durations.
"""

from __future__ import annotations

import time
from array import array
from types import TracebackType
from typing import Any

import numpy as np

from metricsd.stats import quantiles

__all__ = ["Operation", "Profiler"]

_perf_ns = time.perf_counter_ns
TICK = "tick"
# Categories of the operations that run inside a tick (the tick itself included).
TICK_CATEGORIES = frozenset({"tick", "stats", "publish", "state"})


class Operation:
    """One named operation: a context manager that records its own durations."""

    __slots__ = ("_durations", "_start", "capacity", "category", "count", "name", "total_ns")

    def __init__(self, name: str, category: str, capacity: int) -> None:
        self.name = name
        self.category = category
        self.capacity = capacity
        self._durations = array("q", bytes(8 * capacity))
        self._start = 0
        self.count = 0
        self.total_ns = 0

    def __enter__(self) -> Operation:
        self._start = _perf_ns()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = _perf_ns() - self._start
        self._durations[self.count % self.capacity] = elapsed
        self.count += 1
        self.total_ns += elapsed

    def durations_ns(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The retained durations of this interval (the newest ``capacity`` of them)."""
        n = min(self.count, self.capacity)
        return np.frombuffer(self._durations, dtype=np.int64, count=n).copy()

    def reset(self) -> None:
        self.count = 0
        self.total_ns = 0


class _Disabled:
    """What ``profile_operation`` returns when profiling is off: a do-nothing context."""

    __slots__ = ()

    def __enter__(self) -> _Disabled:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_DISABLED = _Disabled()


class Profiler:
    """Per-operation timings with near-zero overhead; figures computed by ``metricsd.stats``."""

    def __init__(self, *, capacity: int = 4096, enabled: bool = True) -> None:
        self.capacity = capacity
        self.enabled = enabled
        self._operations: dict[tuple[str, str], Operation] = {}
        self.cost_per_call_ns = self._calibrate() if enabled else 0.0

    def profile_operation(self, name: str, category: str) -> Operation | _Disabled:
        """The context manager timing one execution of ``name`` (in ``category``)."""
        if not self.enabled:
            return _DISABLED
        op = self._operations.get((name, category))
        if op is None:
            op = self._operations[(name, category)] = Operation(name, category, self.capacity)
        return op

    def _calibrate(self, rounds: int = 2000) -> float:
        """Median cost of one empty ``with profile_operation(...)`` in nanoseconds."""
        op = Operation("_calibration", "_", 16)
        samples = []
        for _ in range(5):
            start = _perf_ns()
            for _ in range(rounds):
                with op:
                    pass
            samples.append((_perf_ns() - start) / rounds)
        return float(np.median(samples))

    @property
    def operations(self) -> list[Operation]:
        return list(self._operations.values())

    def report(self, interval_seconds: float) -> dict[str, Any]:
        """Figures since the previous report as a ``profile`` record body; starts a new interval.

        Per operation: count, total_us, mean_us and p50/p95/p99/max over the retained durations
        (null when the operation did not run). ``tick_ms`` summarises the ``tick`` operation and
        ``tick_overhead_fraction`` = calls inside ticks x calibrated cost per call / tick time;
        ``overhead_fraction`` = all calls x cost / (tick + ingest time) (both null without
        ticks).
        """
        ops = [op for op in self._operations.values() if op.count]
        rows: list[dict[str, Any]] = []
        calls = 0
        if ops:
            width = max(min(op.count, op.capacity) for op in ops)
            block = np.zeros((len(ops), width), dtype=np.float64)
            valid = np.zeros((len(ops), width), dtype=np.bool_)
            for i, op in enumerate(ops):
                d = op.durations_ns()
                block[i, : d.shape[0]] = d / 1000.0
                valid[i, : d.shape[0]] = True
            q = quantiles(block, valid, (0.5, 0.95, 0.99, 1.0))
            for i, op in enumerate(ops):
                calls += op.count
                rows.append(
                    {
                        "name": op.name,
                        "category": op.category,
                        "count": op.count,
                        "total_us": op.total_ns / 1000.0,
                        "mean_us": op.total_ns / 1000.0 / op.count,
                        "p50_us": float(q[0, i]),
                        "p95_us": float(q[1, i]),
                        "p99_us": float(q[2, i]),
                        "max_us": float(q[3, i]),
                    }
                )
        tick = next((r for r in rows if r["name"] == TICK), None)
        tick_ms: dict[str, float | None] = {k: None for k in ("mean", "p50", "p95", "p99", "max")}
        overhead: float | None = None
        tick_overhead: float | None = None
        if tick is not None:
            tick_ms = {
                "mean": tick["mean_us"] / 1000.0,
                "p50": tick["p50_us"] / 1000.0,
                "p95": tick["p95_us"] / 1000.0,
                "p99": tick["p99_us"] / 1000.0,
                "max": tick["max_us"] / 1000.0,
            }
            # Operations outside the tick (decode, ingest) also cost; count them against the
            # tick time plus their own time so the fraction reads "share of the work we did".
            busy_ns = sum(op.total_ns for op in ops if op.category in ("tick", "ingest"))
            if busy_ns > 0:
                overhead = calls * self.cost_per_call_ns / busy_ns
            # The same, for the tick alone: the operations timed inside ticks over tick time.
            in_tick = sum(op.count for op in ops if op.category in TICK_CATEGORIES)
            tick_ns = tick["total_us"] * 1000.0
            if tick_ns > 0:
                tick_overhead = in_tick * self.cost_per_call_ns / tick_ns
        for op in ops:
            op.reset()
        return {
            "interval_seconds": interval_seconds,
            "ticks": tick["count"] if tick is not None else 0,
            "tick_ms": tick_ms,
            "overhead_fraction": overhead,
            "tick_overhead_fraction": tick_overhead,
            "operations": rows,
        }
