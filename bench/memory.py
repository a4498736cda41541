"""Memory: resident set size of a Monitor tracking many full windows, against the window arrays.

Plan
----
Each repetition is a fresh interpreter (``python -m bench.memory --runs N --window W``) so that
nothing the other benchmarks allocated is in its RSS. The child imports everything first,
collects garbage and reads its RSS: the fixed **base** (interpreter, NumPy, the daemon's modules).
Then it creates a Monitor with the daemon's default window settings (count window W, time windows
60/300 s, profiler on), fills N batch_time rows to W values through ``ingest`` (batches of 100
runs, one event of W values per run), reads RSS (**filled**), runs one ``due`` and drops its
records as the service does after publishing, and reads RSS again (**after tick**), plus the peak
(``VmHWM``, which the tick's temporaries set). The target figure is
``(RSS after tick − base) / monitor.window_bytes``.

Diagnostics: the same ratio after glibc's ``malloc_trim(0)`` tells memory the allocator keeps
from memory still in use (if trimming brings it down, nothing leaks: freed heap is retained), and
the ratio to the bytes of the rows in use shows what the banks' spare capacity costs
(``window_bytes`` counts allocated rows; rows never written are pages the kernel never mapped).
The Monitor is built without the service's changelog tracking: the changelog's snapshots are not
part of this figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable

import numpy as np

from bench.common import REPO, Figure, Sizes, peak_rss_bytes, rss_bytes

__all__ = ["main", "measure", "run"]

_NOW = 1_764_200_000.0
_MIB = 1024 * 1024


def measure(runs: int, window: int) -> dict[str, float]:
    """The figures of one fresh process (call only in a fresh interpreter)."""
    from metricsd.config import MonitorSettings
    from metricsd.events import BatchTime
    from metricsd.monitor import Monitor
    from metricsd.profiler import Profiler

    rng = np.random.default_rng(5)
    gc.collect()
    base = rss_bytes()
    monitor = Monitor(MonitorSettings(window=window), Profiler())
    for start in range(0, runs, 100):
        events = [
            BatchTime(f"r{r}", _NOW, None, rng.lognormal(np.log(0.15), 0.2, window))
            for r in range(start, min(start + 100, runs))
        ]
        monitor.ingest(events, _NOW)
    del events
    filled = rss_bytes()
    records = monitor.due(_NOW)
    n_records = len(records)
    del records
    after_tick = rss_bytes()
    peak = peak_rss_bytes()
    trimmed = _trimmed_rss()
    window_bytes = monitor.window_bytes
    used_bytes = monitor.rows_tracked * window * 2 * 8  # values + timestamps of rows in use
    return {
        "runs": runs,
        "window": window,
        "records": n_records,
        "base_mib": base / _MIB,
        "filled_mib": filled / _MIB,
        "after_tick_mib": after_tick / _MIB,
        "peak_mib": peak / _MIB,
        "window_mib": window_bytes / _MIB,
        "used_rows_mib": used_bytes / _MIB,
        "ratio_filled": (filled - base) / window_bytes,
        "ratio_after_tick": (after_tick - base) / window_bytes,
        "ratio_to_used_rows": (after_tick - base) / used_bytes,
        "ratio_peak": (peak - base) / window_bytes,
        "ratio_trimmed": (trimmed - base) / window_bytes if trimmed else float("nan"),
    }


def _trimmed_rss() -> int:
    """RSS after glibc's ``malloc_trim(0)`` (0 where there is no glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return 0
    return rss_bytes()


def main(argv: list[str] | None = None) -> int:
    """Child entry point: print one JSON object with the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=1_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.runs, args.window)))
    return 0


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """Repetitions in fresh subprocesses; every figure of the memory benchmark."""
    names = {
        "ratio_after_tick": ("(RSS − base) / window_bytes, after a tick", "x"),
        "ratio_filled": ("(RSS − base) / window_bytes, filled, before a tick", "x"),
        "ratio_peak": ("(peak RSS − base) / window_bytes", "x"),
        "ratio_trimmed": ("(RSS − base) / window_bytes, after a tick and malloc_trim(0)", "x"),
        "ratio_to_used_rows": ("(RSS − base) / bytes of the rows in use, after a tick", "x"),
        "base_mib": ("RSS base (before the Monitor)", "MiB"),
        "after_tick_mib": ("RSS after a tick", "MiB"),
        "peak_mib": ("peak RSS (VmHWM)", "MiB"),
        "window_mib": ("window_bytes (allocated banks)", "MiB"),
        "used_rows_mib": ("bytes of the rows in use", "MiB"),
    }
    label = f"{sizes.memory_runs:,} runs x {sizes.window:,}"
    figures = {
        key: Figure("memory", f"{name}, {label}", unit) for key, (name, unit) in names.items()
    }
    for _ in range(sizes.repeat):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.memory",
                "--runs",
                str(sizes.memory_runs),
                "--window",
                str(sizes.window),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        result = json.loads(out.stdout)
        for key, figure in figures.items():
            figure.samples.append(float(result[key]))
    log("memory: done")
    return list(figures.values())


if __name__ == "__main__":
    raise SystemExit(main())
