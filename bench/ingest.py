"""Ingest throughput: the daemon against the bare consume loop, on the same pre-loaded topic.

Plan
----
1. Pre-load a topic (``partitions`` partitions, key = run_id, partition = run index mod
   partitions) with the events, using confluent-kafka (librdkafka: one C call per record, big
   batches) so that loading 1,000,000 events takes seconds; the loading time is reported.
2. For each repetition, in one process, one after the other (the order alternates between
   repetitions), each with a fresh consumer group and its own event loop:

   - **daemon**: ``metricsd.service.Service`` itself, with the default profiler, ``interval``,
     ``profile_interval`` and ``stats_interval`` of one hour so that no tick, profile or stats
     line happens while it is measured. Its public ``on_batch`` hook (called after every
     consumed ``getmany`` batch with the moment ``getmany`` returned it) gives the moment the
     first batch was in hand and takes a timestamp after the batch that brings
     ``counters.events`` to N, which then sets the stop event.
   - **bare loop**: the limit of the stack (one aiokafka consumer): the same consumer settings
     (``metricsd.kafka.consumer``, same group subscription, ``max_records`` as the daemon),
     ``getmany``, ``orjson.loads`` of every value, values grouped per run_id, then one bulk NumPy
     ring write per key per ``getmany``. Timed from the return of the first non-empty
     ``getmany`` to the end of the batch that completes N.

   Both clocks start when the first records are in hand and stop when the N-th is processed, so
   the group join (about 5 s on Tansu) and the first fetch are outside both. Ratios are per
   repetition pair.
3. The cyclic garbage collector: the daemon runs with whatever GC configuration it sets for
   itself (today none: enabled, default thresholds); its configuration is read inside the daemon
   at its first consume step and the bare loop runs under the same (``gc.set_threshold``,
   ``gc.freeze`` if the daemon froze objects), so both run "as the daemon runs by default". A
   configuration the CLI would set before starting the service is not seen by this in-process
   run. A second set of figures with the GC disabled for both shows what it costs each.

The daemon's own profiler is read at the moment the N-th event is in, giving ``decode`` and
``ingest`` microseconds per event; the rest of its time is aiokafka and the loop.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from metricsd.config import Settings
from metricsd.devbroker import DevBroker
from metricsd.service import Service
from numpy.typing import NDArray

from bench.common import Figure, Sizes, create_topics, daemon_consumer, paired

__all__ = ["prediction_records", "run", "scalar_records"]

Record = tuple[bytes, bytes, int]  # key, value, partition
_TS0 = 1_764_000_000.0
_HOUR = 3600.0


# -- data -------------------------------------------------------------------------------------
def scalar_records(events: int, runs: int, partitions: int, seed: int = 1) -> list[Record]:
    """``events`` batch_time events (about 90 bytes each), round-robin over ``runs`` runs.

    ``{"type":"batch_time","run_id":"r17","ts":...,"step":...,"seconds":...}``; the run's step
    advances by one per round, its event time by 0.25 s.
    """
    rng = np.random.default_rng(seed)
    seconds = rng.lognormal(np.log(0.15), 0.2, events).tolist()
    keys = [b"r%d" % r for r in range(runs)]
    out: list[Record] = []
    append = out.append
    for i, s in enumerate(seconds):
        r, step = i % runs, i // runs
        value = b'{"type":"batch_time","run_id":"r%d","ts":%.3f,"step":%d,"seconds":%.6f}' % (
            r,
            _TS0 + step * 0.25,
            step,
            s,
        )
        append((keys[r], value, r % partitions))
    return out


def prediction_records(
    events: int, runs: int, pairs: int, partitions: int, seed: int = 2
) -> list[Record]:
    """``events`` binary prediction events of ``pairs`` (y_true, y_pred) pairs each."""
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    for i in range(events):
        r = i % runs
        y_true = rng.integers(0, 2, pairs)
        y_pred = np.where(rng.random(pairs) < 0.8, y_true, 1 - y_true)
        value = orjson.dumps(
            {
                "type": "prediction",
                "run_id": f"r{r}",
                "ts": _TS0 + (i // runs) * 2.5,
                "task": "binary",
                "split": "val",
                "y_true": y_true.tolist(),
                "y_pred": y_pred.tolist(),
            }
        )
        out.append((b"r%d" % r, value, r % partitions))
    return out


def preload(bootstrap: str, topic: str, records: list[Record], partitions: int) -> float:
    """Create ``topic`` and write every record; return the seconds until all were acknowledged."""
    from confluent_kafka import Producer

    asyncio.run(create_topics(bootstrap, {topic: partitions}))
    failed: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
            "compression.type": "none",
            "log_level": 3,  # errors only: Tansu closes idle connections, librdkafka says so
        }
    )
    start = time.perf_counter()
    produce = producer.produce
    for key, value, partition in records:
        while True:
            try:
                produce(topic, value, key, partition, on_delivery=on_delivery)
                break
            except BufferError:  # more records than librdkafka queues at once: let it drain
                producer.poll(0.1)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - start
    if remaining or failed:
        raise RuntimeError(
            f"pre-loading {topic}: {remaining} unsent, {len(failed)} failed ({failed[:3]})"
        )
    return seconds


# -- the daemon -------------------------------------------------------------------------------
@dataclass(slots=True)
class _Timing:
    """first → last of one measured run, plus what the daemon's profiler said at the end."""

    first: float | None = None
    last: float | None = None
    events: int = 0  # processed between first and last
    operations: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (count, ns)
    gc_state: _GcState | None = None  # the cyclic GC as the daemon ran it

    @property
    def seconds(self) -> float:
        if self.first is None or self.last is None:
            raise RuntimeError("the run ended before N events were consumed")
        return self.last - self.first


