"""The outbox against a producer that fails on command: what failed is retried in order, the
commit waits until everything is acknowledged, and a record that can never be written is counted
and stepped over instead of holding every later commit back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import UnknownError
from metricsd import kafka
from metricsd.outbox import Outbox
from metricsd.topics import MessageLimits
from structlog.testing import capture_logs


class FakeProducer:
    """Acknowledges each send unless told to fail it: at ``send`` time (``refuse``) or when the
    acknowledgement is awaited (``fail_acks``). Records what the broker accepted, in order."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.refuse: BaseException | None = None
        self.fail_acks: BaseException | None = None
        self.too_large = 10**9

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:  # fmt: skip
        if self.refuse is not None:
            raise self.refuse
        if len(value or b"") > self.too_large:
            raise kafka.PERMANENT_ERRORS[0]("too large")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_acks is not None:
            future.set_exception(self.fail_acks)
        else:
            self.accepted.append((topic, key, value, partition))
            future.set_result(None)
        return future


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


def test_sent_bytes_count_key_and_value_per_topic_retries_included() -> None:
    """What the benchmark's bytes-per-topic figure reads: every send handed to the producer."""

    async def go() -> None:
        producer = FakeProducer()
        outbox = Outbox(producer)
        await outbox.send("a", b"kk", b"vvv")
        await outbox.send("b", None, b"v")
        await outbox.send("a", b"k", None)  # a tombstone: the key only
        producer.fail_acks = kafka.KafkaError("broker away")
        await outbox.send("b", b"k", b"12345")
        assert not await outbox.settle()
        producer.fail_acks = None
        await outbox.retry()
        assert await outbox.settle()
        assert outbox.sent_bytes == {"a": 5 + 1, "b": 1 + 6 + 6}

    run(go())
