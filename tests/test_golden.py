"""Golden fixture: the Monitor's output bytes for a fixed, varied event sequence never change.

A deterministic generator (fixed seeds) drives Monitors through every stream kind (batch_time as
scalars and lists, binary, multiclass and regression predictions over many splits, cross-validation
folds with re-sent and huge fold ids, attention matrices and feature vectors of several shapes),
``run_end`` mid-batch, capacity and idle eviction, MAX_SPLITS closing, a prediction task change,
count and time windows (truncated ones included), events without a timestamp, partition release,
and a second Monitor rebuilt from the first one's ``state_changes()`` through ``restore``. A last
scenario uses a window wide enough that a tick is computed in several row chunks.

Every observable output is written as one line of ``orjson.dumps(..., option=OPT_SORT_KEYS)``:
the records of ``due``/``release_partitions``, the ``state_changes()`` output (snapshots with
their float bytes in hex, so the comparison is exact), the counters, and the profiler's operation
names in first-use order. The fixture was recorded from the code before the monitor was split
(commit "Golden fixture ..."); the test asserts the current code reproduces it byte for byte.

Regenerate (only for an intended output change, and say so in the commit):
``.venv/bin/python tests/test_golden.py --write``
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from metricsd.changelog import Changelog, Placed, Restore, RowState
from metricsd.config import MonitorSettings
from metricsd.events import Decoder, Event
from metricsd.monitor import MAX_SPLITS, Monitor
from metricsd.profiler import Profiler

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "monitor_golden.jsonl.gz"
_decoder = Decoder()


def _ev(**doc: Any) -> Event:
    """An event as the daemon decodes it from the wire (so array dtypes are the real ones)."""
    return _decoder.decode(None, orjson.dumps(doc))


def _line(tag: str, payload: Any) -> bytes:
    return orjson.dumps({"op": tag, "out": payload}, option=orjson.OPT_SORT_KEYS)


def _state(item: tuple[int, RowState]) -> dict[str, Any]:
    partition, s = item
    snap = s.snapshot
    return {
        "partition": partition,
        "run_id": s.run_id,
        "stream": s.stream,
        "kind": s.kind,
        "task": s.task,
        "seq": s.seq,
        "latest": s.latest,
        "values": np.ascontiguousarray(snap.values, dtype=np.float64).tobytes().hex(),
        "shape": list(snap.values.shape),
        "ts": np.ascontiguousarray(snap.ts, dtype=np.float64).tobytes().hex(),
        "total": snap.total,
        "window": snap.window,
    }


def _counters(m: Monitor) -> dict[str, Any]:
    return {
        "runs_tracked": m.runs_tracked,
        "runs_evicted": m.runs_evicted,
        "streams_evicted": m.streams_evicted,
        "rows_tracked": m.rows_tracked,
        "window_bytes": m.window_bytes,
        "runs_on_0_2": sorted(m.runs_on([0, 2])),
        "events_ingested": m.events_ingested,
        "values_ingested": m.values_ingested,
    }


class _Generator:
    """Random but reproducible batches of events over a pool of run ids."""

    def __init__(self, seed: int, runs: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.runs = [f"run{i}" for i in range(runs)]

    def _ts(self, now: float) -> float | None:
        r = self.rng.random()
        if r < 0.1:
            return None  # stands in for `now`
        if r < 0.2:
            return now - float(self.rng.uniform(20.0, 60.0))  # old: outside the short window
        return now - float(self.rng.uniform(0.0, 8.0))

    def _floats(self, n: int, style: int) -> list[float]:
        rng = self.rng
        if style == 0:
            return [float(x) for x in rng.lognormal(-2.0, 0.5, n)]
        if style == 1:
            return [0.25] * n  # constant window
        if style == 2:
            return [float(x) for x in 1e6 + rng.normal(0.0, 1e-6, n)]  # tiny variance, big mean
        return [float(x) for x in rng.integers(-3, 4, n)]  # repeated integers, zeros

    def event(self, now: float, run: str) -> Event:
        rng = self.rng
        ts = self._ts(now)
        kind = int(rng.integers(0, 9))
        if kind <= 1:
            style = int(rng.integers(0, 4))
            if rng.random() < 0.5:
                return _ev(
                    type="batch_time",
                    run_id=run,
                    ts=ts,
                    step=1,
                    seconds=abs(self._floats(1, style)[0]),
                )
            n = int(rng.integers(1, 9))
            return _ev(
                type="batch_time",
                run_id=run,
                ts=ts,
                seconds=[abs(x) for x in self._floats(n, style)],
            )
        if kind <= 4:
            task = ("binary", "multiclass", "regression")[kind - 2]
            split = f"s{int(rng.integers(0, MAX_SPLITS + 3))}" if rng.random() < 0.6 else None
            n = int(rng.integers(1, 12))
            if task == "binary":
                y_true = rng.integers(0, 2, n).tolist()
                y_pred = rng.integers(0, 2, n).tolist() if rng.random() < 0.8 else y_true
            elif task == "multiclass":
                k = int(rng.integers(2, 7))
                y_true = rng.integers(0, k, n).tolist()
                y_pred = rng.integers(0, k, n).tolist()
            else:
                style = int(rng.integers(0, 4))
                y_true = self._floats(n, style)
                noise = rng.normal(0.0, 0.1, n) if rng.random() < 0.8 else np.zeros(n)
                y_pred = [float(a + b) for a, b in zip(y_true, noise, strict=True)]
            doc: dict[str, Any] = {"type": "prediction", "run_id": run, "ts": ts, "task": task}
            if split is not None:
                doc["split"] = split
            return _ev(**doc, y_true=y_true, y_pred=y_pred)
        if kind == 5:
            r = rng.random()
            fold = int(rng.integers(0, 6)) if r < 0.9 else int(2**63 - 1 - rng.integers(0, 3))
            return _ev(
                type="cv_fold", run_id=run, ts=ts, fold=fold,
                train_loss=float(rng.uniform(0.0, 2.0)), val_loss=float(rng.uniform(0.0, 3.0)),
            )  # fmt: skip
        if kind == 6:
            heads, positions = int(rng.integers(1, 4)), int(rng.integers(1, 9))
            weights = rng.random((heads, positions))
            if rng.random() < 0.15:
                weights[:] = 0.0
            doc = {"type": "attention", "run_id": run, "ts": ts}
            flat = heads == 1 and rng.random() < 0.5
            return _ev(**doc, weights=weights[0].tolist() if flat else weights.tolist())
        vectors, dims = int(rng.integers(1, 4)), int(rng.integers(1, 11))
        values = rng.normal(0.0, 2.0, (vectors, dims))
        values[rng.random((vectors, dims)) < 0.3] = 0.0
        if rng.random() < 0.1:
            values[:] = 3.5
        return _ev(type="features", run_id=run, ts=ts, values=values.tolist())

    def batch(self, now: float, size: int, active: list[str]) -> list[Event]:
        events: list[Event] = []
        for _ in range(size):
            run = active[int(self.rng.integers(0, len(active)))]
            if self.rng.random() < 0.03:
                events.append(_ev(type="run_end", run_id=run, ts=now))
            else:
                events.append(self.event(now, run))
        return events


def _task_change(run: str, now: float) -> list[Event]:
    """The same split changes task: the old window closes, a new one starts."""
    flip = {"type": "prediction", "run_id": run, "ts": now, "split": "flip"}
    return [
        _ev(**flip, task="binary", y_true=[1, 0], y_pred=[1, 1]),
        _ev(**flip, task="regression", y_true=[1.5], y_pred=[1.25]),
    ]


_PARTITIONS = range(-1, 4)  # -1: a row whose partition is unknown
_CHUNK = 4  # values per changelog chunk: the 16-value windows are written in parts


def _restore(log: list[Placed]) -> list[tuple[int, RowState]]:
    """What a changelog reader rebuilds from every record written so far."""
    restore = Restore(_PARTITIONS, "golden")
    for p, (key, value) in [*log, *restore.fences]:
        restore.feed(p, key, value)
    result = restore.result()
    assert result.corrupt == 0
    return result.rows


def _main_scenario() -> Iterator[bytes]:
    settings = MonitorSettings(window=16, time_windows=(5.0, 30.0), max_runs=8, idle_timeout=40.0)
    profiler = Profiler()
    monitor = Monitor(settings, profiler, track_changes=True, chunk_values=_CHUNK)
    gen = _Generator(seed=20240601, runs=11)
    changelog, log = Changelog(), []
    changelog.assign(_PARTITIONS)
    restored: Monitor | None = None
    now = 1000.0
    for tick in range(26):
        now += float(gen.rng.uniform(0.5, 4.0))
        if tick == 14:
            now += 45.0  # longer than idle_timeout: idle eviction at the next due
        active = gen.runs[: 3 + tick % 7]
        # Tick 14 brings no events after the gap: every run is idle-evicted by its due.
        for part in range(int(gen.rng.integers(1, 4)) if tick != 14 else 0):
            partition = int(gen.rng.integers(0, 4))
            events = gen.batch(now, int(gen.rng.integers(10, 45)), active)
            if tick == 6 and part == 0:
                events += _task_change(active[0], now)
            monitor.ingest(events, now, partition)
            if restored is not None:
                restored.ingest(events, now, partition)
        if tick == 9:
            # Capacity eviction at once: many new runs in one batch.
            burst = [_ev(type="batch_time", run_id=f"burst{i}", seconds=0.5 + i) for i in range(9)]
            monitor.ingest(burst, now, 3)
        if tick == 18:
            # A rebalance takes partitions 1 and 3 away before the tick: their pending data goes.
            yield _line("release", monitor.release_partitions([1, 3], now))
            yield _line("release_counters", _counters(monitor))
            released = monitor.state_changes()
            log += changelog.tick(dict.fromkeys(_PARTITIONS, tick + 1), *released)
            yield _line(
                "release_changes",
                [[_state(c) for c in released[0]], [list(r) for r in released[1]]],
            )
        if tick % 5 == 4:
            monitor.end_run(active[-1], now)
        yield _line(f"due@{tick}", monitor.due(now))
        changes = monitor.state_changes()
        yield _line(
            f"changes@{tick}", [[_state(c) for c in changes[0]], [list(r) for r in changes[1]]]
        )
        log += changelog.tick(dict.fromkeys(_PARTITIONS, tick + 1), *changes)
        yield _line(f"counters@{tick}", _counters(monitor))
        if restored is not None:
            yield _line(f"restored_due@{tick}", restored.due(now))
            yield _line(f"restored_counters@{tick}", _counters(restored))
        if tick == 11:
            # A new owner rebuilds every row from the changelog and then sees the same events.
            restored = Monitor(
                settings, Profiler(enabled=False), track_changes=True, chunk_values=_CHUNK
            )
            for partition, state in _restore(log):
                restored.restore(state, partition)
            restored_changes = restored.state_changes()
            yield _line(
                "restored_changes", [[_state(c) for c in restored_changes[0]], restored_changes[1]]
            )
            yield _line("restored_counters", _counters(restored))
    for run in list(gen.runs) + [f"burst{i}" for i in range(9)]:
        monitor.end_run(run, now + 1.0)
    yield _line("finals", monitor.due(now + 1.0))
    yield _line("final_counters", _counters(monitor))
    yield _line("operations", [[op.name, op.category] for op in profiler.operations])


def _chunked_scenario() -> Iterator[bytes]:
    """A window of 2**17 slots: the tick and the statistics both run over several row chunks."""
    settings = MonitorSettings(window=1 << 17, time_windows=(10.0,), max_runs=8)
    monitor = Monitor(settings, Profiler(enabled=False))
    rng = np.random.default_rng(7)
    now = 50.0
    for tick in range(3):
        now += 5.0
        events: list[Event] = []
        for r in range(5):
            seconds = rng.lognormal(0.0, 1.0, int(rng.integers(1, 40))).tolist()
            events.append(
                _ev(type="batch_time", run_id=f"c{r}", ts=now - 12.0 + r, seconds=seconds)
            )
            events.append(_ev(type="batch_time", run_id=f"c{r}", ts=now, seconds=seconds[:3]))
            y = rng.normal(0.0, 1.0, 6).tolist()
            events.append(
                _ev(
                    type="prediction",
                    run_id=f"c{r}",
                    ts=now,
                    task="regression",
                    y_true=y,
                    y_pred=y[::-1],
                )
            )
        monitor.ingest(events, now, 0)
        yield _line(f"chunked_due@{tick}", monitor.due(now))
    for r in range(5):
        monitor.end_run(f"c{r}", now)
    yield _line("chunked_finals", monitor.due(now))


def golden_lines() -> list[bytes]:
    return [*_main_scenario(), *_chunked_scenario()]


def test_monitor_output_bytes_match_the_golden_fixture() -> None:
    expected = gzip.decompress(FIXTURE.read_bytes()).split(b"\n")
    actual = golden_lines()
    assert len(actual) == len(expected)
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got == want, f"line {i} ({orjson.loads(want)['op']}) differs"


def test_the_fixture_covers_every_kind_and_event() -> None:
    """Guards the generator: a change that stopped exercising something would pass vacuously."""
    lines = [orjson.loads(line) for line in gzip.decompress(FIXTURE.read_bytes()).split(b"\n")]
    by_op = {line["op"]: line["out"] for line in lines}
    records = [
        r
        for line in lines
        if isinstance(line["out"], list)
        for r in line["out"]
        if isinstance(r, dict) and r.get("type") == "summary"
    ]
    streams = {r["stream"].split("/")[0] for r in records}
    assert streams == {"batch_time", "prediction", "cv", "attention", "features"}
    assert {r.get("task") for r in records} >= {"binary", "multiclass", "regression"}
    assert any(r["final"] for r in records) and any(not r["final"] for r in records)
    assert any(r["window"].get("truncated") for r in records)
    assert {r["window"]["kind"] for r in records} == {"count", "time"}
    assert any(r["stream"] == "prediction/flip" and r.get("task") == "regression" for r in records)
    assert by_op["release"] and by_op["restored_changes"] == [[], []]
    assert any(by_op[f"restored_due@{t}"] for t in range(12, 26))
    final = by_op["final_counters"]
    assert final["runs_evicted"]["idle"] > 0 and final["runs_evicted"]["capacity"] > 0
    assert final["streams_evicted"] > 0 and final["runs_tracked"] == 0
    assert len(by_op["chunked_finals"]) == 5 * 2 * 2  # 5 runs x 2 streams x 2 windows


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden.py --write")
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_bytes(gzip.compress(b"\n".join(golden_lines()), mtime=0))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