@dataclass(frozen=True, slots=True)
class _GcState:
    """The cyclic garbage collector's configuration at one moment."""

    enabled: bool
    thresholds: tuple[int, ...]
    frozen: int  # objects moved to the permanent generation by gc.freeze()

    @classmethod
    def now(cls) -> _GcState:
        return cls(gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())

    def describe(self) -> str:
        if not self.enabled:
            return "GC disabled"
        frozen = f", {self.frozen:,} frozen" if self.frozen else ""
        return f"GC thresholds {self.thresholds}{frozen}"


def _snapshot(service: Service) -> dict[str, tuple[int, int]]:
    return {op.name: (op.count, op.total_ns) for op in service.profiler.operations}


def _settings(
    bootstrap: str, topic: str, group: str, partitions: int, **overrides: Any
) -> Settings:
    """The measured daemon's settings: the defaults, but no tick, profile or stats line while it
    is timed, and no HTTP port (bench/scrape.py measures one side by side)."""
    given: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": topic,
        "output_topic": f"{topic}.out",
        "group_id": group,
        "interval": _HOUR,
        "profile_interval": _HOUR,
        "stats_interval": _HOUR,
        "partitions": partitions,
        "http_port": 0,
    }
    return Settings(**(given | overrides))


def _timed_service(
    settings: Settings, target: int, reached: asyncio.Event
) -> tuple[Service, _Timing]:
    """The daemon and the clock of its timed window, through the service's public ``on_batch``
    hook (after every consumed batch: a timestamp per batch, about 40 per run, costs nothing
    measurable and is exact to the batch): it starts when the first batch is in hand and stops
    at the batch that brings the N-th event, which sets ``reached``."""
    timing = _Timing()

    def on_batch(fetched: float) -> None:
        now = time.perf_counter()
        events = service.counters.events
        if timing.first is None:
            timing.first = fetched
            timing.gc_state = _GcState.now()
        if timing.last is None and events >= target:
            timing.last = now
            timing.events = events
            timing.operations = _snapshot(service)
            reached.set()

    service = Service(settings, on_batch=on_batch)
    return service, timing


async def _daemon(
    bootstrap: str, topic: str, group: str, target: int, partitions: int, **overrides: Any
) -> _Timing:
    stop = asyncio.Event()
    service, timing = _timed_service(
        _settings(bootstrap, topic, group, partitions, **overrides), target, stop
    )
    await service.run(stop)
    return timing


