"""Sustained throughput of the daemon as users run it, against the bare loop, on a pre-loaded topic.

Plan
----
1. Per run count (1,000 and 10,000; ``Sizes.sustained_runs``) one topic of ``partitions``
   partitions is pre-loaded with ``Sizes.sustained_events`` scalar batch_time events
   (``bench.ingest.scalar_records``, confluent-kafka).
2. Per tick interval (1 s and 5 s) and repetition, alternating the order, two fresh interpreters
   (``python -m bench.sustained --child ...``), each printing one JSON line:

   - **daemon**: ``metricsd.service.Service`` with the default settings except the broker, the
     topics and ``interval``: count window 1,000 plus time windows 60 s and 300 s, changelog on
     (a fresh group, so a fresh ``<group>.state`` topic), summaries published with ``acks=all``,
     commits, the default profile and stats intervals. Its public ``on_batch`` hook, called after
     every consumed ``getmany`` batch, takes a timestamp and the event count, snapshots the
     profiler's operations and the outbox's bytes per topic, and sets the stop event once N
     events are in (the final tick after that is not measured).
   - **bare loop**: the limit of the stack, as in ``bench.ingest``: the daemon's consumer
     factory and ``max_records``, ``getmany``, ``orjson.loads`` of every value, values grouped per
     run_id, one bulk NumPy ring write per key per batch; no tick, no publish, no commit. It
     ``assign()``s the partitions instead of joining a group (the join is outside the clock
     anyway and costs ~5 s on Tansu), and runs under the daemon's GC configuration (``gc.freeze``
     and the thresholds the daemon sets at start-up, as reported by the daemon child).

   Both clocks run from the end of the first batch to the end of the batch that completes N:
   the group join and the first fetch are outside both; the rate is events in between / time.
   The ratio is per repetition pair.
3. From the daemon's own profiler over the measured span (``Profiler.operations``, public;
   resets by the profile report every ``profile_interval`` are accounted for): ticks in the
   span, the share of the span spent in the blocking part of ticks (the ``tick`` operation, plus
   ``tick_wait`` when a tick waits for the previous one's commit: consumption stops), and per
   tick the phases the profiler names: statistics (``*_stats``), record building
   (``build_records``), the state snapshot (``state_changes``: copies of changed rows), changelog
   encoding (``snapshot``: zlib and records), sending (``send``: JSON encoding and
   ``producer.send``; for a pipeline without it, ``publish`` minus its nested ``acks`` and
   ``snapshot``), the wait for acknowledgements (``acks``) and the commit (``commit``).
4. Bytes handed to the producer per topic (``Outbox.sent_bytes``) over the input bytes consumed
   in the span (key + value of each input record).
5. RSS of the daemon child at the end of the span, at the largest run count and the shortest
   interval, minus its RSS after the imports (base), over ``Monitor.window_bytes``; the peak
   (``VmHWM``) too. It includes what aiokafka holds (prefetched records, the producer's buffer).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import REPO, Figure, Sizes, paired, peak_rss_bytes, rss_bytes

__all__ = ["main", "run"]

_MIB = 1024 * 1024

#: Phase figures: (label, how to get ms per tick from {operation name: total ns}).
_PHASES: tuple[tuple[str, Callable[[dict[str, int]], float]], ...] = (
    ("tick, blocking part (consumption stops)", lambda ns: ns.get("tick", 0)),
    ("waiting for the previous tick's commit", lambda ns: ns.get("tick_wait", 0)),
    ("statistics", lambda ns: sum(v for k, v in ns.items() if k.endswith("_stats"))),
    ("record building", lambda ns: ns.get("build_records", 0)),
    ("state snapshot (row copies)", lambda ns: ns.get("state_changes", 0)),
    ("changelog encoding", lambda ns: ns.get("snapshot", 0)),
    ("sending (JSON + producer.send)", lambda ns: _sending(ns)),
    ("publish wait (acks)", lambda ns: ns.get("acks", 0)),
    ("commit", lambda ns: ns.get("commit", 0)),
)


def _sending(ns: dict[str, int]) -> float:
    """``send`` if the pipeline times it apart, else ``publish`` minus what is nested in it."""
    if "send" in ns:
        return ns["send"]
    return ns.get("publish", 0) - ns.get("acks", 0) - ns.get("snapshot", 0)


# -- the children -----------------------------------------------------------------------------
class _Span:
    """First and last batch of one measured run; operations summed across profiler resets."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None
        self._ops: dict[str, tuple[int, int]] = {}  # name: (count, ns) at the last look
        self._carried: dict[str, tuple[int, int]] = {}  # totals lost to resets
        self.ops_first: dict[str, tuple[int, int]] = {}
        self.bytes_first: dict[str, int] = {}

    def look(self, operations: Sequence[Any]) -> dict[str, tuple[int, int]]:
        """Cumulative (count, ns) per operation since the process started."""
        now = {op.name: (op.count, op.total_ns) for op in operations}
        for name, (count, ns) in self._ops.items():
            c, n = now.get(name, (0, 0))
            if c < count:  # the profile report reset it: keep what it had
                cc, cn = self._carried.get(name, (0, 0))
                self._carried[name] = (cc + count, cn + ns)
        self._ops = now
        out = dict(now)
        for name, (cc, cn) in self._carried.items():
            c, n = out.get(name, (0, 0))
            out[name] = (c + cc, n + cn)
        return out


