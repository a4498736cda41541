"""The outbox against a producer that fails on command: what failed is retried in order, the
commit waits until everything is acknowledged, and a record that can never be written is counted
and stepped over instead of holding every later commit back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import UnknownError
from aiokafka.partitioner import DefaultPartitioner
from metricsd import kafka
from metricsd.outbox import FLUSH_BYTES, Outbox
from metricsd.topics import MessageLimits
from structlog.testing import capture_logs


class FakeBatch:
    """aiokafka's BatchBuilder as the outbox uses it: records up to ``max_bytes`` (the first one
    always fits), ``append`` returns None when full or closed."""

    def __init__(self, max_bytes: int) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.max_bytes = max_bytes
        self.size = 0
        self.closed = False

    def append(self, *, timestamp: float | None, key: bytes | None, value: bytes | None) -> Any:
        size = kafka.record_size(key, value)
        if self.closed or (self.records and self.size + size > self.max_bytes):
            return None
        self.records.append((key, value))
        self.size += size
        return object()

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """Acknowledges each send (or batch) unless told to fail it: at ``send``/``send_batch`` time
    (``refuse``) or when the acknowledgement is awaited (``fail_acks``). Like a broker, it refuses
    a whole batch when one of its records is refused (``refuse_values``: value -> error, at the
    ack). Records without a partition go where aiokafka's default partitioner puts them. Records
    what the broker accepted, in order, and every submission (``submissions``: topic, partition,
    records; 1 for a ``send``)."""

    def __init__(self, partitions: int = 8, max_batch_bytes: int = 16 * 1024) -> None:
        self.accepted: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.submissions: list[tuple[str, int, int]] = []
        self.refuse: BaseException | None = None
        self.fail_acks: BaseException | None = None
        self.refuse_values: dict[bytes, BaseException] = {}
        self.too_large = 10**9
        self.partitions = partitions
        self.max_batch_bytes = max_batch_bytes

    async def partitions_for(self, topic: str) -> set[int]:
        if self.refuse is not None:
            raise self.refuse
        return set(range(self.partitions))

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.max_batch_bytes)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        if self.refuse is not None:
            raise self.refuse
        assert partition in range(self.partitions) and batch.records
        self.submissions.append((topic, partition, len(batch.records)))
        return self._ack(topic, partition, batch.records)

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:  # fmt: skip
        if self.refuse is not None:
            raise self.refuse
        if len(value or b"") > self.too_large:
            raise kafka.PERMANENT_ERRORS[0]("too large")
        if partition is None:
            every = list(range(self.partitions))
            partition = DefaultPartitioner()(key, every, every)
        self.submissions.append((topic, partition, 1))
        return self._ack(topic, partition, [(key, value)])

    def _ack(
        self, topic: str, partition: int, records: list[tuple[bytes | None, bytes | None]]
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused = [self.refuse_values[v] for _, v in records if v in self.refuse_values]
        if any(len(v or b"") > self.too_large for _, v in records):  # what the broker says
            refused.insert(0, kafka.PERMANENT_ERRORS[0]("the broker says: too large"))
        if self.fail_acks is not None:
            future.set_exception(self.fail_acks)
        elif refused:
            future.set_exception(refused[0])
        else:
            self.accepted += [(topic, k, v, partition) for k, v in records]
            future.set_result(None)
        return future


class SendOnlyProducer:
    """A producer with ``send`` only (no batches): the outbox sends one record per ``send``."""

    def __init__(self) -> None:
        self.inner = FakeProducer()

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:  # fmt: skip
        return await self.inner.send(topic, value, key, partition)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_acknowledged_sends_settle_true() -> None:
    async def go() -> None:
        producer = FakeProducer()
        outbox = Outbox(producer)
        await outbox.send("t", b"k", b"v", 3)
        assert outbox.pending == 1
        assert await outbox.settle()
        assert producer.accepted == [("t", b"k", b"v", 3)]
        assert (outbox.pending, outbox.failures, outbox.dropped) == (0, 0, 0)

    run(go())


@pytest.mark.parametrize("where", ["send", "ack"])
def test_failures_hold_the_commit_and_are_retried_in_order(where: str) -> None:
    """A broker outage fails sends (at send or at ack); settle says False until a retry lands,
    and the retried records reach the broker in their original order."""

    async def go() -> None:
        producer = FakeProducer()
        outbox = Outbox(producer)
        error = kafka.KafkaError("broker away")
        if where == "send":
            producer.refuse = error
        else:
            producer.fail_acks = error
        for i in range(3):
            await outbox.send("t", None, b"%d" % i)
        assert not await outbox.settle()
        assert outbox.failures == 3 and outbox.pending == 3
        assert not await outbox.settle()  # nothing retried yet: still not safe
        producer.refuse = producer.fail_acks = None
        await outbox.retry()
        await outbox.send("t", None, b"3")
        assert await outbox.settle()
        assert [v for _, _, v, _ in producer.accepted] == [b"0", b"1", b"2", b"3"]
        assert outbox.dropped == 0

    run(go())


def test_settling_one_topic_awaits_only_its_records_and_says_only_for_them() -> None:
    """What the changelog's checkpoint waits for: its own topic's acks. A refused summary on
    another topic neither delays that answer nor turns it False; the other topic's records stay
    in flight for the full settle, which still says False for them."""

    async def go() -> None:
        producer = FakeProducer()
        outbox = Outbox(producer)
        producer.refuse_values[b"bad"] = kafka.KafkaError("refused for now")
        await outbox.send("out", None, b"bad")
        await outbox.send("state", b"k", b"row", 0)
        assert await outbox.settle("state")
        assert outbox.pending == 1 and outbox.failures == 0  # "out" not awaited yet
        assert not await outbox.settle()
        assert outbox.failures == 1
        await outbox.send("state", b"k", b"row2", 0)
        assert await outbox.settle("state"), "the failed summary is not the changelog's concern"
        producer.fail_acks = kafka.KafkaError("broker away")
        await outbox.send("state", b"k", b"row3", 0)
        assert not await outbox.settle("state")
        assert [v for t, _, v, _ in producer.accepted if t == "state"] == [b"row", b"row2"]

    run(go())


def test_a_record_that_can_never_be_written_is_dropped_not_retried_forever() -> None:
    async def go() -> None:
        producer = FakeProducer()
        producer.too_large = 10
        outbox = Outbox(producer)
        await outbox.send("t", b"k", b"x" * 11)
        await outbox.send("t", b"k", b"ok")
        assert await outbox.settle()
        assert outbox.dropped == 1 and outbox.failures == 0
        assert [v for _, _, v, _ in producer.accepted] == [b"ok"]

    run(go())


def test_a_permanent_error_on_the_ack_is_dropped_too() -> None:
    async def go() -> None:
        producer = FakeProducer()
        producer.fail_acks = kafka.PERMANENT_ERRORS[0]("broker says too large")
        outbox = Outbox(producer)
        await outbox.send("t", None, b"v")
        assert await outbox.settle()
        assert (outbox.dropped, outbox.failures, outbox.pending) == (1, 0, 0)

    run(go())


def test_a_record_over_its_topics_limit_is_dropped_before_it_is_sent() -> None:
    """Sized before sending: over the topic's limit (kafka.record_size, the producer's own
    measure) it never reaches the producer, is counted and logged with its id; exactly at the
    limit it is sent; another topic keeps the producer's limit."""

    async def go() -> None:
        producer = FakeProducer()
        fits = kafka.record_size(b"k", b"x" * 100)
        outbox = Outbox(producer, MessageLimits(topics={"small": fits}))
        with capture_logs() as logs:
            await outbox.send("small", b"k", b"x" * 101, ident="r|batch_time|count:10|0")
            await outbox.send("small", b"k", b"x" * 100)
            await outbox.send("other", b"k", b"x" * 10_000)
        assert await outbox.settle()
        assert (outbox.dropped, outbox.failures) == (1, 0)
        assert [(t, len(v or b"")) for t, _, v, _ in producer.accepted] == [
            ("small", 100),
            ("other", 10_000),
        ]
        (dropped,) = [e for e in logs if e["event"] == "publish_dropped"]
        assert dropped["id"] == "r|batch_time|count:10|0" and dropped["value_bytes"] == 101
        assert f"limit of {fits}" in dropped["error"]

    run(go())


