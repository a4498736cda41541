"""Publishing in one place: send, await the acknowledgements, keep what failed for the next try,
and say when everything sent so far is safe, i.e. when the input offsets it covers may be
committed.

The producer is injected (``kafka.producer`` in the daemon, a fake in the unit tests). A send that
fails for a reason a retry can fix (timeout, leader change, broker away) is kept, in order, and
sent again by :meth:`Outbox.retry` at the next tick; until then :meth:`Outbox.settle` reports
``False`` and the commit waits. A send that can never succeed (record too large, invalid topic:
``kafka.PERMANENT_ERRORS``) is counted, logged with its size and stepped over: one such record
must not hold back every later commit. Between the two, a record the broker itself refuses with
an error it calls non-retriable (``kafka.refused``: a schema or policy refusal, an authorisation
error, Tansu's "unknown error") is retried like a transient failure, in case the broker changes
its mind, but only for ``refusal_grace`` seconds (default ``REFUSAL_GRACE``, 60 s) of refusals in
a row: then it is dropped like a permanent one, and the commit moves on. An outage (timeouts,
lost connections) is never cut short: those records are retried until they are acknowledged; nor
is a refusal on a topic in ``keep_trying`` (the changelog: a dropped row record would leave a
window that the checkpoint after it says is complete, so there correctness wins over progress).

Every record is sized before it is sent (``kafka.record_size`` against the topic's
:class:`~metricsd.topics.MessageLimits`): one that cannot fit is dropped the same way without being
sent. Callers make their records fit first (``records.fit_summary``, the dead-letter caps), so
this is the last guard, not the normal path.

Records go to the producer in batches (issue 12: one ``producer.send`` costs ~10 µs of Python per
record, a record appended to a batch of our own a third of that, acknowledgements included).
:meth:`Outbox.send` only queues; :meth:`Outbox.flush` (called by :meth:`Outbox.settle`, and by
``send`` once ``FLUSH_BYTES`` or ``FLUSH_RECORDS`` are queued, so memory stays bounded) hands the
queue over in its order: per (topic, partition), records are appended to batches of the
producer's own ``create_batch`` (bounded by its ``max_batch_size``, which ``kafka.producer`` keeps
within every topic's limit) and submitted with ``send_batch``, so the order per partition is the
order of ``send`` calls, as with one ``send`` per record. A record without a partition goes where
``producer.send`` would put it (``kafka.key_partition``, from the producer's metadata); one with
neither key nor partition (a random partition), and one the broker refused before, goes alone
through ``producer.send``, in its place. A batch the broker refuses as a whole (or fails with a
permanent error) is sent again at once one record per ``send``, so that only the offending record
is kept or dropped. A producer without ``send_batch`` gets one ``send`` per record, in the same
order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import structlog

from metricsd import kafka
from metricsd.topics import MessageLimits

__all__ = [
    "FLUSH_BYTES",
    "FLUSH_RECORDS",
    "REFUSAL_GRACE",
    "BatchProducer",
    "Outbox",
    "Producer",
    "Send",
]

log = structlog.get_logger(__name__)

#: Seconds a record the broker keeps refusing (``kafka.refused``) is retried before it is dropped.
REFUSAL_GRACE: Final = 60.0
#: Key + value bytes queued by :meth:`Outbox.send` that make it hand the queue over at once.
FLUSH_BYTES: Final = 4 * 1024 * 1024
#: Records queued by :meth:`Outbox.send` that make it hand the queue over at once.
FLUSH_RECORDS: Final = 20_000
#: Keys whose partition is remembered per topic (run ids: one tick's are computed once).
_PARTITION_CACHE: Final = 200_000


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    ident: str | None = None  # what the record is (a summary id), for the log lines
    refused_since: float | None = None  # clock time of the first of the refusals in a row


class Producer(Protocol):
    """What the outbox needs of a producer: aiokafka's ``send`` (returns a future of the ack)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        partition: int | None = ...,
    ) -> asyncio.Future[Any]: ...


class Batch(Protocol):
    """aiokafka's ``BatchBuilder``: ``append`` returns None when the batch is full."""

    def append(self, *, timestamp: float | None, key: bytes | None, value: bytes | None) -> Any: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchProducer(Producer, Protocol):
    """A producer that also takes whole batches (aiokafka's ``AIOKafkaProducer``)."""

    async def partitions_for(self, topic: str) -> set[int]: ...

    def create_batch(self) -> Batch: ...

    async def send_batch(
        self, batch: Any, topic: str, *, partition: int
    ) -> asyncio.Future[Any]: ...