def _gc_state() -> dict[str, Any]:
    return {
        "enabled": gc.isenabled(),
        "thresholds": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
    }


async def _daemon_child(args: argparse.Namespace) -> dict[str, Any]:
    from metricsd.config import Settings
    from metricsd.service import Service

    gc.collect()
    base = rss_bytes()
    settings = Settings(
        bootstrap_servers=args.bootstrap,
        input_topic=args.topic,
        output_topic=f"{args.group}.out",
        group_id=args.group,
        interval=args.interval,
        partitions=args.partitions,
        # No HTTP port: an idle one costs nothing (bench scrape measures a scraped one), and the
        # default 9464 may be another daemon's on this machine.
        http_port=0,
    )
    stop = asyncio.Event()
    span = _Span()
    result: dict[str, Any] = {}

    def on_batch(fetched: float | None = None) -> None:  # None: a tree before the argument
        events = service.counters.events
        ops = span.look(service.profiler.operations)
        now = time.perf_counter()
        if span.first is None:  # the clock starts at the end of the first batch
            span.first = (now, events)
            if events >= args.target:  # one batch held everything: nothing left to time
                span.first = (now if fetched is None else fetched, 0)
            span.ops_first = ops
            span.bytes_first = dict(service.pipeline.outbox.sent_bytes)
            result["gc"] = _gc_state()
        if span.last is None and events >= args.target and events > span.first[1]:
            span.last = (now, events)
            first_ops = span.ops_first
            result["ops"] = {
                k: [c - first_ops.get(k, (0, 0))[0], ns - first_ops.get(k, (0, 0))[1]]
                for k, (c, ns) in ops.items()
            }
            sent = service.pipeline.outbox.sent_bytes
            result["bytes"] = {t: b - span.bytes_first.get(t, 0) for t, b in sent.items()}
            result["rss"] = rss_bytes()
            result["window_bytes"] = service.monitor.window_bytes
            stop.set()

    service = Service(settings, on_batch=on_batch)
    await service.run(stop)
    if span.first is None or span.last is None:
        raise RuntimeError("the daemon stopped before N events were consumed")
    result.update(
        seconds=span.last[0] - span.first[0],
        events=span.last[1] - span.first[1],
        base=base,
        peak=peak_rss_bytes(),
    )
    return result