# -- the bare loop ----------------------------------------------------------------------------
class _Ring:
    """The bare loop's ring buffers: ``channels`` x rows x ``width``, one row per run."""

    def __init__(self, rows: int, width: int, channels: int) -> None:
        self.values = np.zeros((channels, rows, width))
        self.width = width
        self.head: dict[str, int] = {}
        self.row: dict[str, int] = {}

    def write(self, key: str, block: NDArray[np.float64]) -> None:
        """Append ``block`` (channels, k) to the row of ``key``: one or two slice writes."""
        row = self.row.get(key)
        if row is None:
            row = self.row[key] = len(self.row)
            self.head[key] = 0
        k, w = block.shape[1], self.width
        if k >= w:
            self.values[:, row, :] = block[:, k - w :]
            self.head[key] = 0
            return
        h = self.head[key]
        first = min(k, w - h)
        self.values[:, row, h : h + first] = block[:, :first]
        if first < k:
            self.values[:, row, : k - first] = block[:, first:]
        self.head[key] = (h + k) % w


def _group_scalars(batch: dict[Any, list[Any]], ring: _Ring) -> int:
    loads = orjson.loads
    groups: dict[str, list[float]] = {}
    n = 0
    for records in batch.values():
        for record in records:
            doc = loads(record.value)
            values = groups.get(doc["run_id"])
            if values is None:
                values = groups[doc["run_id"]] = []
            values.append(doc["seconds"])
        n += len(records)
    for key, values in groups.items():
        ring.write(key, np.array(values, dtype=np.float64)[None, :])
    return n


def _group_pairs(batch: dict[Any, list[Any]], ring: _Ring) -> int:
    loads = orjson.loads
    groups: dict[str, tuple[list[int], list[int]]] = {}
    n = 0
    for records in batch.values():
        for record in records:
            doc = loads(record.value)
            pair = groups.get(doc["run_id"])
            if pair is None:
                pair = groups[doc["run_id"]] = ([], [])
            pair[0].extend(doc["y_true"])
            pair[1].extend(doc["y_pred"])
        n += len(records)
    for key, (y_true, y_pred) in groups.items():
        ring.write(key, np.array((y_true, y_pred), dtype=np.float64))
    return n


_Step = Callable[[dict[Any, list[Any]], _Ring], int]


async def _bare(
    bootstrap: str, topic: str, group: str, target: int, runs: int, channels: int, step: _Step
) -> _Timing:
    consumer = daemon_consumer(bootstrap, group)
    await consumer.start()
    timing = _Timing()
    ring = _Ring(runs, Settings().monitor.window, channels)
    max_records = Settings().max_records
    try:
        consumer.subscribe([topic])
        done = 0
        while done < target:
            batch = await consumer.getmany(timeout_ms=500, max_records=max_records)
            if not batch:
                continue
            if timing.first is None:  # the clock starts when the first batch is in hand
                timing.first = time.perf_counter()
            done += step(batch, ring)
        timing.last = time.perf_counter()
        timing.events = done
    finally:
        await consumer.stop()
    return timing


# -- the benchmark ----------------------------------------------------------------------------
@contextmanager
def _gc(state: _GcState | None) -> Iterator[None]:
    """Run under ``state`` (None: as the interpreter is); restore the GC afterwards."""
    before = _GcState.now()
    if state is not None:
        gc.set_threshold(*state.thresholds)
        if state.frozen and not before.frozen:
            gc.freeze()
        (gc.enable if state.enabled else gc.disable)()
    try:
        yield
    finally:
        if gc.get_freeze_count() and not before.frozen:
            gc.unfreeze()
        gc.set_threshold(*before.thresholds)
        (gc.enable if before.enabled else gc.disable)()


_GC_OFF = _GcState(False, gc.get_threshold(), 0)


