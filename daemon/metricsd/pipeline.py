"""The processing core of one daemon instance, between the Kafka clients: decode each consumed
batch into the monitor (bad records to the dead-letter topic), and at each tick publish the due
summaries and the changelog records, await the acknowledgements, then commit the offsets they
cover. Rebalances publish and commit before a partition goes, and restore its window state before
a new one is fetched. The clients are handed in by :class:`metricsd.service.Service`, which owns
the lifecycle and the schedule; what to write and when it is safe is decided by the pure
:class:`~metricsd.changelog.Changelog` and by the :class:`~metricsd.outbox.Outbox`.

At-least-once: after a crash, records after the last commit are consumed again, so a consumer of
the summary topic may see a summary twice; ``id`` (group, run, stream, incarnation, window, seq)
de-duplicates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from metricsd import kafka
from metricsd.changelog import Changelog, Placed, Restore, Restored, RowState, split_checkpoints
from metricsd.config import Settings
from metricsd.events import Decoder, InvalidEvent
from metricsd.logs import RateLimiter
from metricsd.monitor import Monitor
from metricsd.outbox import Outbox
from metricsd.profiler import Profiler
from metricsd.records import dead_letter, dead_letter_caps, dead_letter_key, encode, fit_summary
from metricsd.topics import MessageLimits, Topics

__all__ = ["BACKLOG_RECORDS", "SLICE_RECORDS", "Counters", "Pipeline"]

log = structlog.get_logger(__name__)


@dataclass
class Counters:
    """What the service did, for the ``stats`` and ``stopped`` log lines."""

    records: int = 0
    events: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    summaries: int = 0
    dead_letters: int = 0
    profiles: int = 0
    commits: int = 0
    ticks: int = 0
    before_checkpoint: int = 0  # fetched again after a restore, already in the windows: skipped
    reduced: Counter[str] = field(default_factory=Counter)  # summaries reduced to fit, by form
    early_ticks: int = 0  # ticks run before their time because of BACKLOG_RECORDS
    by_type: Counter[type] = field(default_factory=Counter)  # events by class (for /metrics)
    restore_records: int = 0  # changelog records read by restores


# Final summaries of ended and evicted runs that may wait for the tick (Monitor.backlog): beyond
# it the pipeline ticks at once. About 1.2 kB each as dicts, plus the encoded copy and the
# producer's future while in flight. 3,000 (measured in bench/memory.py run_churn: 10,000 let one
# tick hold ~30,000 sends and the daemon's peak RSS rise to 386 MiB, 3,000 kept it at 267 MiB
# against 213 MiB for the same events over 1,000 runs, at the same throughput).
BACKLOG_RECORDS = 3_000
# While runs are being evicted for capacity (churn), the records of one partition are handed to
# the monitor at most min(SLICE_RECORDS, max_runs) at a time (at least 100): that bounds what one
# ingest can add to the backlog before the pipeline looks at it, and a slice never holds more
# runs than max_runs (which would evict runs of the slice itself before all their streams are
# written). Without evictions whole batches go in, as before.
SLICE_RECORDS = 5_000


class _Offsets:
    """The input offsets of the decoded events, read by the monitor only for the few events that
    start a window (their position names the window's incarnation)."""

    __slots__ = ("_records",)

    def __init__(self, records: list[kafka.ConsumerRecord]) -> None:
        self._records = records

    def __getitem__(self, index: int) -> int:
        return int(self._records[index].offset)


def _ignore(_: Any) -> None:
    return None


def _ignore_tick(_seconds: float, _now: float) -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Taken:
    """What one tick took at one position: what was consumed, the due summaries, the state."""

    positions: dict[kafka.TopicPartition, int]
    records: list[dict[str, Any]]
    changes: tuple[list[tuple[int, RowState]], list[tuple[int, str, str]]] | None


class Pipeline:
    """Monitor, changelog and outbox of one instance, and the offsets consumed and owned."""

    def __init__(self, settings: Settings, instance: str, profiler: Profiler) -> None:
        self.settings = settings
        self.instance = instance
        self.profiler = profiler
        self.monitor = Monitor(
            settings.monitor, profiler, track_changes=settings.changelog, group=settings.group_id
        )
        self.decoder = Decoder(
            max_array=settings.monitor.max_array, max_classes=settings.monitor.max_classes
        )
        self.counters = Counters()
        self.changelog = Changelog()
        self.assigned: set[kafka.TopicPartition] = set()
        self.last_tick_ms = 0.0
        self.settled = True  # the last tick's records were all acknowledged and committed
        self._waiting_since = 0.0  # perf_counter when the tick in flight began sending
        self.fatal: BaseException | None = None  # a failed restore: the loop stops on it
        self._warnings = RateLimiter(period=10.0)
        self._consumed: dict[kafka.TopicPartition, int] = {}
        # Restored partitions: records before the checkpoint are in the windows already.
        self._floors: dict[kafka.TopicPartition, int] = {}
        self._lock = asyncio.Lock()  # a tick and a rebalance callback never interleave
        self._completion: asyncio.Future[None] | None = None  # a tick publishing in the background
        self._outbox: Outbox | None = None
        self._topics: Topics | None = None
        self._consumer: Any = None
        self._letter_caps = dead_letter_caps(kafka.MAX_REQUEST_SIZE)  # (value, key) copy limits
        self._churn_slice = max(100, min(SLICE_RECORDS, settings.monitor.max_runs))
        self._slice: int | None = None  # records per ingest while runs are evicted, else all
        self.restoring = 0  # partitions whose state is being restored now
        # Observers (metricsd.exposition's per-run series): every summary record published, and
        # the runs forgotten when their partitions are revoked.
        self.on_summaries: Callable[[list[dict[str, Any]]], None] = _ignore
        self.on_released: Callable[[list[str]], None] = _ignore
        # Every completed tick, in the loop's background or not: (seconds from snapshot to
        # commit, unix time it ended); the tick-duration histogram and last-tick gauge.
        self.on_ticked: Callable[[float, float], None] = _ignore_tick

    def use_producer(self, producer: Any, limits: MessageLimits | None = None) -> None:
        """The started producer: every record goes out through one outbox, sized against
        ``limits`` (the producer's own limit for every topic if None)."""
        self._outbox = Outbox(producer, limits, keep_trying=[self.settings.state_topic])
        self._topics = Topics(self.settings, producer)
        self._letter_caps = dead_letter_caps(
            self._outbox.limits.of(self.settings.dead_letter_topic)
        )

    def use_consumer(self, consumer: Any) -> None:
        """The group consumer: commits and the seeks of a restore."""
        self._consumer = consumer

    @property
    def topics(self) -> Topics:
        if self._topics is None:
            raise RuntimeError("the producer is not started")
        return self._topics

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the producer is not started")
        return self._outbox

    @property
    def consumed(self) -> dict[kafka.TopicPartition, int]:
        """Next offset to consume per partition (for the lag in the stats)."""
        return self._consumed

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        """One record outside a tick (the profile), acknowledged with the next tick's."""
        async with self._lock:
            await self.outbox.send(topic, key, value)

    # -- restore ---------------------------------------------------------------------------
    async def _handle_lost_state(self, restored: Restored) -> None:
        """A changelog partition that lost its checkpoint starts empty. If the input partition
        is also shorter than what this instance had already consumed from it, the broker lost
        the input too (it came back empty): the committed offsets, if any survived, point past
        the new end, so the partition is read again from its beginning."""
        lost = self.changelog.lost(restored)
        if not lost:
            return
        s = self.settings
        tps = {p: kafka.TopicPartition(s.input_topic, p) for p in lost}
        ends = await self._consumer.end_offsets(list(tps.values()))
        truncated = [p for p, tp in tps.items() if ends.get(tp, 0) < lost[p]]
        if truncated:
            await self._consumer.seek_to_beginning(*(tps[p] for p in truncated))
        log.error(
            "state_lost",
            partitions=sorted(lost),
            input_truncated=sorted(truncated),
            detail="the changelog has no checkpoint where this instance had written one; the "
            "windows of these partitions start empty"
            + (
                "; the input partitions marked truncated are read from the beginning"
                if truncated
                else ""
            ),
        )

    # -- consume ---------------------------------------------------------------------------
    async def consume(self, batch: dict[kafka.TopicPartition, list[kafka.ConsumerRecord]]) -> None:
        if self.fatal is not None:
            return  # the loop raises before anything else
        now = time.time()
        for tp, records in self._slices(batch):
            floor = self._floors.get(tp)
            if floor is not None and records[0].offset < floor:
                kept = [r for r in records if r.offset >= floor]
                self.counters.before_checkpoint += len(records) - len(kept)
                records = kept
                if not records:
                    continue
            # Decoded straight into the monitor's pending rows (its hot path), bad records kept.
            with self.profiler.profile_operation("decode", "ingest"):
                intake = self.monitor.collect(records, self.decoder, now)
            bad = intake.bad
            if bad:  # the offsets of the records that became events, index for index
                rejected = {id(r) for _, r in bad}
                good = [r for r in records if id(r) not in rejected]
            else:
                good = records
            evicted = self.monitor.runs_evicted_capacity
            self.monitor.ingest_intake(intake, now, tp.partition, _Offsets(good))
            churning = self.monitor.runs_evicted_capacity != evicted
            self._slice = self._churn_slice if churning else None
            self.counters.records += len(records)
            self.counters.events += intake.events
            self.counters.by_type.update(intake.by_type)
            for error, record in bad:
                await self._dead_letter(error, record, now)
            self._consumed[tp] = records[-1].offset + 1
            if self.monitor.backlog >= BACKLOG_RECORDS:
                # Run churn: finals of evicted runs pile up faster than ticks come. Publish them
                # now (back-pressure: nothing more is consumed until they are acknowledged).
                self.counters.early_ticks += 1
                await self.tick()

    def _slices(
        self, batch: dict[kafka.TopicPartition, list[kafka.ConsumerRecord]]
    ) -> Iterator[tuple[kafka.TopicPartition, list[kafka.ConsumerRecord]]]:
        """Each partition's records, cut into slices of ``_churn_slice`` while the monitor
        evicts (``_slice``, read again before every slice). Otherwise a batch with more records
        than there is room for new runs goes in as probes of doubling size while they bring new
        runs (a probe's evictions switch slicing on), the rest at once; any other batch whole."""
        room = self.settings.monitor.max_runs
        for tp, records in batch.items():
            start, probe, growing = 0, self._churn_slice, True
            while start < len(records):
                rest = len(records) - start
                size = self._slice
                if size is None:
                    if growing and self.monitor.runs_tracked + rest > room:
                        size, probe = probe, 2 * probe
                    else:
                        size = rest
                tracked = self.monitor.runs_tracked
                whole = start == 0 and size >= len(records)
                yield tp, records if whole else records[start : start + size]
                start += size
                # A probe that brought no new run: the batch is the known runs' (steady state).
                growing = self.monitor.runs_tracked != tracked

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
            max_value_bytes=self._letter_caps[0],
            max_key_bytes=self._letter_caps[1],
        )
        await self.outbox.send(
            self.settings.dead_letter_topic, dead_letter_key(record.key), encode(body)
        )
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

    async def _publish_summaries(self, records: list[dict[str, Any]]) -> None:
        """Send summary records to the output topic, keyed by run (acked in ``Outbox.settle``),
        each made to fit the topic's limit (``records.fit_summary``)."""
        output = self.settings.output_topic
        limit = self.outbox.limits.of(output)
        self.on_summaries(records)
        self.counters.summaries += len(records)
        # Each dict is let go once encoded (the list is the tick's only reference): at 10,000
        # runs a tick's 30,000 dicts are ~50 MiB, and their memory then holds the encoded bytes
        # instead of adding to them.
        for i, record in enumerate(records):
            records[i] = None  # type: ignore[call-overload]
            key = record["run_id"].encode()
            # What the value may take: the limit less the batch and record overhead with this
            # key, and 5 bytes for the value's length prefix.
            room = limit - kafka.record_size(key, b"") - 5
            value, form = fit_summary(record, room)
            if form is not None:
                self._reduced(record, form, len(value), room)
            await self.outbox.send(output, key, value, ident=record["id"])

    def _reduced(self, record: dict[str, Any], form: str, size: int, room: int) -> None:
        self.counters.reduced[form] += 1
        suppressed = self._warnings.allow(f"summary_reduced:{form}")
        if suppressed is not None:
            log.warning(
                "summary_reduced",
                id=record["id"],
                form=form,
                value_bytes=size,
                limit_bytes=room,
                suppressed=suppressed,
            )

    # -- tick ------------------------------------------------------------------------------
    async def tick(self) -> None:
        """A whole tick: publish the due summaries and state, wait for the acks, then commit what
        they cover; returns when it is committed (the final tick, tests)."""
        async with self._lock:
            previous, self._completion = self._completion, None
            await self._tick()
            if previous is not None and not previous.cancelled():
                previous.result()  # what ended the previous background tick, after this one

    async def start_tick(self) -> None:
        """The service loop's tick: returns once the statistics and the state are taken at one
        position; publishing them, the wait for their acks and the commit go on in the
        background while the loop consumes the next batches (docs/state.md, "Each tick").

        The lock is held from the snapshot until the commit, as in :meth:`tick`: a tick due while
        the previous one is still waiting for acks waits here, and rebalance callbacks wait for
        the commit of a tick in flight."""
        with self.profiler.profile_operation("tick_wait", "publish"):
            await self._lock.acquire()
        try:
            self._reap()
            started = time.perf_counter()
            taken = self._take()
        except BaseException:
            self._lock.release()
            raise
        self._completion = asyncio.ensure_future(self._complete_and_release(taken, started))

    @property
    def tick_waiting(self) -> float:
        """Seconds the tick in flight has been publishing and committing (0 when none is)."""
        return time.perf_counter() - self._waiting_since if self._waiting_since else 0.0

    async def _complete_and_release(self, taken: _Taken, started: float) -> None:
        try:
            await self._complete(taken, started)
        finally:
            self._lock.release()

    def _reap(self) -> None:
        """Re-raise what ended the previous background tick, if anything did."""
        done, self._completion = self._completion, None
        if done is not None and done.done() and not done.cancelled():
            done.result()

    async def _tick(self) -> None:
        started = time.perf_counter()
        await self._complete(self._take(), started)

    def _take(self) -> _Taken:
        """Positions, summaries and state changes, taken together with no ``await`` between
        them: nothing can be ingested in between, so the state covers exactly ``positions``."""
        with self.profiler.profile_operation("tick", "tick"):
            positions = dict(self._consumed)
            records = self.monitor.due(time.time())
            changes = None
            if self.settings.changelog:
                with self.profiler.profile_operation("state_changes", "state"):
                    changes = self.monitor.state_changes()
        return _Taken(positions, records, changes)

    async def _complete(self, taken: _Taken, started: float) -> None:
        """Send what ``_take`` took, await every acknowledgement, then commit its positions."""
        self._waiting_since = time.perf_counter()
        try:
            await self._send_and_commit(taken, started)
        finally:
            self._waiting_since = 0.0

    async def _send_and_commit(self, taken: _Taken, started: float) -> None:
        positions = taken.positions
        with self.profiler.profile_operation("send", "publish"):
            await self.outbox.retry()
            await self._publish_summaries(taken.records)
            await self.outbox.flush()  # in batches, while the changelog is encoded
        if taken.changes is not None:
            checkpoints = await self._write_state(positions, *taken.changes)
            if checkpoints:
                await self._write_checkpoints(checkpoints)
        with self.profiler.profile_operation("acks", "publish"):
            acked = await self.outbox.settle()
        if not acked:
            await self.topics.recover()
        committed = True
        if acked and positions:
            with self.profiler.profile_operation("commit", "publish"):
                committed = await self._commit(positions)
        self.settled = acked and committed
        self.counters.ticks += 1
        seconds = time.perf_counter() - started
        self.last_tick_ms = seconds * 1000.0
        self.on_ticked(seconds, time.time())

    async def _write_state(
        self,
        positions: dict[kafka.TopicPartition, int],
        changed: list[tuple[int, RowState]],
        removed: list[tuple[int, str, str]],
    ) -> list[Placed]:
        """Send the tick's row records and tombstones, in the order the changelog gives; return
        its checkpoints, which wait for the rows' acknowledgements (docs/state.md)."""
        with self.profiler.profile_operation("snapshot", "state"):
            rows, checkpoints = split_checkpoints(
                self.changelog.tick(
                    {tp.partition: offset for tp, offset in positions.items()},
                    changed,
                    removed,
                )
            )
        await self._send_state(rows)
        return checkpoints

    async def _write_checkpoints(self, checkpoints: list[Placed]) -> None:
        """Send the checkpoints once every changelog record before them is acknowledged: a
        checkpoint vouches for the rows before it, so none of them may still be in flight or
        waiting for a retry (a refused record isolated from its batch lands later). If some are,
        the tick writes none and the next tick's checkpoint follows their retry. The summaries
        are not awaited here: a refused summary holds the commit, not the checkpoint."""
        with self.profiler.profile_operation("acks", "publish"):
            written = await self.outbox.settle(self.settings.state_topic)
        if written:
            await self._send_state(checkpoints)
        else:
            self.changelog.unwritten(checkpoints)

    async def _send_state(self, placed: list[Placed]) -> None:
        topic = self.settings.state_topic
        with self.profiler.profile_operation("send", "publish"):
            for partition, (key, value) in placed:
                await self.outbox.send(topic, key, value, partition)

    async def _commit(self, positions: dict[kafka.TopicPartition, int]) -> bool:
        owned = {tp: off for tp, off in positions.items() if tp in self.assigned}
        if not owned:
            return True
        try:
            await self._consumer.commit(
                {tp: kafka.OffsetAndMetadata(off, "") for tp, off in owned.items()}
            )
            self.counters.commits += 1
            return True
        except kafka.KafkaError as exc:
            # A rebalance in progress: the new owner re-reads from the last commit (at-least-once).
            log.warning("commit_failed", error=str(exc))
            return False

    # -- rebalance -------------------------------------------------------------------------
    async def revoke(self, revoked: set[kafka.TopicPartition]) -> None:
        """Publish and commit everything consumed so far, then forget the runs of ``revoked``."""
        async with self._lock:
            await self._tick()
            gone = self.monitor.runs_on(tp.partition for tp in revoked)
            released = self.monitor.release_partitions(
                (tp.partition for tp in revoked), time.time()
            )
            # Dirty data was published by the tick above: this is normally empty.
            await self._publish_summaries(released)
            self.on_released(gone)
            await self.outbox.settle()
            for tp in revoked:
                self._consumed.pop(tp, None)
                self._floors.pop(tp, None)
            self.changelog.revoke(tp.partition for tp in revoked)
            self.assigned -= revoked
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def assign(self, assigned: set[kafka.TopicPartition]) -> None:
        """Restore the window state of ``assigned`` before any of their records is ingested.

        aiokafka starts fetching a newly assigned partition, from its committed offset, while
        this callback is still running, and ``getmany`` hands those records to the loop: a
        restore that takes longer than a fetch (a long changelog, a slow fence) would see them
        ingested before its rows and its seek, and a commit held behind the checkpoint made them
        count twice (evicted runs came back as ghosts). So the partitions stay paused (nothing
        of theirs is fetched or returned) until the restore has sought them to the checkpoint.
        """
        restoring = self.settings.changelog and bool(assigned)
        if restoring:
            self._consumer.pause(*assigned)  # before the first await: no record slips through
        try:
            async with self._lock:
                self.assigned |= assigned
                self.changelog.assign(tp.partition for tp in assigned)
                if restoring:
                    self.restoring = len(assigned)
                    try:
                        await self._restore(assigned)
                    except Exception as exc:
                        # Consuming without the state would count events twice or lose windows:
                        # stop instead, loudly; the next start (or the next owner) restores again.
                        log.error("state_restore_failed", error=repr(exc))
                        self.fatal = exc
                    finally:
                        self.restoring = 0
        finally:
            if restoring and self.fatal is None:
                self._consumer.resume(*assigned)
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _restore(self, assigned: set[kafka.TopicPartition]) -> None:
        """Read the changelog partitions up to a fence of our own, rebuild the rows, and seek the
        input partitions to their last checkpoint (docs/state.md)."""
        s = self.settings
        started = time.perf_counter()
        self.topics.check_soon()  # an assignment is worth a fresh look
        await self.topics.recover()
        restore = Restore((tp.partition for tp in assigned), f"{self.instance}-{uuid.uuid4().hex}")
        for p, (key, value) in restore.fences:
            await self.outbox.send(s.state_topic, key, value, p)
        # A changelog topic created a moment ago may not be known to every broker yet: the fence
        # is retried (a retriable error) until it lands or the restore time is up.
        deadline = time.monotonic() + s.restore_timeout
        delay = 0.1
        while not await self.outbox.settle():
            if time.monotonic() + delay > deadline:
                raise kafka.KafkaError("could not write the changelog fence records")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            await self.outbox.retry()
        await kafka.read_partitions(
            s.bootstrap_servers,
            s.state_topic,
            restore.partitions,
            restore.feed,
            lambda: restore.done,
            security=s.security,
            timeout=s.restore_timeout,
        )
        restored = restore.result()
        self.counters.restore_records += restored.records
        await self._handle_lost_state(restored)
        for p, state in restored.rows:
            self.monitor.restore(state, p)
        self.changelog.restored(restored)
        for p, offset in restored.offsets.items():
            tp = kafka.TopicPartition(s.input_topic, p)
            # The checkpoint is where the restored windows end: resume exactly there, whatever
            # was committed (ahead of it if the daemon died between acknowledgement and commit);
            # records before it that a fetch still returns are skipped in ``consume``.
            self._consumer.seek(tp, offset)
            self._consumed[tp] = offset
            self._floors[tp] = offset
        log.info(
            "state_restored",
            partitions=restore.partitions,
            rows=len(restored.rows),
            corrupt=restored.corrupt,
            records=restored.records,
            bytes=restored.bytes,
            seconds=round(time.perf_counter() - started, 3),
            resume_offsets=restored.offsets,
        )