def test_message_limits_take_the_smaller_of_producer_and_topic() -> None:
    """A topic's max.message.bytes counts only when below the producer's max_request_size; the
    smallest limit over all topics bounds the producer's batches."""
    limits = MessageLimits(producer=1000, topics={"a": 500, "b": 5000})
    assert (limits.of("a"), limits.of("b"), limits.of("unknown")) == (500, 1000, 1000)
    assert limits.smallest == 500
    assert MessageLimits().of("t") == kafka.MAX_REQUEST_SIZE == MessageLimits().smallest


def test_a_record_the_broker_keeps_refusing_is_dropped_after_the_grace() -> None:
    """A non-retriable refusal from the broker (Tansu's UnknownError for a record its schema
    registry rejects) is retried, holding the commit, until it has been refused for
    ``refusal_grace`` seconds in a row; then it is dropped and the commit may move on. An outage
    (a retriable error) is retried however long it lasts, and it restarts the refusal streak."""

    async def go() -> None:
        now = [0.0]
        producer = FakeProducer()
        outbox = Outbox(producer, refusal_grace=60.0, clock=lambda: now[0])
        refusal = UnknownError()  # error -1, non-retriable: what Tansu answers
        producer.fail_acks = refusal
        await outbox.send("t", None, b"v", ident="blocked|batch_time|count:1000|0")
        for t, error in [(0, refusal), (30, kafka.KafkaConnectionError("away")), (50, refusal)]:
            now[0] = float(t)
            producer.fail_acks = error
            await outbox.retry()
            assert not await outbox.settle()
        now[0] = 100.0  # refused since t=50: 50 s, still within the grace
        producer.fail_acks = refusal
        await outbox.retry()
        assert not await outbox.settle() and outbox.dropped == 0
        now[0] = 110.0
        with capture_logs() as logs:
            await outbox.retry()
            assert await outbox.settle()
        assert (outbox.dropped, outbox.pending) == (1, 0)
        (dropped,) = [e for e in logs if e["event"] == "publish_dropped"]
        assert dropped["id"] == "blocked|batch_time|count:1000|0"
        assert dropped["error"].startswith("refused by the broker for 60 s")

    run(go())


