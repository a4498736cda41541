"""The outbox against a producer that fails on command: what failed is retried in order, the
commit waits until everything is acknowledged, and a record that can never be written is counted
and stepped over instead of holding every later commit back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from metricsd import kafka
from metricsd.outbox import Outbox


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
