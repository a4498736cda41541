"""The statistics pass of a tick (``Monitor.due``) against a per-run NumPy loop; profiler cost.

Plan
----
Data: ``runs`` batch_time windows of ``window`` values (log-normal step times with 1% stragglers),
fed through ``Monitor.ingest`` as the daemon would: 20 events per run of ``window / 20`` values
each, event times 25 s apart, so the newest 60 s hold 3 events and the newest 300 s hold 12: both
time windows differ from the count window and are really computed.

Each repetition first makes every run dirty again (one more value per run, at the run's newest
event time, so the windows keep their composition) — untimed — and then times ``due(now)`` and
right after it the per-run loops over the same values, in two configurations:

- a Monitor with the count window only (``time_windows=()``): like for like with the loops;
- a Monitor with the default time windows (60 s, 300 s), against loops over the three selections
  of each row; its ratio to the first shows what the time windows cost.

Two per-run loops, both computing per row the count, ``np.mean``, ``np.std``, ``np.min``,
``np.max``, the 50/95/99th ``np.percentile``, cv and the skewness and kurtosis from the central
moments of ``x - mean``, into one dict of floats per row (what ``due`` builds too):

- **plain**: one NumPy call per statistic, ``np.percentile`` once per quantile, ``d**k``: the loop
  the obvious per-run loop (about 287 ms per 1,000 rows of 1,000 values on this machine class);
- **tuned**: the three percentiles in one call and the moments from products (about 3x quicker):
  the strongest simple per-run loop, so that the daemon's advantage is not overstated.

``due`` runs inside ``profile_operation("tick", "tick")`` exactly as the service calls it, with the
daemon's default (enabled) profiler. Ratios are per repetition.

**1% dirty**: on the largest count-only Monitor, after each all-dirty ``due``, one value goes to
1% of the runs and ``due`` is timed again; the figure is that time over the all-dirty time.

**Exactness**: the first ``due`` of every Monitor (before any re-dirtying, so the windows are
exactly the generated rows) is compared on a sample of rows with numpy and scipy
(``np.percentile`` linear, ``np.std`` ddof=0, ``scipy.stats.variation/skew/kurtosis``); the figure
is the largest relative error of any statistic.

**Profiler**: one Monitor, two profilers swapped in through ``monitor.profiler`` — ``Profiler()``
and ``Profiler(enabled=False)`` — so both sides compute on the very same arrays; repetitions
alternate which goes first. Overhead per pair = on / off − 1. It runs at 1,000 runs, not 10,000:
the profiler's cost is per call, so a shorter tick makes its share larger (a conservative
figure), and 30 ms ticks are steady enough for many pairs where 10,000-run ticks swing by ±50% on
a shared machine. The enabled profiler's ``report()["overhead_fraction"]`` is its own estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime
from metricsd.monitor import Monitor
from metricsd.profiler import Profiler
from numpy.typing import NDArray

from bench.common import Figure, Sizes, paired

__all__ = ["LOOPS", "generate", "per_run_loop", "run", "run_profiler"]

F64 = NDArray[np.float64]
_NOW = 1_764_100_000.0
_EVENTS_PER_WINDOW = 20
_EVENT_GAP_S = 25.0
_TIME_WINDOWS = MonitorSettings().time_windows  # the daemon's defaults (60, 300)
_SAMPLE_ROWS = 40
_STATS = (
    "count",
    "mean",
    "std",
    "min",
    "max",
    "median",
    "p95",
    "p99",
    "cv",
    "skewness",
    "kurtosis",
)


def generate(runs: int, window: int, seed: int = 3) -> tuple[F64, F64]:
    """``(values, ts)``, both ``(runs, window)``: step times and their event times."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(np.log(0.15), 0.2, (runs, window))
    stragglers = rng.random((runs, window)) < 0.01
    values[stragglers] *= rng.uniform(3, 10, int(stragglers.sum()))
    per_event = max(1, window // _EVENTS_PER_WINDOW)
    event = np.arange(window) // per_event
    start = _NOW - 1_000.0 + rng.uniform(0, 10, runs)
    ts = start[:, None] + event[None, :] * _EVENT_GAP_S
    return values, ts


def _fill(monitor: Monitor, values: F64, ts: F64) -> None:
    """Feed the rows through ``ingest``, one event per run and ``window / 20`` values at a time."""
    runs, window = values.shape
    per_event = max(1, window // _EVENTS_PER_WINDOW)
    names = [f"r{r}" for r in range(runs)]
    for start in range(0, window, per_event):
        stop = min(start + per_event, window)
        events = [
            BatchTime(names[r], float(ts[r, start]), None, values[r, start:stop].copy())
            for r in range(runs)
        ]
        monitor.ingest(events, _NOW)


def _redirty(monitors: Sequence[Monitor], values: F64, ts: F64, rows: Sequence[int]) -> None:
    """One more value for each of ``rows``, at its newest event time (untimed)."""
    last = ts[:, -1]
    events = [BatchTime(f"r{r}", float(last[r]), None, float(values[r, 0])) for r in rows]
    for monitor in monitors:
        monitor.ingest(events, _NOW)


def _due(monitor: Monitor) -> tuple[float, list[dict[str, Any]]]:
    """Seconds of one ``due`` as the service runs it (inside the ``tick`` operation)."""
    start = time.perf_counter()
    with monitor.profiler.profile_operation("tick", "tick"):
        records = monitor.due(_NOW)
    return time.perf_counter() - start, records


def _stats_tuned(x: F64) -> dict[str, float]:
    """The 11 statistics of one window, written to be quick: one percentile call, products."""
    mean = np.mean(x)
    std = np.std(x)
    p50, p95, p99 = np.percentile(x, (50, 95, 99))
    d = x - mean
    d2 = d * d
    m2 = np.mean(d2)
    m3 = np.mean(d2 * d)
    m4 = np.mean(d2 * d2)
    return {
        "count": float(x.size),
        "mean": float(mean),
        "std": float(std),
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "median": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "cv": float(std / mean),
        "skewness": float(m3 / m2**1.5),
        "kurtosis": float(m4 / m2**2 - 3.0),
    }


def _stats_plain(x: F64) -> dict[str, float]:
    """The 11 statistics as the obvious per-run loop: one call per statistic, ``d**k``."""
    mean = np.mean(x)
    std = np.std(x)
    d = x - mean
    m2 = np.mean(d**2)
    return {
        "count": float(x.size),
        "mean": float(mean),
        "std": float(std),
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "median": float(np.percentile(x, 50)),
        "p95": float(np.percentile(x, 95)),
        "p99": float(np.percentile(x, 99)),
        "cv": float(std / mean),
        "skewness": float(np.mean(d**3) / m2**1.5),
        "kurtosis": float(np.mean(d**4) / m2**2 - 3),
    }


LOOPS: dict[str, Callable[[F64], dict[str, float]]] = {"plain": _stats_plain, "tuned": _stats_tuned}


def per_run_loop(
    values: F64, ts: F64, time_windows: Sequence[float], style: str = "plain"
) -> list[dict[str, float]]:
    """The 11 statistics row by row with plain NumPy calls: count window, then each time window.

    ``style`` "plain" is the obvious per-run loop (about 287 ms per 1,000 rows here); "tuned"
    computes the three percentiles in one call and the moments with products (about 3x quicker):
    the strongest per-run loop, to keep the daemon's ratio honest.
    """
    stats = LOOPS[style]
    out: list[dict[str, float]] = []
    for r in range(values.shape[0]):
        x = values[r]
        out.append(stats(x))
        if time_windows:
            t = ts[r]
            newest = t.max()
            for seconds in time_windows:
                out.append(stats(x[t > newest - seconds]))
    return out


def _timed_loop(values: F64, ts: F64, time_windows: Sequence[float], style: str) -> float:
    start = time.perf_counter()
    per_run_loop(values, ts, time_windows, style)
    return time.perf_counter() - start


# -- exactness --------------------------------------------------------------------------------
def _oracle(x: F64) -> dict[str, float]:
    from scipy import stats as sps

    p50, p95, p99 = np.percentile(x, (50, 95, 99))
    return {
        "count": float(x.size),
        "mean": float(np.mean(x)),
        "std": float(np.std(x)),
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "median": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "cv": float(sps.variation(x)),
        "skewness": float(sps.skew(x)),
        "kurtosis": float(sps.kurtosis(x)),
    }


def _window_key(window: dict[str, Any]) -> tuple[str, float]:
    return (window["kind"], float(window.get("size", window.get("seconds", 0))))


def max_relative_error(
    records: list[dict[str, Any]], values: F64, ts: F64, time_windows: Sequence[float], seed: int
) -> float:
    """Largest relative error of any statistic of any window over a sample of rows."""
    by_key = {
        (rec["run_id"], _window_key(rec["window"])): rec
        for rec in records
        if rec["stream"] == "batch_time"
    }
    runs, width = values.shape
    rng = np.random.default_rng(seed)
    sample = rng.choice(runs, size=min(runs, _SAMPLE_ROWS), replace=False)
    worst = 0.0
    for r in sample.tolist():
        x, t = values[r], ts[r]
        selections = [(("count", float(width)), x)]
        selections += [(("time", s), x[t > t.max() - s]) for s in time_windows]
        for key, sel in selections:
            rec = by_key.get((f"r{r}", key))
            if rec is None:
                raise AssertionError(f"no summary for run r{r}, window {key}")
            expected = _oracle(sel)
            for name in _STATS:
                got = rec["metrics"][name]
                want = expected[name]
                if got is None or not np.isfinite(want):
                    if not (got is None and not np.isfinite(want)):
                        raise AssertionError(f"r{r} {key} {name}: got {got}, expected {want}")
                    continue
                worst = max(worst, abs(got - want) / max(abs(want), 1e-300))
    return worst


# -- the benchmark ----------------------------------------------------------------------------
def _size_figures(sizes: Sizes, runs: int, log: Callable[[str], None]) -> list[Figure]:
    values, ts = generate(runs, sizes.window)
    count_only = Monitor(MonitorSettings(window=sizes.window, time_windows=()), Profiler())
    with_time = Monitor(MonitorSettings(window=sizes.window), Profiler())
    _fill(count_only, values, ts)
    _fill(with_time, values, ts)
    exact = Figure(
        "tick",
        f"max relative error vs numpy/scipy, {runs:,} runs",
        "",
        note=f"{min(runs, _SAMPLE_ROWS)} rows, all 11 statistics, every window",
    )
    for monitor, windows in ((count_only, ()), (with_time, _TIME_WINDOWS)):
        _, records = _due(monitor)
        exact.samples.append(max_relative_error(records, values, ts, windows, seed=runs))
    exact.samples = [max(exact.samples)]
    label = f"{runs:,} runs x {sizes.window:,}"
    everyone = list(range(runs))
    rng = np.random.default_rng(runs)
    measure_dirty = runs == sizes.dirty_runs
    d_dirty = Figure("tick", f"daemon due(), {label}, 1% dirty", "ms")
    figures: list[Figure] = []
    ratios: list[Figure] = []
    d_count: Figure | None = None
    for monitor, windows, what in (
        (count_only, (), "count window"),
        (with_time, _TIME_WINDOWS, "count + time 60/300 s"),
    ):
        daemon = Figure("tick", f"daemon due(), {label}, {what}", "ms")
        loops = {
            style: Figure("tick", f"per-run loop ({style}), {label}, {what}", "ms")
            for style in LOOPS
        }
        for _ in range(sizes.repeat):
            _redirty((monitor,), values, ts, everyone)
            daemon.samples.append(_due(monitor)[0] * 1e3)
            for style, figure in loops.items():
                figure.samples.append(_timed_loop(values, ts, windows, style) * 1e3)
            if measure_dirty and not windows:
                few = rng.choice(runs, size=max(1, runs // 100), replace=False).tolist()
                _redirty((monitor,), values, ts, few)
                d_dirty.samples.append(_due(monitor)[0] * 1e3)
        figures += [daemon, *loops.values()]
        ratios += [
            Figure(
                "tick",
                f"per-run loop ({style}) / daemon, {label}, {what}",
                "x",
                paired(figure.samples, daemon.samples),
            )
            for style, figure in loops.items()
        ]
        if d_count is None:
            d_count = daemon
        else:
            ratios.append(
                Figure(
                    "tick",
                    f"time windows' cost (with / without), {label}",
                    "x",
                    paired(daemon.samples, d_count.samples),
                )
            )
    figures += [*ratios, exact]
    if measure_dirty and d_count is not None:
        figures += [
            d_dirty,
            Figure(
                "tick",
                f"1% dirty / all dirty, {label}",
                "%",
                [100 * r for r in paired(d_dirty.samples, d_count.samples)],
            ),
        ]
    log(f"tick: {runs:,} runs done")
    return figures


def _profiler_figures(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    runs = sizes.profiler_runs
    values, ts = generate(runs, sizes.window, seed=4)
    on, off = Profiler(), Profiler(enabled=False)
    monitor = Monitor(MonitorSettings(window=sizes.window, time_windows=()), off)
    _fill(monitor, values, ts)
    _due(monitor)
    everyone = list(range(runs))
    label = f"{runs:,} runs, count window"
    t_on = Figure("profiler", f"tick, profiler on, {label}", "ms")
    t_off = Figure("profiler", f"tick, profiler off, {label}", "ms")
    reported = Figure(
        "profiler",
        "self-reported overhead_fraction",
        "%",
        digits=2,
        note="calls x calibrated cost per call / (tick + ingest time)",
    )
    for rep in range(sizes.profiler_pairs):
        order = (on, off) if rep % 2 == 0 else (off, on)
        for profiler in order:
            monitor.profiler = profiler
            _redirty((monitor,), values, ts, everyone)
            seconds, _ = _due(monitor)
            (t_on if profiler is on else t_off).samples.append(seconds * 1e3)
        body = on.report(1.0)
        if body["overhead_fraction"] is not None:
            reported.samples.append(100 * body["overhead_fraction"])
    overhead = Figure(
        "profiler",
        "measured overhead (on / off − 1)",
        "%",
        [100 * (r - 1) for r in paired(t_on.samples, t_off.samples)],
        digits=2,
        note=f"{sizes.profiler_pairs} interleaved pairs, one Monitor, profilers swapped",
    )
    log("profiler: done")
    return [t_on, t_off, overhead, reported]


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """Every tick figure (no broker needed)."""
    figures: list[Figure] = []
    for runs in sizes.tick_runs:
        figures += _size_figures(sizes, runs, log)
    return figures


def run_profiler(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """The profiler-overhead figures (no broker needed)."""
    return _profiler_figures(sizes, log)