def test_an_outage_is_never_cut_short() -> None:
    """Timeouts and lost connections hold the commit for as long as they last."""

    async def go() -> None:
        now = [0.0]
        producer = FakeProducer()
        outbox = Outbox(producer, refusal_grace=1.0, clock=lambda: now[0])
        producer.fail_acks = kafka.KafkaConnectionError("broker away")
        await outbox.send("t", None, b"v")
        for t in range(0, 1000, 100):
            now[0] = float(t)
            await outbox.retry()
            assert not await outbox.settle()
        producer.fail_acks = None
        await outbox.retry()
        assert await outbox.settle() and outbox.dropped == 0
        assert [v for _, _, v, _ in producer.accepted] == [b"v"]

    run(go())


def test_refusals_on_a_keep_trying_topic_are_never_dropped() -> None:
    """The changelog's records are retried however long the broker refuses them: a dropped row
    would be covered by the next checkpoint all the same."""

    async def go() -> None:
        now = [0.0]
        producer = FakeProducer()
        outbox = Outbox(producer, refusal_grace=1.0, keep_trying=["state"], clock=lambda: now[0])
        producer.fail_acks = UnknownError()
        await outbox.send("state", b"k", b"row", 0)
        await outbox.send("out", b"k", b"summary")
        for t in (0.0, 5.0):
            now[0] = t
            await outbox.retry()
            assert not await outbox.settle()
        assert outbox.dropped == 1 and outbox.pending == 1  # the summary went, the row stays
        producer.fail_acks = None
        await outbox.retry()
        assert await outbox.settle()
        assert [(t, v) for t, _, v, _ in producer.accepted] == [("state", b"row")]

    run(go())


