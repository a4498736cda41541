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
from typing import Any

import numpy as np

from bench.common import REPO, Figure, Sizes, peak_rss_bytes, rss_bytes

__all__ = ["churn_bound", "main", "measure", "run", "run_churn"]

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


# -- churn: the daemon itself, 100,000 distinct runs through --max-runs 1000 -------------------
_CHURN_WINDOW = 256
_CHURN_MAX_RUNS = 1_000
_CHURN_STREAMS = 3  # batch_time, prediction/val (binary), scalar/loss
_CHURN_PARTITIONS = 8
_CHURN_RUNS = 100_000  # the case
_CHURN_RUNS_QUICK = 3_000


def churn_bound(base: float, max_runs: int, window: int) -> float:
    """README "Memory": the daemon's RSS bound for runs of batch_time, one binary split and one
    scalar, count window + two time windows: base + window arrays (cap plus the reserve of
    retired rows, grouped banks grown by doubling) + one kind's statistics pass + 0.5 kB per
    (run, stream) + the summaries of one tick (1.2 kB each: the live rows' windows plus the
    finals the pipeline lets wait) + the consumed batch (at most 4 MB per partition of
    records, about 3x that as objects)."""
    from metricsd.monitor import RESERVE_FRACTION
    from metricsd.pipeline import BACKLOG_RECORDS, SLICE_RECORDS

    reserve = -(-max_runs // RESERVE_FRACTION)
    single = max_runs + reserve
    grouped = 2 * (max_runs + reserve)  # one split / one scalar name per run, doubling
    windows = 8 * window * (single * 2 + grouped * 3 + grouped * 2) + 24 * (single + 2 * grouped)
    tick = (1 + 5) * grouped * window * 8
    rows = 512 * _CHURN_STREAMS * max_runs
    records = 1200 * (3 * _CHURN_STREAMS * max_runs + BACKLOG_RECORDS + 3 * SLICE_RECORDS)
    batch = 3 * 4 * 2**20 * _CHURN_PARTITIONS
    return base + windows + tick + rows + records + batch


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


async def _churn_repetition(
    bootstrap: str, runs: int, distinct: bool, rep: int, workdir: Any
) -> dict[str, float]:
    """One daemon (``metricsd run --max-runs 1000 --window 256 --interval 1``, the rest default)
    fed ``runs`` x 3 events as fast as one producer sends them; distinct run ids (churn) or the
    same 1,000 over and over (the baseline). RSS sampled every 50 ms, ticks from the stats lines
    (one a second)."""
    import asyncio
    import time

    from aiokafka import AIOKafkaProducer

    from bench.common import create_topics
    from bench.latency import _Daemon

    name = "churn" if distinct else "steady"
    topic_in, topic_out = f"bench.mem.{name}.{rep}", f"bench.mem.{name}.{rep}.out"
    await create_topics(bootstrap, {topic_in: _CHURN_PARTITIONS, topic_out: _CHURN_PARTITIONS})
    log_path = workdir / f"{name}-{rep}.log"
    daemon = _Daemon(
        [
            "--bootstrap-servers", bootstrap, "--input-topic", topic_in,
            "--output-topic", topic_out, "--group-id", f"bench-mem-{name}-{rep}",
            "--max-runs", str(_CHURN_MAX_RUNS), "--window", str(_CHURN_WINDOW),
            "--interval", "1", "--stats-interval", "1",
            "--http-port", "0",  # the default port may be another daemon's on this machine
        ],
        log_path,
    )  # fmt: skip
    peak = 0
    try:
        await daemon.ready(60.0)
        pid = daemon.proc.pid
        base = _status(pid, "VmRSS")
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, _status(pid, "VmRSS"))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20)
        await producer.start()
        started = time.perf_counter()
        try:
            for i in range(runs):
                run = f"c{rep}-{i}" if distinct else f"s{rep}-{i % _CHURN_MAX_RUNS}"
                key, p = run.encode(), i % _CHURN_PARTITIONS
                for value in (
                    b'{"type":"batch_time","run_id":"%s","seconds":0.15}' % key,
                    b'{"type":"prediction","run_id":"%s","task":"binary",'
                    b'"y_true":[0,1,1,0,1,0,1,1],"y_pred":[0,1,0,0,1,1,1,1]}' % key,
                    b'{"type":"scalar","run_id":"%s","name":"loss","value":0.5}' % key,
                ):
                    await producer.send(topic_in, value, key=key, partition=p)
            await producer.flush()
        finally:
            await producer.stop()
        total = runs * _CHURN_STREAMS
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            stats = [
                line
                for line in _log_lines(log_path)
                if line.get("event") == "stats" and line.get("events", 0) >= total
            ]
            if stats:
                break
            await asyncio.sleep(0.2)
        seconds = time.perf_counter() - started
        peak = max(peak, _status(pid, "VmHWM"))
        sampling = False
        await sampler
    finally:
        daemon.stop()
    lines = _log_lines(log_path)
    ticks = [
        float(line["last_tick_ms"])
        for line in lines
        if line.get("event") == "stats" and line.get("events", 0) > 0
    ]
    last = [line for line in lines if line.get("event") == "stats"][-1]
    evicted = last.get("runs_evicted", {}).get("capacity", 0)
    bound = churn_bound(base, _CHURN_MAX_RUNS, _CHURN_WINDOW)
    return {
        "base_mib": base / _MIB,
        "peak_mib": peak / _MIB,
        "bound_mib": bound / _MIB,
        "peak_over_bound": (peak - base) / (bound - base),
        "tick_p50_ms": float(np.percentile(ticks, 50)) if ticks else float("nan"),
        "tick_p99_ms": float(np.percentile(ticks, 99)) if ticks else float("nan"),
        "seconds": seconds,
        "events_per_s": runs * _CHURN_STREAMS / seconds,
        "evicted": float(evicted),
        "events": float(last.get("events", 0)),
    }


