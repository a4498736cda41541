"""The outbox's batches on the real broker: a keyed record without a partition lands on the
partition ``producer.send`` gives its key (aiokafka's murmur2 partitioner), and the records of one
partition arrive in the order they were sent, across several batches per partition."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from kafka_tools import create_topics_async, read_topic_aiokafka_async
from metricsd import kafka
from metricsd.config import Security
from metricsd.devbroker import DevBroker
from metricsd.outbox import Outbox

pytestmark = pytest.mark.integration

PARTITIONS = 8


def test_batched_records_land_where_send_puts_them_in_order(
    broker: DevBroker, topic_name: str
) -> None:
    keys = [f"run-{i}".encode() for i in range(300)]
    rounds = 5  # several records per key: order per key (per partition) is checked

    async def go() -> list[tuple[bytes | None, bytes | None, int, int]]:
        await create_topics_async(broker.bootstrap, {topic_name: PARTITIONS})
        producer = kafka.producer(broker.bootstrap, security=Security(), max_batch_size=16_384)
        await producer.start()
        try:
            futures = [await producer.send(topic_name, b"send", key=key) for key in keys]
            await asyncio.gather(*futures)
            outbox = Outbox(producer)
            for r in range(rounds):
                for key in keys:
                    await outbox.send(topic_name, key, b"outbox-%d-" % r + b"x" * 200)
            for p in range(PARTITIONS):
                await outbox.send(topic_name, b"explicit", b"explicit-%d" % p, p)
            assert await outbox.settle()
            assert (outbox.pending, outbox.failures, outbox.dropped) == (0, 0, 0)
        finally:
            await producer.stop()
        total = len(keys) * (rounds + 1) + PARTITIONS
        return await read_topic_aiokafka_async(
            broker.bootstrap,
            topic_name,
            range(PARTITIONS),
            until=lambda got: len(got) >= total,
            timeout=60,
        )

    records = asyncio.run(go())
    by_key: dict[bytes | None, list[tuple[int, int, bytes]]] = defaultdict(list)
    for key, value, partition, offset in records:
        by_key[key].append((partition, offset, value or b""))
    for key in keys:
        placed = sorted(by_key[key], key=lambda r: r[1])
        assert len({p for p, _, _ in placed}) == 1, f"{key!r} on several partitions: {placed}"
        assert [v.split(b"-")[:2] for _, _, v in placed] == [[b"send"]] + [
            [b"outbox", b"%d" % r] for r in range(rounds)
        ]
    assert sorted(p for p, _, _ in by_key[b"explicit"]) == list(range(PARTITIONS))
    used = {p for key in keys for p, _, _ in by_key[key]}
    assert used == set(range(PARTITIONS))
