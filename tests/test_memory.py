"""Bounded memory: 100,000 distinct runs pass through a Monitor with max_runs=1000, RSS stays flat.

The run happens in a fresh interpreter (a subprocess), so that its resident set size is the
monitor's and not the test session's. RSS is read from ``/proc/self/status`` (``VmRSS``).

The bound is the README's "Memory" formula with this test's settings (W = 256, R = 1000, every run
sending batch_time, one binary prediction split, cv, attention and features, 500 new runs per tick,
the count window and two time windows):

    base        RSS after the imports, before the Monitor exists (measured)
  + windows     8 B x W x sum over kinds of rows x (channels + 1): R rows each for batch_time (1
                channel), cv (3), attention (2), features (3); min(8R, 2R x splits) for a
                prediction bank (2 channels, grown by doubling); plus 24 B of counters per row
  + tick        the statistics of one kind's changed rows: a copy of them plus NumPy temporaries,
                at most (channels + 5) x rows x W x 8 B for the widest kind (3 channels)
  + rows        bookkeeping per (run, stream): the row object, dict entries, newest figures —
                measured about 0.5 kB, bounded here by 2 kB
  + records     the summaries of one tick: (new + evicted runs) x streams x windows, measured about
                1.2 kB each, bounded here by 2 kB

Flat: the RSS after 100,000 runs may exceed the RSS after the first 10,000 by at most 4 MiB. The
banks reach their final size within the first 1,000 runs, so anything growing after 10,000 runs is
a leak; 4 MiB is above the allocator's observed jitter (about ±1 MiB) and below what a leak of
50 bytes per run would add over the remaining 90,000 runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from metricsd.monitor import MAX_SPLITS

W = 256
R = 1_000
RUNS = 100_000
PER_TICK = 500
STREAMS = 5  # batch_time, prediction/val (binary), cv, attention, features
WINDOWS = 3  # count, 60 s, 300 s
SINGLE_CHANNELS = (1, 3, 2, 3)  # batch_time, cv, attention, features: one row per run each
PREDICTION_CHANNELS = 2
FLAT_TOLERANCE = 4 * 2**20
MiB = 2**20

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from metricsd.config import MonitorSettings
    from metricsd.events import Attention, BatchTime, CvFold, Features, Prediction
    from metricsd.monitor import Monitor

    def rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    W, R, RUNS, PER = (int(a) for a in sys.argv[1:5])
    rng = np.random.default_rng(0)
    seconds = rng.lognormal(-2.0, 0.3, W)
    y_true, y_pred = rng.integers(0, 2, W), rng.integers(0, 2, W)
    weights, vector = rng.random((4, 16)), rng.normal(size=(1, 32))
    base = rss()
    monitor = Monitor(MonitorSettings(window=W, time_windows=(60.0, 300.0), max_runs=R))
    marks, started, now = {}, time.perf_counter(), 1.0e9
    for start in range(0, RUNS, PER):
        events = []
        for i in range(start, start + PER):
            run = f"run-{i}"
            events += [
                BatchTime(run, None, None, seconds),
                Prediction(run, None, "binary", "val", y_true, y_pred),
                CvFold(run, None, 0, 0.2, 0.3),
                Attention(run, None, weights),
                Features(run, None, vector),
            ]
        monitor.ingest(events, now)
        records = monitor.due(now)
        assert records, "every tick summarises the new runs"
        del events, records
        now += 1.0
        if (start + PER) % 10_000 == 0 or start == 0:
            marks[start + PER] = rss()
    print(json.dumps({
        "base": base,
        "marks": marks,
        "seconds": time.perf_counter() - started,
        "window_bytes": monitor.window_bytes,
        "runs_tracked": monitor.runs_tracked,
        "runs_evicted": monitor.runs_evicted,
        "events_ingested": monitor.events_ingested,
        "capacity": {k.name: k.bank.capacity for k in monitor._kinds},
    }))
    """
)


def window_bound(runs: int, width: int, splits: int = 1) -> int:
    """Bytes of the window arrays: values and timestamps per row, plus 24 B of counters."""
    single = sum(runs * (c + 1) for c in SINGLE_CHANNELS)
    prediction_rows = min(MAX_SPLITS * runs, 2 * runs * splits)
    rows = len(SINGLE_CHANNELS) * runs + prediction_rows
    return 8 * width * (single + prediction_rows * (PREDICTION_CHANNELS + 1)) + 24 * rows


def tick_bound(runs: int, width: int) -> int:
    """Bytes of one kind's statistics pass: its changed rows copied plus NumPy temporaries."""
    return (max(SINGLE_CHANNELS) + 5) * runs * width * 8


def test_rss_stays_flat_and_under_the_bound_while_100000_runs_pass_through() -> None:
    """100,000 distinct runs through max_runs=1000 keep RSS under the documented bound and flat
    after the first 10,000 runs, with exactly max_runs runs tracked at the end."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(W), str(R), str(RUNS), str(PER_TICK)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    marks = {int(k): v for k, v in out["marks"].items()}
    base, warm, end = out["base"], marks[10_000], marks[RUNS]
    bound = (
        base
        + window_bound(R, W)
        + tick_bound(R, W)
        + 2048 * STREAMS * R
        + 2048 * 2 * PER_TICK * STREAMS * WINDOWS
    )
    print(
        f"\nRSS base {base / MiB:.1f} MiB, after {PER_TICK} runs {marks[PER_TICK] / MiB:.1f}, "
        f"10k {warm / MiB:.1f}, 100k {end / MiB:.1f}; bound {bound / MiB:.1f} MiB; window arrays "
        f"{out['window_bytes'] / MiB:.1f} MiB (bound {window_bound(R, W) / MiB:.1f}); "
        f"{out['seconds']:.1f} s; banks {out['capacity']}"
    )
    assert out["runs_tracked"] == R
    assert out["runs_evicted"] == {"idle": 0, "capacity": RUNS - R}
    assert out["events_ingested"] == STREAMS * RUNS
    assert out["window_bytes"] <= window_bound(R, W)
    assert max(marks.values()) <= bound
    assert end - warm <= FLAT_TOLERANCE