def test_sent_bytes_count_key_and_value_per_topic_retries_included() -> None:
    """What the benchmark's bytes-per-topic figure reads: every send handed to the producer."""

    async def go() -> None:
        producer = FakeProducer()
        outbox = Outbox(producer)
        await outbox.send("a", b"kk", b"vvv")
        await outbox.send("b", None, b"v")
        await outbox.send("a", b"k", None)  # a tombstone: the key only
        await outbox.flush()  # handed over (and acknowledged) before the broker goes away
        producer.fail_acks = kafka.KafkaError("broker away")
        await outbox.send("b", b"k", b"12345")
        assert not await outbox.settle()
        producer.fail_acks = None
        await outbox.retry()
        assert await outbox.settle()
        assert outbox.sent_bytes == {"a": 5 + 1, "b": 1 + 6 + 6}

    run(go())


def _per_partition(
    records: list[tuple[str, bytes | None, bytes | None, int | None]],
) -> dict[tuple[str, int | None], list[bytes | None]]:
    out: dict[tuple[str, int | None], list[bytes | None]] = {}
    for topic, _, value, partition in records:
        out.setdefault((topic, partition), []).append(value)
    return out


def test_records_go_in_batches_in_their_order_per_partition() -> None:
    """Many records over a few partitions, explicit and keyed: fewer submissions than records,
    none above the producer's batch size, and the order per partition is the order of sends."""

    async def go() -> None:
        producer = FakeProducer(partitions=4, max_batch_bytes=2000)
        outbox = Outbox(producer)
        expected: dict[tuple[str, int | None], list[bytes | None]] = {}
        every = list(range(4))
        for i in range(600):
            value = b"%04d" % i + b"x" * 100
            if i % 3 == 0:
                await outbox.send("state", b"row%d" % i, value, i % 4)
                where = ("state", i % 4)
            else:
                key = b"run-%d" % (i % 37)
                await outbox.send("out", key, value)
                where = ("out", DefaultPartitioner()(key, every, every))
            expected.setdefault(where, []).append(value)
        assert outbox.pending == 600 and not producer.submissions  # queued, not handed over
        assert await outbox.settle()
        assert _per_partition(producer.accepted) == expected
        assert len(producer.submissions) < 600 / 5
        assert max(n for _, _, n in producer.submissions) * 100 < 2000 * 1.1
        assert outbox.pending == 0

    run(go())


def test_keyed_records_land_where_send_puts_them() -> None:
    """A record without a partition goes to the partition producer.send would choose for its key
    (aiokafka's murmur2 partitioner over the producer's partitions)."""

    async def go() -> None:
        keys = [b"run-%d" % i for i in range(200)] + [b"", b"\xff" * 40]
        batched, single = FakeProducer(partitions=6), FakeProducer(partitions=6)
        outbox = Outbox(batched)
        for key in keys:
            await outbox.send("out", key, key + b"-v")
            await single.send("out", key + b"-v", key=key)
        assert await outbox.settle()
        assert {v: p for _, _, v, p in batched.accepted} == {v: p for _, _, v, p in single.accepted}
        assert len(batched.submissions) <= 6
        assert {kafka.key_partition(k, {0, 1, 2, 3, 4, 5}) for k in keys} == set(range(6))

    run(go())


def test_failed_batches_are_retried_in_order_before_new_records() -> None:
    """An outage fails whole batches at the ack: every record is kept, in order, and the retry at
    the next tick sends them before that tick's own records, in the same partition."""

    async def go() -> None:
        producer = FakeProducer(partitions=2, max_batch_bytes=500)
        outbox = Outbox(producer)
        producer.fail_acks = kafka.KafkaConnectionError("broker away")
        for i in range(20):
            await outbox.send("t", None, b"%02d" % i + b"x" * 50, i % 2)
        assert not await outbox.settle()
        assert (outbox.failures, outbox.pending, outbox.dropped) == (20, 20, 0)
        producer.fail_acks = None
        await outbox.retry()
        for i in range(20, 24):
            await outbox.send("t", None, b"%02d" % i + b"x" * 50, i % 2)
        assert await outbox.settle()
        by_partition = _per_partition(producer.accepted)
        for p in (0, 1):
            values = [int((v or b"")[:2]) for v in by_partition[("t", p)]]
            assert values == list(range(p, 24, 2))

    run(go())