def _compare(
    bootstrap: str,
    topic: str,
    label: str,
    target: int,
    per_event: int,
    unit: str,
    sizes: Sizes,
    step: _Step,
    channels: int,
    gc_enabled: bool,
) -> list[Figure]:
    """Interleaved repetitions of daemon and bare loop on ``topic``; rates per ``unit``."""
    suffix = "" if gc_enabled else ", GC off"
    daemon = Figure("ingest", f"daemon, {label}{suffix}", unit)
    bare = Figure("ingest", f"bare loop, {label}{suffix}", unit)
    decode = Figure("ingest", f"daemon decode, {label}{suffix}", "µs/event", digits=3)
    ingest = Figure("ingest", f"daemon Monitor.ingest, {label}{suffix}", "µs/event", digits=3)
    tag = "gc" if gc_enabled else "nogc"
    # The bare loop runs under the GC configuration seen inside the daemon while it consumed
    # (the first repetition runs the daemon first to learn it), or with the GC off for both.
    daemon_gc: _GcState | None = None if gc_enabled else _GC_OFF
    for rep in range(sizes.repeat):
        order = ("daemon", "bare") if rep % 2 == 0 else ("bare", "daemon")
        for who in order:
            group = f"bench-{topic}-{tag}-{who}-{rep}-{time.time_ns()}"
            if who == "daemon":
                with _gc(None if gc_enabled else _GC_OFF):
                    timing = asyncio.run(_daemon(bootstrap, topic, group, target, sizes.partitions))
                if gc_enabled and daemon_gc is None:
                    daemon_gc = timing.gc_state
            else:
                with _gc(daemon_gc):
                    timing = asyncio.run(
                        _bare(bootstrap, topic, group, target, sizes.ingest_runs, channels, step)
                    )
            rate = timing.events * per_event / timing.seconds
            if who == "daemon":
                daemon.samples.append(rate)
                for fig, op in ((decode, "decode"), (ingest, "ingest")):
                    _, total_ns = timing.operations.get(op, (0, 0))
                    fig.samples.append(total_ns / 1000.0 / timing.events)
            else:
                bare.samples.append(rate)
    ratio = Figure(
        "ingest", f"daemon / bare loop, {label}{suffix}", "x", paired(daemon.samples, bare.samples)
    )
    daemon.note = f"end of first batch → N-th record (Service.on_batch); N = {target:,}"
    if daemon_gc is not None:
        bare.note = f"{daemon_gc.describe()}, as in the daemon"
    for fig in (daemon, bare):
        per = "event" if per_event == 1 else "pair"
        scale, unit_ = (1e6, "µs") if per_event == 1 else (1e9, "ns")
        note = f"{scale / fig.median:.3g} {unit_}/{per}"
        fig.note = f"{fig.note}; {note}" if fig.note else note
    return [daemon, bare, ratio, decode, ingest]


def run(sizes: Sizes, log: Callable[[str], None]) -> list[Figure]:
    """Every ingest figure, on a fresh embedded broker."""
    figures: list[Figure] = []
    with DevBroker() as broker:
        bootstrap = broker.bootstrap
        records = scalar_records(sizes.ingest_events, sizes.ingest_runs, sizes.partitions)
        size = sum(len(v) for _, v, _ in records) / len(records)
        seconds = preload(bootstrap, "bench.scalar", records, sizes.partitions)
        del records
        figures.append(
            Figure(
                "ingest",
                f"pre-load {sizes.ingest_events:,} batch_time events",
                "s",
                [seconds],
                note=f"confluent-kafka, {size:.0f} B/event, {sizes.ingest_runs:,} runs, "
                f"{sizes.partitions} partitions",
            )
        )
        log(f"ingest: pre-loaded {sizes.ingest_events:,} events in {seconds:.1f} s")
        for gc_enabled in (True, False) if sizes.gc_off_variant else (True,):
            figures += _compare(
                bootstrap,
                "bench.scalar",
                "batch_time",
                sizes.ingest_events,
                1,
                "events/s",
                sizes,
                _group_scalars,
                1,
                gc_enabled,
            )
            log(f"ingest: batch_time (GC {'on' if gc_enabled else 'off'}) done")
        records = prediction_records(
            sizes.prediction_events, sizes.ingest_runs, sizes.prediction_pairs, sizes.partitions
        )
        size = sum(len(v) for _, v, _ in records) / len(records)
        seconds = preload(bootstrap, "bench.prediction", records, sizes.partitions)
        del records
        figures.append(
            Figure(
                "ingest",
                f"pre-load {sizes.prediction_events:,} prediction events",
                "s",
                [seconds],
                note=f"{sizes.prediction_pairs} pairs (binary), {size:.0f} B/event",
            )
        )
        label = f"prediction x{sizes.prediction_pairs}"
        figures += _compare(
            bootstrap,
            "bench.prediction",
            label,
            sizes.prediction_events,
            sizes.prediction_pairs,
            "pairs/s",
            sizes,
            _group_pairs,
            2,
            True,
        )
        log("ingest: prediction done")
    return figures
