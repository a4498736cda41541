"""The asyncio shell: consume -> decode -> monitor -> publish -> commit.

Lifecycle (one readable loop, arq style): ``run(settings, stop)`` creates the topics, starts the
producer and the group consumer, then loops until ``stop`` is set:

1. ``getmany`` a batch (waiting at most until the next tick), decode each record; bad records
   become dead letters (reason, counter, rate-limited warning, original bytes) and their offsets
   advance like any other.
2. ``monitor.ingest`` per partition; remember the next offset of every partition consumed.
3. At each tick (every ``interval`` seconds, scheduled on a fixed grid so it does not drift):
   ``monitor.due(now)``, publish every summary, wait until the broker acknowledged them and the
   dead letters sent since the previous tick, then commit the offsets remembered before the tick.
   A publish that fails keeps its records for the next tick and holds the commit back.

At-least-once: after a crash, records after the last commit are consumed again, so a consumer of
the summary topic may see a summary twice; ``id`` (run, stream, window, seq) de-duplicates.

Shutdown (SIGTERM/SIGINT set ``stop``): a final tick, flush, commit, then the clients stop in
reverse order of start-up, and one ``stopped`` line with the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from metricsd import kafka
from metricsd.changelog import (
    Restorer,
    RowState,
    checkpoint_record,
    encode_row,
    fence_record,
    tombstones,
)
from metricsd.config import Settings
from metricsd.events import Decoder, Event, InvalidEvent
from metricsd.logs import RateLimiter
from metricsd.monitor import Monitor
from metricsd.profiler import Profiler
from metricsd.records import dead_letter, encode, profile_record

__all__ = ["Counters", "Service", "run"]

log = structlog.get_logger(__name__)

_Pending = tuple[str, bytes | None, bytes | None, int | None]  # topic, key, value, partition

# Base64 grows a value by 4/3: beyond this the dead letter would not fit Kafka's default 1 MB
# message limit, so only this prefix is kept (flagged ``value_truncated``).
_DEAD_LETTER_VALUE_BYTES = 700_000


@dataclass
class Counters:
    """What the service did, for the ``stats`` and ``stopped`` log lines."""

    records: int = 0
    events: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    summaries: int = 0
    dead_letters: int = 0
    profiles: int = 0
    publish_failures: int = 0
    commits: int = 0
    ticks: int = 0
    snapshots: int = 0


class Service:
    """One daemon instance: the Kafka clients around a :class:`Monitor`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.profiler = Profiler()
        self.monitor = Monitor(settings.monitor, self.profiler, track_changes=settings.changelog)
        self.decoder = Decoder(
            max_array=settings.monitor.max_array, max_classes=settings.monitor.max_classes
        )
        self.counters = Counters()
        self._warnings = RateLimiter(period=10.0)
        self._consumed: dict[kafka.TopicPartition, int] = {}
        self._unacked: list[_Pending] = []  # records whose publish failed: retried first
        self._in_flight: list[tuple[_Pending, asyncio.Future[Any]]] = []
        self._lock = asyncio.Lock()  # a tick and a rebalance callback never interleave
        self._producer: Any = None
        self._consumer: Any = None
        self._last_tick_ms = 0.0
        self.assigned: set[kafka.TopicPartition] = set()
        # Changelog bookkeeping: chunk keys each row last wrote, the last checkpoint per partition.
        self._chunks: dict[tuple[str, str], int] = {}
        self._checkpointed: dict[int, int] = {}
        self._fatal: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # An unreachable broker at start-up is waited for (with backoff and a warning per
        # attempt) until it comes or a signal arrives; refused TLS/SASL fails at once.
        topics = kafka.ensure_topics(
            s.bootstrap_servers, s.topics(), security=s.security, timeout=None
        )
        done, created = await _unless_stopped(topics, stop)
        if not done:
            log.info("stopped", reason="signal before the broker was reachable")
            return
        log.info(
            "topics_ready",
            created=created,
            input=s.input_topic,
            output=s.output_topic,
            dead_letter=s.dead_letter_topic,
        )
        self._producer = kafka.producer(s.bootstrap_servers, security=s.security)
        await self._producer.start()
        _tune_gc()
        try:
            if s.changelog:
                # The changelog mirrors the input's partitioning: a run's state sits in the
                # changelog partition numbered like the input partition its events arrive on.
                partitions = len(await self._producer.partitions_for(s.input_topic))
                await kafka.ensure_topics(
                    s.bootstrap_servers,
                    {s.state_topic: partitions},
                    security=s.security,
                    configs={s.state_topic: {"cleanup.policy": "compact"}},
                )
            self._consumer = kafka.consumer(
                s.bootstrap_servers,
                s.group_id,
                security=s.security,
                # A broker that does not answer a fetch early when records arrive (Tansu) holds
                # them for up to this long: keep it a small share of the tick interval.
                fetch_max_wait_ms=int(min(500.0, s.interval * 1000 / 20)),
            )
            await self._consumer.start()
            try:
                self._consumer.subscribe(
                    [s.input_topic], listener=kafka.Partitions(self._revoked, self._assigned)
                )
                log.info(
                    "started",
                    instance=self.instance,
                    group_id=s.group_id,
                    interval=s.interval,
                    window=s.monitor.window,
                    time_windows=list(s.monitor.time_windows),
                )
                await self._loop(stop)
            finally:
                await self._bounded(self._final_tick(), "final_flush")
                await self._bounded(self._consumer.stop(), "consumer_stop")
        finally:
            await self._bounded(self._producer.stop(), "producer_stop")
            c = self.counters
            log.info(
                "stopped",
                records=c.records,
                events=c.events,
                invalid=sum(c.invalid.values()),
                summaries=c.summaries,
                dead_letters=c.dead_letters,
                commits=c.commits,
                ticks=c.ticks,
                publish_failures=c.publish_failures,
                runs_tracked=self.monitor.runs_tracked,
            )

    async def _bounded(self, step: Coroutine[Any, Any, None], name: str) -> None:
        """A shutdown step that may not hang the exit when the broker is gone."""
        try:
            await asyncio.wait_for(step, self.settings.shutdown_timeout)
        except TimeoutError:
            log.error(
                "shutdown_step_timed_out",
                step=name,
                timeout=self.settings.shutdown_timeout,
                unacked=len(self._unacked) + len(self._in_flight),
            )

    async def _loop(self, stop: asyncio.Event) -> None:
        s = self.settings
        clock = asyncio.get_running_loop().time
        start = clock()
        next_tick = start + s.interval
        next_profile = start + s.profile_interval
        next_stats = start + s.stats_interval
        stats_mark = (start, 0)
        while not stop.is_set():
            if self._fatal is not None:
                raise RuntimeError("cannot continue without the window state") from self._fatal
            wait = max(0.0, min(next_tick - clock(), 0.5))
            batch = await self._consumer.getmany(
                timeout_ms=int(wait * 1000), max_records=s.max_records
            )
            if batch:
                await self._consume(batch)
            now_mono = clock()
            if now_mono >= next_tick:
                await self.tick()
                # Fixed grid: skip missed ticks rather than drifting or bunching up.
                next_tick += s.interval * (1 + int((now_mono - next_tick) // s.interval))
            if now_mono >= next_profile:
                await self._publish_profile(s.profile_interval)
                next_profile += s.profile_interval * (
                    1 + int((now_mono - next_profile) // s.profile_interval)
                )
            if now_mono >= next_stats:
                stats_mark = self._log_stats(stats_mark, now_mono)
                next_stats += s.stats_interval * (
                    1 + int((now_mono - next_stats) // s.stats_interval)
                )

    async def _final_tick(self) -> None:
        try:
            await self.tick()
            await self._publish_profile(self.settings.profile_interval)
            await self._settle()
        except kafka.KafkaError as exc:
            log.error("final_flush_failed", error=str(exc))

    # -- consume ---------------------------------------------------------------------------
    async def _consume(self, batch: dict[kafka.TopicPartition, list[kafka.ConsumerRecord]]) -> None:
        if self._fatal is not None:
            return  # the loop raises before anything else
        decode = self.decoder.decode
        now = time.time()
        for tp, records in batch.items():
            events: list[Event] = []
            bad: list[tuple[InvalidEvent, kafka.ConsumerRecord]] = []
            with self.profiler.profile_operation("decode", "ingest"):
                for record in records:
                    try:
                        events.append(decode(record.key, record.value))
                    except InvalidEvent as exc:
                        bad.append((exc, record))
            self.monitor.ingest(events, now, tp.partition)
            self.counters.records += len(records)
            self.counters.events += len(events)
            for exc, record in bad:
                await self._dead_letter(exc, record, now)
            self._consumed[tp] = records[-1].offset + 1

    async def _dead_letter(
        self, exc: InvalidEvent, record: kafka.ConsumerRecord, now: float
    ) -> None:
        self.counters.invalid[exc.reason] += 1
        body = dead_letter(
            exc,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            emitted_at=now,
            max_value_bytes=_DEAD_LETTER_VALUE_BYTES,
        )
        await self._send((self.settings.dead_letter_topic, record.key, encode(body), None))
        self.counters.dead_letters += 1
        suppressed = self._warnings.allow(exc.reason)
        if suppressed is not None:
            log.warning(
                "dead_letter",
                reason=exc.reason,
                detail=exc.detail,
                partition=record.partition,
                offset=record.offset,
                suppressed=suppressed,
            )

    # -- publish ---------------------------------------------------------------------------
    async def _send(self, item: _Pending) -> None:
        topic, key, value, partition = item
        try:
            future = await self._producer.send(topic, value, key=key, partition=partition)
        except kafka.KafkaError as exc:
            self._unacked.append(item)
            self.counters.publish_failures += 1
            log.error("publish_failed", topic=topic, error=str(exc))
            return
        self._in_flight.append((item, future))

    async def _publish_summaries(self, records: list[dict[str, Any]]) -> None:
        """Send summary records to the output topic, keyed by run (acks awaited by ``_settle``)."""
        output = self.settings.output_topic
        for record in records:
            await self._send((output, record["run_id"].encode(), encode(record), None))
        self.counters.summaries += len(records)

    async def _settle(self) -> bool:
        """Await the records in flight; failed ones go back for retry. True if all acked."""
        in_flight, self._in_flight = self._in_flight, []
        if not in_flight:
            return not self._unacked
        results = await asyncio.gather(*(f for _, f in in_flight), return_exceptions=True)
        failed = [
            item
            for (item, _), r in zip(in_flight, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            self._unacked.extend(failed)
            self.counters.publish_failures += len(failed)
            first = next(r for r in results if isinstance(r, BaseException))
            log.error("publish_failed", records=len(failed), error=str(first))
        return not self._unacked

    async def tick(self) -> None:
        """Publish the due summaries, wait for the acks, then commit what they cover."""
        async with self._lock:
            await self._tick()

    async def _tick(self) -> None:
        started = time.perf_counter()
        with self.profiler.profile_operation("tick", "tick"):
            # Positions, summaries and state changes are taken together, with no await between
            # them: nothing can be ingested in between, so the state covers exactly `positions`.
            positions = dict(self._consumed)
            records = self.monitor.due(time.time())
            changes = self.monitor.state_changes() if self.settings.changelog else None
            retry, self._unacked = self._unacked, []
            with self.profiler.profile_operation("publish", "publish"):
                for item in retry:
                    await self._send(item)
                await self._publish_summaries(records)
                if changes is not None:
                    await self._write_state(positions, *changes)
                acked = await self._settle()
            if acked and positions:
                await self._commit(positions)
        self.counters.ticks += 1
        self._last_tick_ms = (time.perf_counter() - started) * 1000.0

    async def _write_state(
        self,
        positions: dict[kafka.TopicPartition, int],
        changed: list[tuple[int, RowState]],
        removed: list[tuple[int, str, str]],
    ) -> None:
        """Changelog records of one tick, per partition in order: changed rows, tombstones of
        removed rows, then the checkpoint (docs/state.md)."""
        topic = self.settings.state_topic
        owned = {tp.partition for tp in self.assigned}
        touched: set[int] = set()
        generation = time.time_ns()
        with self.profiler.profile_operation("snapshot", "state"):
            for partition, state in changed:
                if partition not in owned:
                    continue
                key = (state.run_id, state.stream)
                records = encode_row(state, generation)
                before = self._chunks.get(key, 0)
                self._chunks[key] = len(records)
                # Chunks the row no longer has are deleted so compaction can drop them.
                records += tombstones(state.run_id, state.stream, before)[len(records) :]
                for k, v in records:
                    await self._send((topic, k, v, partition))
                self.counters.snapshots += 1
                touched.add(partition)
            for partition, run_id, stream in removed:
                if partition not in owned:
                    continue
                for k, v in tombstones(run_id, stream, self._chunks.pop((run_id, stream), 1)):
                    await self._send((topic, k, v, partition))
                touched.add(partition)
            for tp, offset in positions.items():
                p = tp.partition
                if p in owned and (p in touched or self._checkpointed.get(p) != offset):
                    await self._send((topic, *checkpoint_record(p, offset), p))
                    self._checkpointed[p] = offset

    async def _commit(self, positions: dict[kafka.TopicPartition, int]) -> None:
        owned = {tp: off for tp, off in positions.items() if tp in self.assigned}
        if not owned:
            return
        try:
            await self._consumer.commit(
                {tp: kafka.OffsetAndMetadata(off, "") for tp, off in owned.items()}
            )
            self.counters.commits += 1
        except kafka.KafkaError as exc:
            # A rebalance in progress: the new owner re-reads from the last commit (at-least-once).
            log.warning("commit_failed", error=str(exc))

    async def _publish_profile(self, interval: float) -> None:
        body = self.profiler.report(interval)
        record = profile_record(body, instance=self.instance, emitted_at=time.time())
        log.info(
            "profile",
            ticks=body["ticks"],
            tick_ms=body["tick_ms"],
            overhead_fraction=body["overhead_fraction"],
            tick_overhead_fraction=body["tick_overhead_fraction"],
            operations={
                op["name"]: {
                    "count": op["count"],
                    "mean_us": round(op["mean_us"], 1),
                    "p99_us": round(op["p99_us"], 1),
                }
                for op in body["operations"]
            },
        )
        async with self._lock:
            await self._send(
                (self.settings.output_topic, self.instance.encode(), encode(record), None)
            )
        self.counters.profiles += 1

    def _log_stats(self, mark: tuple[float, int], now: float) -> tuple[float, int]:
        since, events_before = mark
        c = self.counters
        lag = 0
        for tp, position in self._consumed.items():
            high = self._consumer.highwater(tp)
            if high is not None:
                lag += max(0, high - position)
        log.info(
            "stats",
            events_per_s=round((c.events - events_before) / max(now - since, 1e-9), 1),
            events=c.events,
            invalid=sum(c.invalid.values()),
            invalid_by_reason=dict(c.invalid),
            runs_tracked=self.monitor.runs_tracked,
            runs_evicted=self.monitor.runs_evicted,
            streams_evicted=self.monitor.streams_evicted,
            partitions=len(self.assigned),
            consumer_lag=lag,
            last_tick_ms=round(self._last_tick_ms, 3),
            summaries=c.summaries,
            publish_failures=c.publish_failures,
        )
        return now, c.events

    # -- rebalance -------------------------------------------------------------------------
    async def _revoked(self, revoked: set[kafka.TopicPartition]) -> None:
        """Publish and commit everything consumed so far, then forget the runs of ``revoked``."""
        async with self._lock:
            await self._tick()
            released = self.monitor.release_partitions(
                (tp.partition for tp in revoked), time.time()
            )
            # Dirty data was published by the tick above: this is normally empty.
            await self._publish_summaries(released)
            await self._settle()
            for tp in revoked:
                self._consumed.pop(tp, None)
                self._checkpointed.pop(tp.partition, None)
            self.assigned -= revoked
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def _assigned(self, assigned: set[kafka.TopicPartition]) -> None:
        """Restore the window state of ``assigned`` before any of their records is fetched."""
        async with self._lock:
            self.assigned |= assigned
            if self.settings.changelog and assigned:
                try:
                    await self._restore(assigned)
                except Exception as exc:
                    # Consuming without the state would count events twice or lose windows:
                    # stop instead, loudly; the next start (or the next owner) restores again.
                    log.error("state_restore_failed", error=repr(exc))
                    self._fatal = exc
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _restore(self, assigned: set[kafka.TopicPartition]) -> None:
        """Read the changelog partitions up to a fence of our own, rebuild the rows, and seek the
        input partitions to their last checkpoint (docs/state.md)."""
        s = self.settings
        started = time.perf_counter()
        token = f"{self.instance}-{uuid.uuid4().hex}"
        restorers = {tp.partition: Restorer(fence_token=token) for tp in assigned}
        for p in restorers:
            await self._send((s.state_topic, *fence_record(p, token), p))
        if not await self._settle():
            raise kafka.KafkaError("could not write the changelog fence records")

        def feed(partition: int, key: bytes | None, value: bytes | None) -> None:
            restorers[partition].feed(key, value)

        await kafka.read_partitions(
            s.bootstrap_servers,
            s.state_topic,
            list(restorers),
            feed,
            lambda: all(r.fenced for r in restorers.values()),
            security=s.security,
            timeout=s.restore_timeout,
        )
        rows = corrupt = 0
        seeks = {}
        for p, restorer in restorers.items():
            for state in restorer.rows():
                self.monitor.restore(state, p)
                rows += 1
            self._chunks.update(restorer.chunk_counts)
            corrupt += restorer.corrupt
            if restorer.offset is None:
                continue
            tp = kafka.TopicPartition(s.input_topic, p)
            # The checkpoint is where the restored windows end: resume exactly there, whatever
            # was committed (ahead of it if the daemon died between acknowledgement and commit).
            self._consumer.seek(tp, restorer.offset)
            self._consumed[tp] = restorer.offset
            self._checkpointed[p] = restorer.offset
            seeks[p] = restorer.offset
        log.info(
            "state_restored",
            partitions=sorted(restorers),
            rows=rows,
            corrupt=corrupt,
            records=sum(r.records_read for r in restorers.values()),
            bytes=sum(r.bytes_read for r in restorers.values()),
            seconds=round(time.perf_counter() - started, 3),
            resume_offsets=seeks,
        )


async def _unless_stopped(
    work: Coroutine[Any, Any, list[str]], stop: asyncio.Event
) -> tuple[bool, list[str]]:
    """``(True, result)`` of ``work``, or ``(False, [])`` when ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, []


def _tune_gc() -> None:
    """Start-up objects are moved out of the collector's sight and young collections happen
    every 20,000 allocations instead of 700. Every consumed batch creates tens of thousands of
    short-lived record and event objects (no reference cycles among them); with the default
    threshold the cyclic collector runs dozens of times per batch and cost about a third of the
    per-event CPU (bench/README.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(20_000, older, oldest)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run one daemon until ``stop`` is set."""
    await Service(settings).run(stop)