# What one step of a flush hands over: a batch of records of one partition, or one record alone.
_Unit = tuple[Batch, list[Send]] | Send


class Outbox:
    def __init__(
        self,
        producer: Producer,
        limits: MessageLimits | None = None,
        *,
        refusal_grace: float = REFUSAL_GRACE,
        keep_trying: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._batching = producer if isinstance(producer, BatchProducer) else None
        self.limits = limits or MessageLimits()
        self._grace = refusal_grace
        self._keep_trying = frozenset(keep_trying)
        self._clock = clock
        self._failed: list[Send] = []  # to send again, in order
        self._queue: list[Send] = []  # sent, not handed to the producer yet, in order
        self._queued_bytes = 0
        self._handing = 0  # records of the queue a flush took and has not handed over yet
        self._in_flight: list[tuple[Sequence[Send], asyncio.Future[Any]]] = []
        self._in_flight_records = 0
        self._settling = 0  # records whose acks settle() awaits now
        self._flush_lock = asyncio.Lock()  # one flush at a time: the order per partition
        self._partitions: dict[str, tuple[set[int], dict[bytes, int]]] = {}
        self.failures = 0  # sends that failed and were kept for retry
        self.dropped = 0  # sends that could never succeed, stepped over
        #: key + value bytes handed to the producer per topic (retries count again)
        self.sent_bytes: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """Records not yet acknowledged: queued, in flight or waiting for a retry."""
        return (
            len(self._failed)
            + len(self._queue)
            + self._handing
            + self._in_flight_records
            + self._settling
        )

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        *,
        ident: str | None = None,
    ) -> None:
        """Send one record (``ident`` names it in the log lines if it fails or is dropped): queue
        it, and hand the queue over if it has grown large."""
        item = Send(topic, key, value, partition, ident)
        size = kafka.record_size(key, value)
        limit = self.limits.of(topic)
        if size > limit:
            self._drop(item, f"the record is {size} bytes, over the topic's limit of {limit}")
            return
        self._queue.append(item)
        self._queued_bytes += len(key or b"") + len(value or b"")
        if self._queued_bytes >= FLUSH_BYTES or len(self._queue) >= FLUSH_RECORDS:
            await self.flush()

    async def retry(self) -> None:
        """Send again, in their order, the records whose earlier send failed."""
        failed, self._failed = self._failed, []
        for item in failed:
            self._queue.append(item)
            self._queued_bytes += len(item.key or b"") + len(item.value or b"")
        if self._queued_bytes >= FLUSH_BYTES or len(self._queue) >= FLUSH_RECORDS:
            await self.flush()

    async def flush(self) -> None:
        """Hand every queued record to the producer, in order per partition (in batches if the
        producer takes them); their acknowledgements are for :meth:`settle`."""
        async with self._flush_lock:
            queue, self._queue = self._queue, []
            self._queued_bytes = 0
            if not queue:
                return
            self._handing = len(queue)
            try:
                if self._batching is None:
                    for i, item in enumerate(queue):
                        try:
                            await self._send(item)
                        except BaseException:
                            self._requeue(queue[i:])  # cancelled: not handed over, not lost
                            raise
                        self._handing -= 1
                else:
                    await self._hand_over(self._batching, queue)
            finally:
                self._handing = 0

    def _requeue(self, items: list[Send]) -> None:
        """Put ``items`` (a flush cut short) back at the head of the queue, in their order."""
        self._queue[:0] = items
        self._queued_bytes += sum(len(item.key or b"") + len(item.value or b"") for item in items)

    async def settle(self, topic: str | None = None) -> bool:
        """Hand over what is queued, await every record in flight. True if everything sent so far
        is acknowledged (or stepped over for good), so the offsets it covers may be committed.

        With ``topic``, only that topic's records are awaited (the others stay in flight), and
        True means none of that topic's records is unacknowledged."""
        await self.flush()
        if topic is None:
            in_flight, self._in_flight = self._in_flight, []
        else:
            in_flight = [unit for unit in self._in_flight if unit[0][0].topic == topic]
            self._in_flight = [unit for unit in self._in_flight if unit[0][0].topic != topic]
        taken = sum(len(items) for items, _ in in_flight)
        self._in_flight_records -= taken
        self._settling += taken
        try:
            if in_flight:
                results = await asyncio.gather(*(f for _, f in in_flight), return_exceptions=True)
                errors: list[tuple[Send, BaseException]] = []
                for (items, _), r in zip(in_flight, results, strict=True):
                    if not isinstance(r, BaseException):
                        continue
                    if len(items) > 1 and (
                        isinstance(r, kafka.PERMANENT_ERRORS) or kafka.refused(r)
                    ):
                        # Refused as a whole: find out which record it is, one send each.
                        errors += await self._isolate(items)
                    else:
                        errors += [(item, r) for item in items]
                retry = [(kept, exc) for item, exc in errors if (kept := self._keep(item, exc))]
                if retry:
                    self._failed += [item for item, _ in retry]
                    self.failures += len(retry)
                    log.error(
                        "publish_failed",
                        records=len(retry),
                        id=retry[0][0].ident,
                        error=f"{type(retry[0][1]).__name__}: {retry[0][1]}",
                    )
        finally:
            self._settling -= taken
        return not any(topic in (None, item.topic) for item in self._failed)

    async def _hand_over(self, producer: BatchProducer, queue: list[Send]) -> None:
        """Batch ``queue`` per (topic, partition), in its order, and submit the batches."""
        groups: dict[tuple[str, int | None], list[_Unit]] = {}
        try:
            unplaced = await self._group(producer, queue, groups)
        except BaseException:
            self._requeue(queue)  # cancelled while waiting for metadata: nothing handed over
            raise
        for items, error in unplaced.values():
            self._fail_at_send(items, error)
            self._handing -= len(items)
        # Round robin over the partitions: a second batch of a partition waits until the first
        # is drained, and meanwhile the other partitions' batches go.
        done = dict.fromkeys(groups, 0)  # units handed over per group, in order
        rounds = max((len(units) for units in groups.values()), default=0)
        try:
            for i in range(rounds):
                for (topic, partition), units in groups.items():
                    if i >= len(units):
                        continue
                    unit = units[i]
                    if isinstance(unit, Send):
                        await self._send(unit)
                        self._handing -= 1
                    else:
                        assert partition is not None
                        await self._send_batch(producer, topic, partition, *unit)
                    done[topic, partition] = i + 1
        except BaseException:
            # Cancelled: what was not handed over goes back to the queue, in order per partition.
            self._requeue(
                [
                    item
                    for where, units in groups.items()
                    for unit in units[done[where] :]
                    for item in ((unit,) if isinstance(unit, Send) else unit[1])
                ]
            )
            raise

    async def _group(
        self,
        producer: BatchProducer,
        queue: list[Send],
        groups: dict[tuple[str, int | None], list[_Unit]],
    ) -> dict[str, tuple[list[Send], BaseException]]:
        """Fill ``groups`` (per topic and partition, in queue order: batches, and the records that
        go alone); return the records of topics whose partitions cannot be known, with why."""
        open_batches: dict[tuple[str, int], tuple[Batch, list[Send]]] = {}
        known: dict[str, tuple[set[int], dict[bytes, int]] | BaseException] = {}
        unplaced: dict[str, tuple[list[Send], BaseException]] = {}
        for item in queue:
            partition = item.partition
            if partition is None and item.key is not None:
                topic = item.topic
                cache = known.get(topic)
                if cache is None:
                    cache = known[topic] = await self._partitions_of(producer, topic)
                if isinstance(cache, BaseException):
                    unplaced.setdefault(topic, ([], cache))[0].append(item)
                    continue
                partition = cache[1].get(item.key)
                if partition is None:
                    partition = kafka.key_partition(item.key, cache[0])
                    cache[1][item.key] = partition
            units = groups.setdefault((item.topic, partition), [])
            if partition is None or item.refused_since is not None:
                # A random partition (producer.send chooses it), or a record refused before:
                # alone, so that it cannot take a batch down with it again.
                units.append(item)
                if partition is not None:
                    open_batches.pop((item.topic, partition), None)
                continue
            tp = (item.topic, partition)
            current = open_batches.get(tp)
            if (
                current is None
                or current[0].append(timestamp=None, key=item.key, value=item.value) is None
            ):
                batch = producer.create_batch()
                batch.append(timestamp=None, key=item.key, value=item.value)
                current = open_batches[tp] = (batch, [])
                units.append(current)
            current[1].append(item)
        return unplaced

    async def _send_batch(
        self, producer: BatchProducer, topic: str, partition: int, batch: Batch, items: list[Send]
    ) -> None:
        batch.close()
        try:
            future = await producer.send_batch(batch, topic, partition=partition)
        except kafka.KafkaError as exc:
            # Settled like a failed acknowledgement: kept, isolated or dropped there.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        else:
            size = sum(len(item.key or b"") + len(item.value or b"") for item in items)
            self.sent_bytes[topic] = self.sent_bytes.get(topic, 0) + size
        self._in_flight.append((items, future))
        self._in_flight_records += len(items)
        self._handing -= len(items)

    async def _partitions_of(
        self, producer: BatchProducer, topic: str
    ) -> tuple[set[int], dict[bytes, int]] | BaseException:
        """The partitions of ``topic`` (waiting for its metadata as ``send`` does) and the keys
        placed on them so far; the error if they cannot be known."""
        try:
            partitions = set(await producer.partitions_for(topic))
        except kafka.KafkaError as exc:
            error: BaseException = exc
            return error
        cached = self._partitions.get(topic)
        if cached is None or cached[0] != partitions or len(cached[1]) > _PARTITION_CACHE:
            cached = self._partitions[topic] = (partitions, {})
        return cached

    async def _isolate(self, items: Sequence[Send]) -> list[tuple[Send, BaseException]]:
        """Send ``items`` again one per ``send`` and await them: the ones that fail again."""
        sent: list[tuple[Send, asyncio.Future[Any]]] = []
        async with self._flush_lock:
            for item in items:
                future = await self._send_one(item)
                if future is not None:
                    sent.append((item, future))
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        return [
            (item, r)
            for (item, _), r in zip(sent, results, strict=True)
            if isinstance(r, BaseException)
        ]

    async def _send(self, item: Send) -> None:
        future = await self._send_one(item)
        if future is not None:
            self._in_flight.append(((item,), future))
            self._in_flight_records += 1

    async def _send_one(self, item: Send) -> asyncio.Future[Any] | None:
        """Hand ``item`` to ``producer.send``; None if that failed (kept or dropped)."""
        try:
            future = await self._producer.send(
                item.topic, item.value, key=item.key, partition=item.partition
            )
        except kafka.KafkaError as exc:
            kept = self._keep(item, exc)
            if kept is not None:
                self._failed.append(kept)
                self.failures += 1
                log.error(
                    "publish_failed",
                    topic=item.topic,
                    id=item.ident,
                    error=f"{type(exc).__name__}: {exc}",
                )
            return None
        size = len(item.key or b"") + len(item.value or b"")
        self.sent_bytes[item.topic] = self.sent_bytes.get(item.topic, 0) + size
        return future

    def _fail_at_send(self, items: list[Send], exc: BaseException) -> None:
        """``items`` could not be handed over (their topic's partitions are unknown)."""
        kept = [k for item in items if (k := self._keep(item, exc)) is not None]
        if kept:
            self._failed += kept
            self.failures += len(kept)
            log.error(
                "publish_failed",
                topic=items[0].topic,
                records=len(kept),
                id=kept[0].ident,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _keep(self, item: Send, exc: BaseException) -> Send | None:
        """What to retry after ``item`` failed with ``exc``, or None once it is dropped: at once
        for a permanent error, after ``refusal_grace`` seconds of broker refusals in a row."""
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, kafka.PERMANENT_ERRORS):
            self._drop(item, error)
            return None
        if not kafka.refused(exc) or item.topic in self._keep_trying:
            return dataclasses.replace(item, refused_since=None)
        now = self._clock()
        since = now if item.refused_since is None else item.refused_since
        if now - since >= self._grace:
            self._drop(item, f"refused by the broker for {now - since:.0f} s: {error}")
            return None
        return dataclasses.replace(item, refused_since=since)

    def _drop(self, item: Send, error: str) -> None:
        self.dropped += 1
        log.error(
            "publish_dropped",
            topic=item.topic,
            id=item.ident,
            key_bytes=len(item.key or b""),
            value_bytes=len(item.value or b""),
            error=error,
        )