def _log_lines(path: Any) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def run_churn(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """The issue's churn case on the real daemon, next to a steady baseline of the same events
    over 1,000 run ids, alternating which goes first."""
    import asyncio
    import tempfile
    from pathlib import Path

    from metricsd.devbroker import DevBroker

    runs = _CHURN_RUNS_QUICK if sizes.quick else _CHURN_RUNS
    label = f"{runs:,} runs through --max-runs {_CHURN_MAX_RUNS:,} --window {_CHURN_WINDOW}"
    keys = {
        "peak_mib": ("peak RSS", "MiB"),
        "bound_mib": ("RSS bound (README formula)", "MiB"),
        "peak_over_bound": ("(peak RSS − base) / (bound − base)", "x"),
        "tick_p50_ms": ("tick p50 at --interval 1", "ms"),
        "tick_p99_ms": ("tick p99 at --interval 1", "ms"),
        "events_per_s": ("events/s, first send → all consumed", "/s"),
        "base_mib": ("RSS at assignment (base)", "MiB"),
    }
    churn = {k: Figure("churn", f"{name}, {label}", unit) for k, (name, unit) in keys.items()}
    steady = {
        k: Figure("churn", f"{name}, baseline: same events over {_CHURN_MAX_RUNS:,} runs", unit)
        for k, (name, unit) in keys.items()
        if k in ("peak_mib", "tick_p50_ms", "tick_p99_ms", "events_per_s")
    }
    ratio = Figure("churn", "peak RSS churn / baseline", "x")
    evicted = Figure("churn", "runs evicted for capacity (churn)", "", digits=6)
    with DevBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-churn-") as tmp:
        for rep in range(sizes.repeat):
            order = (True, False) if rep % 2 == 0 else (False, True)
            results = {
                distinct: asyncio.run(
                    _churn_repetition(broker.bootstrap, runs, distinct, rep, Path(tmp))
                )
                for distinct in order
            }
            for key, figure in churn.items():
                figure.samples.append(results[True][key])
            for key, figure in steady.items():
                figure.samples.append(results[False][key])
            ratio.samples.append(results[True]["peak_mib"] / results[False]["peak_mib"])
            evicted.samples.append(results[True]["evicted"])
            log(f"churn: repetition {rep + 1}/{sizes.repeat} done")
    return [*churn.values(), *steady.values(), ratio, evicted]