def test_a_refused_record_inside_a_batch_takes_only_itself_down() -> None:
    """The broker refuses a whole batch for one bad record (Tansu's schema registry): the batch is
    sent again one record per send at once, the others are acknowledged in their order within the
    same settle, only the bad one is kept (and logged), then sent alone until the grace is over
    and it is dropped."""

    async def go() -> None:
        now = [0.0]
        producer = FakeProducer(partitions=1)
        outbox = Outbox(producer, refusal_grace=60.0, clock=lambda: now[0])
        producer.refuse_values[b"bad"] = UnknownError()
        values = [b"v%d" % i for i in range(5)] + [b"bad"] + [b"v%d" % i for i in range(5, 10)]
        for v in values:
            await outbox.send("out", b"k", v, ident=v.decode())
        with capture_logs() as logs:
            assert not await outbox.settle()
        assert [v for _, _, v, _ in producer.accepted] == [v for v in values if v != b"bad"]
        assert (outbox.failures, outbox.pending, outbox.dropped) == (1, 1, 0)
        (failed,) = [e for e in logs if e["event"] == "publish_failed"]
        assert failed["id"] == "bad" and failed["records"] == 1
        # Next tick: the bad record goes alone, the tick's new records in a batch after it.
        producer.submissions.clear()
        now[0] = 30.0
        await outbox.retry()
        await outbox.send("out", b"k", b"v10")
        await outbox.send("out", b"k", b"v11")
        assert not await outbox.settle()
        assert producer.submissions == [("out", 0, 1), ("out", 0, 2)]
        assert [v for _, _, v, _ in producer.accepted][-2:] == [b"v10", b"v11"]
        now[0] = 61.0
        await outbox.retry()
        assert await outbox.settle()
        assert (outbox.dropped, outbox.pending) == (1, 0)

    run(go())


def test_a_permanent_error_inside_a_batch_drops_only_the_offending_record() -> None:
    async def go() -> None:
        producer = FakeProducer(partitions=1)
        producer.too_large = 50  # the broker's limit, below the outbox's
        outbox = Outbox(producer)
        for v in [b"a", b"x" * 51, b"b"]:
            await outbox.send("out", b"k", v)
        assert await outbox.settle()
        assert [v for _, _, v, _ in producer.accepted] == [b"a", b"b"]
        assert (outbox.dropped, outbox.failures, outbox.pending) == (1, 0, 0)

    run(go())


def test_refusals_inside_a_keep_trying_batch_are_isolated_and_kept() -> None:
    """A changelog batch the broker refuses for one row: the other rows land, the row is kept
    however long (keep_trying), and its checkpoint after it is not lost either."""

    async def go() -> None:
        now = [0.0]
        producer = FakeProducer(partitions=2)
        outbox = Outbox(producer, refusal_grace=1.0, keep_trying=["state"], clock=lambda: now[0])
        producer.refuse_values[b"row2"] = UnknownError()
        for v in [b"row1", b"row2", b"row3", b"checkpoint"]:
            await outbox.send("state", v, v, 1)
        for t in (0.0, 5.0, 10.0):
            now[0] = t
            await outbox.retry()
            assert not await outbox.settle()
        assert outbox.dropped == 0 and outbox.pending == 1
        del producer.refuse_values[b"row2"]
        await outbox.retry()
        assert await outbox.settle()
        assert sorted(v or b"" for _, _, v, _ in producer.accepted) == [
            b"checkpoint", b"row1", b"row2", b"row3",
        ]  # fmt: skip

    run(go())