async def _bare_child(args: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import TopicPartition
    from metricsd.config import Settings

    from bench.common import daemon_consumer
    from bench.ingest import _group_scalars, _Ring

    settings = Settings()
    if args.gc_thresholds:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*args.gc_thresholds)
    consumer = daemon_consumer(args.bootstrap, args.group)
    await consumer.start()
    ring = _Ring(args.runs, settings.monitor.window, 1)
    first: tuple[float, int] | None = None
    done = 0
    try:
        consumer.assign([TopicPartition(args.topic, p) for p in range(args.partitions)])
        await consumer.seek_to_beginning()
        while done < args.target:
            batch = await consumer.getmany(timeout_ms=500, max_records=settings.max_records)
            if not batch:
                continue
            done += _group_scalars(batch, ring)  # exactly the ingest bench's bare loop
            if first is None:
                first = (time.perf_counter(), done)
        last = (time.perf_counter(), done)
    finally:
        await consumer.stop()
    assert first is not None
    return {"seconds": last[0] - first[0], "events": last[1] - first[1], "gc": _gc_state()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.sustained --child daemon|bare ...``: one measured run, one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.sustained")
    parser.add_argument("--child", choices=("daemon", "bare"), required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--gc-thresholds", type=int, nargs=3, default=None)
    args = parser.parse_args(argv)
    from metricsd import logs

    logs.configure("WARNING", "json")
    child = _daemon_child if args.child == "daemon" else _bare_child
    print(json.dumps(asyncio.run(child(args))))
    return 0


# -- the benchmark ----------------------------------------------------------------------------
def _child(kind: str, bootstrap: str, topic: str, group: str, extra: list[str],
           sizes: Sizes, path: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One child; ``path``: put first on its ``PYTHONPATH`` (another tree's ``daemon/``)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-m", "bench.sustained", "--child", kind, "--bootstrap", bootstrap,
         "--topic", topic, "--group", group, "--target", str(sizes.sustained_events),
         "--partitions", str(sizes.partitions), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False, env=env,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(
            f"sustained {kind} child failed ({out.returncode}): {out.stderr[-3000:]}"
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _measure(bootstrap: str, topic: str, runs: int, interval: float, record_bytes: float,
             sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:  # fmt: skip
    label = f"{runs:,} runs, {interval:g} s tick"
    daemon = Figure("sustained", f"daemon, {label}", "events/s")
    bare = Figure("sustained", f"bare loop, {runs:,} runs", "events/s")
    ticks = Figure("sustained", f"ticks in the span, {label}", "")
    stopped = Figure("sustained", f"share of the span in the blocking tick, {label}", "%")
    phases = [Figure("sustained", f"per tick: {name}, {label}", "ms") for name, _ in _PHASES]
    out_bytes = Figure("sustained", f"output topic bytes / input bytes, {label}", "x")
    state_bytes = Figure("sustained", f"changelog bytes / input bytes, {label}", "x")
    rss = Figure("sustained", f"(RSS − base) / window_bytes, changelog on, {label}", "x")
    rss_mib = Figure("sustained", f"RSS − base, changelog on, {label}", "MiB")
    peak = Figure("sustained", f"(peak RSS − base) / window_bytes, {label}", "x")
    window_mib = Figure("sustained", f"window_bytes, {label}", "MiB")
    thresholds: list[str] = []
    # A/B against another checkout: BENCH_SUSTAINED_BASELINE=<its daemon/ directory> adds that
    # daemon to every repetition (same broker, same topic, interleaved).
    baseline_path = os.environ.get("BENCH_SUSTAINED_BASELINE") or None
    base = Figure("sustained", f"baseline daemon, {label}", "events/s", note=str(baseline_path))
    base_stopped = Figure("sustained", f"baseline: share of the span in the tick, {label}", "%")
    for rep in range(sizes.repeat):
        order: tuple[str, ...] = ("daemon", "bare") if rep % 2 == 0 else ("bare", "daemon")
        if baseline_path is not None:
            order = (order[0], "baseline", order[1])
        pair: dict[str, float] = {}
        for who in order:
            group = f"bench-sustained-{runs}-{interval:g}-{who}-{rep}-{time.time_ns()}"
            if who == "daemon":
                r = _child("daemon", bootstrap, topic, group, ["--interval", str(interval)], sizes)
                if not thresholds and r["gc"]["frozen"]:
                    thresholds = [str(t) for t in r["gc"]["thresholds"]]
                pair[who] = r["events"] / r["seconds"]
                ops = {k: v[1] for k, v in r["ops"].items()}
                n_ticks = r["ops"].get("tick", [0, 0])[0]
                ticks.samples.append(n_ticks)
                blocked = ops.get("tick", 0) + ops.get("tick_wait", 0)
                stopped.samples.append(100.0 * blocked / 1e9 / r["seconds"])
                for fig, (_, get) in zip(phases, _PHASES, strict=True):
                    fig.samples.append(get(ops) / 1e6 / max(n_ticks, 1))
                input_bytes = r["events"] * record_bytes
                out_bytes.samples.append(r["bytes"].get(f"{group}.out", 0) / input_bytes)
                state_bytes.samples.append(r["bytes"].get(f"{group}.state", 0) / input_bytes)
                rss.samples.append((r["rss"] - r["base"]) / r["window_bytes"])
                rss_mib.samples.append((r["rss"] - r["base"]) / _MIB)
                peak.samples.append((r["peak"] - r["base"]) / r["window_bytes"])
                window_mib.samples.append(r["window_bytes"] / _MIB)
            elif who == "baseline":
                extra = ["--interval", str(interval)]
                r = _child("daemon", bootstrap, topic, group, extra, sizes, baseline_path)
                pair[who] = r["events"] / r["seconds"]
                tick_ns = r["ops"].get("tick", [0, 0])[1] + r["ops"].get("tick_wait", [0, 0])[1]
                base_stopped.samples.append(100.0 * tick_ns / 1e9 / r["seconds"])
            else:
                extra = ["--runs", str(runs)]
                if thresholds:
                    extra += ["--gc-thresholds", *thresholds]
                r = _child("bare", bootstrap, topic, group, extra, sizes)
                pair[who] = r["events"] / r["seconds"]
        daemon.samples.append(pair["daemon"])
        bare.samples.append(pair["bare"])
        if "baseline" in pair:
            base.samples.append(pair["baseline"])
        log(f"sustained: {label}, repetition {rep + 1}: daemon {pair['daemon']:,.0f} events/s, "
            f"bare {pair['bare']:,.0f} events/s")  # fmt: skip
    ratio = Figure(
        "sustained", f"daemon / bare loop, {label}", "x", paired(daemon.samples, bare.samples)
    )
    daemon.note = (
        f"Service, default settings but interval; N = {sizes.sustained_events:,}; "
        f"{1e6 / daemon.median:.3g} µs/event"
    )
    bare.note = f"{1e6 / bare.median:.3g} µs/event; GC as in the daemon ({' '.join(thresholds)})"
    figures = [daemon, bare, ratio, ticks, stopped, *phases, out_bytes, state_bytes]
    if base.samples:
        ab = paired(daemon.samples, base.samples)
        figures += [
            base,
            Figure("sustained", f"baseline daemon / bare loop, {label}", "x",
                   paired(base.samples, bare.samples)),
            Figure("sustained", f"daemon / baseline daemon, {label}", "x", ab),
            base_stopped,
        ]  # fmt: skip
    if runs == max(sizes.sustained_runs) and interval == min(sizes.sustained_intervals):
        figures += [rss, rss_mib, peak, window_mib]
    return figures


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """Every sustained figure, on a fresh embedded broker per run count."""
    from metricsd.devbroker import DevBroker

    from bench.ingest import preload, scalar_records

    figures: list[Figure] = []
    for runs in sizes.sustained_runs:
        with DevBroker() as broker:
            topic = f"bench.sustained.{runs}"
            records = scalar_records(sizes.sustained_events, runs, sizes.partitions)
            size = sum(len(k) + len(v) for k, v, _ in records) / len(records)
            seconds = preload(broker.bootstrap, topic, records, sizes.partitions)
            del records
            figures.append(
                Figure(
                    "sustained",
                    f"pre-load {sizes.sustained_events:,} events, {runs:,} runs",
                    "s",
                    [seconds],
                    note=f"{size:.0f} B/record (key + value), {sizes.partitions} partitions",
                )
            )
            log(f"sustained: pre-loaded {sizes.sustained_events:,} events ({runs:,} runs)")
            for interval in sizes.sustained_intervals:
                figures += _measure(broker.bootstrap, topic, runs, interval, size, sizes, log)
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