def test_send_time_failures_of_a_batch_are_kept_for_retry() -> None:
    """send_batch itself failing (the accumulator full, metadata away): kept, in order."""

    async def go() -> None:
        producer = FakeProducer(partitions=1)
        outbox = Outbox(producer)
        await outbox.send("t", None, b"0", 0)
        await outbox.send("t", None, b"1", 0)
        await outbox.send("t", b"k", b"2")  # needs the partitions: unknown while refused
        producer.refuse = kafka.KafkaError("broker away")
        assert not await outbox.settle()
        assert (outbox.failures, outbox.pending) == (3, 3)
        producer.refuse = None
        await outbox.retry()
        assert await outbox.settle()
        assert sorted(v or b"" for _, _, v, _ in producer.accepted) == [b"0", b"1", b"2"]

    run(go())


def test_a_large_queue_is_handed_over_before_settle() -> None:
    """Memory stays bounded: past FLUSH_BYTES queued, send hands the queue over itself."""

    async def go() -> None:
        producer = FakeProducer(partitions=2, max_batch_bytes=256 * 1024)
        outbox = Outbox(producer)
        value = b"x" * 10_000
        for i in range(FLUSH_BYTES // 10_000 + 10):
            await outbox.send("t", b"k%d" % i, value)
        assert len(producer.accepted) >= FLUSH_BYTES // 10_000  # handed over before any settle
        assert outbox.pending > 0  # none of it settled yet
        assert await outbox.settle()
        assert len(producer.accepted) == FLUSH_BYTES // 10_000 + 10

    run(go())


def test_a_producer_without_batches_gets_one_send_per_record_in_order() -> None:
    async def go() -> None:
        producer = SendOnlyProducer()
        outbox = Outbox(producer)
        for i in range(10):
            await outbox.send("t", b"k", b"%d" % i)
        assert await outbox.settle()
        assert [v for _, _, v, _ in producer.inner.accepted] == [b"%d" % i for i in range(10)]
        assert len(producer.inner.submissions) == 10

    run(go())


def test_records_without_key_or_partition_go_alone_in_their_place() -> None:
    """No key, no partition: producer.send chooses a random partition, as before (so such a
    record has no place in a partition's order to keep), on its own."""

    async def go() -> None:
        producer = FakeProducer(partitions=1)
        outbox = Outbox(producer)
        for v in [b"a", b"b"]:
            await outbox.send("t", b"k", v)
        await outbox.send("t", None, b"loose")
        await outbox.send("t", b"k", b"c")
        assert await outbox.settle()
        assert sorted(v or b"" for _, _, v, _ in producer.accepted) == [b"a", b"b", b"c", b"loose"]
        assert sorted(n for _, _, n in producer.submissions) == [1, 3]

    run(go())


def test_a_flush_cancelled_midway_keeps_what_it_had_not_handed_over() -> None:
    """Shutdown cancels a tick while it hands batches over: the batches not yet taken by the
    producer go back to the queue, in order, so the next settle (the final tick) sends them."""

    async def go() -> None:
        producer = FakeProducer(partitions=1, max_batch_bytes=300)
        gate = asyncio.Event()
        submit = producer.send_batch

        async def slow_send_batch(batch: FakeBatch, topic: str, *, partition: int) -> Any:
            if producer.submissions:  # the second batch waits (a full accumulator)
                await gate.wait()
            return await submit(batch, topic, partition=partition)

        producer.send_batch = slow_send_batch  # type: ignore[method-assign]
        outbox = Outbox(producer)
        values = [b"%02d" % i + b"x" * 60 for i in range(12)]
        for v in values:
            await outbox.send("t", None, v, 0)
        flush = asyncio.ensure_future(outbox.flush())
        await asyncio.sleep(0)
        assert len(producer.submissions) == 1
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        first = producer.submissions[0][2]
        assert outbox.pending == len(values)  # handed over (in flight) or queued again
        gate.set()
        assert await outbox.settle()
        assert [v for _, _, v, _ in producer.accepted] == values
        assert sum(n for _, _, n in producer.submissions) == len(values) and first < len(values)

    run(go())
