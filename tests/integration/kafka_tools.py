"""Kafka helpers for the integration tests: create topics, produce and read back, two clients.

Two independent client stacks on purpose: aiokafka (what the daemon uses) and confluent-kafka
(librdkafka, a foreign client) — a record written by one and read by the other proves the wire
format is plain Kafka. Readers always ``assign()`` explicit partitions from the beginning and never
join a group: confluent-kafka's ``subscribe()`` gets no partitions from Tansu, and a group join
costs seconds. Readers poll until a predicate over what they collected holds or the timeout
passes, then return what they have, so that the test's own assertion reports the difference.
Never use end offsets as "caught up" on Tansu (its high watermark is under-reported).

Records are ``(key, value, partition, offset)`` tuples (``ReadRecord``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer
from confluent_kafka import TopicPartition as CKTopicPartition

__all__ = [
    "ProduceRecord",
    "ReadRecord",
    "create_topics",
    "create_topics_async",
    "produce_aiokafka",
    "produce_aiokafka_async",
    "produce_foreign",
    "read_topic_aiokafka",
    "read_topic_aiokafka_async",
    "read_topic_foreign",
]

#: (key or None, value, partition or None = let the client's partitioner choose)
ProduceRecord = tuple[bytes | None, bytes, int | None]
#: (key, value, partition, offset) as read back
ReadRecord = tuple[bytes | None, bytes | None, int, int]
Until = Callable[[list[ReadRecord]], bool]


async def create_topics_async(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 20.0,
) -> None:
    """Create each topic ``name -> partitions`` (replication 1) and wait until metadata lists it.

    ``configs`` maps a topic name to topic configs (e.g. ``{"cleanup.policy": "compact"}``).
    Raises ``AssertionError`` naming the topic if the broker reports an error for it (an existing
    topic included) or if it is not visible within ``timeout`` seconds.
    """
    configs = configs or {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        new = [
            NewTopic(name, partitions, 1, topic_configs=dict(configs.get(name, {})))
            for name, partitions in topics.items()
        ]
        response = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
        failures = [entry for entry in response.topic_errors if entry[1] != 0]
        assert not failures, f"create_topics failed: {failures}"
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(list(topics))
            ready = {
                t["topic"]
                for t in described
                if t["error_code"] == 0 and len(t["partitions"]) == topics[t["topic"]]
            }
            if ready >= set(topics):
                return
            assert time.monotonic() < deadline, f"topics not visible after {timeout} s: {described}"
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 20.0,
) -> None:
    """Synchronous ``create_topics_async`` (runs its own event loop; not for use inside one)."""
    asyncio.run(create_topics_async(bootstrap, topics, configs=configs, timeout=timeout))


def produce_foreign(
    bootstrap: str,
    topic: str,
    records: Iterable[ProduceRecord],
    *,
    timeout: float = 20.0,
    config: Mapping[str, object] | None = None,
) -> list[tuple[int, int]]:
    """Produce with confluent-kafka, flush, and return ``(partition, offset)`` per record.

    Records keep their input order within a partition. With partition None the murmur2 partitioner
    is used, the same key -> partition mapping as the Java client and aiokafka. Raises
    ``AssertionError`` if any record is not acknowledged within ``timeout`` seconds. ``config``
    adds librdkafka settings (e.g. ``security.protocol``, ``ssl.ca.location``, ``sasl.*``).
    """
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "message.timeout.ms": int(timeout * 1000),
            **(config or {}),
        }
    )
    results: list[tuple[int, int] | str | None] = []

    def make_callback(index: int) -> Callable[[KafkaError | None, object], None]:
        def on_delivery(err: KafkaError | None, msg: object) -> None:
            if err is not None:
                results[index] = f"{err}"
            else:
                results[index] = (msg.partition(), msg.offset())  # type: ignore[attr-defined]

        return on_delivery

    for key, value, partition in records:
        results.append(None)
        kwargs: dict[str, object] = {"key": key, "value": value}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, on_delivery=make_callback(len(results) - 1), **kwargs)
        producer.poll(0)
    remaining = producer.flush(timeout)
    assert remaining == 0, f"{remaining} records still in flight after {timeout} s"
    failed = [(i, r) for i, r in enumerate(results) if not isinstance(r, tuple)]
    assert not failed, f"undelivered records (index, error): {failed[:10]}"
    return [r for r in results if isinstance(r, tuple)]


async def produce_aiokafka_async(
    bootstrap: str,
    topic: str,
    records: Iterable[ProduceRecord],
) -> list[tuple[int, int]]:
    """Produce with aiokafka (default murmur2 partitioner) and return ``(partition, offset)`` each.

    Sends every record, then awaits all acknowledgements; raises on any delivery error.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=value, key=key, partition=partition)
            for key, value, partition in records
        ]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


def produce_aiokafka(
    bootstrap: str, topic: str, records: Iterable[ProduceRecord]
) -> list[tuple[int, int]]:
    """Synchronous ``produce_aiokafka_async`` (runs its own event loop)."""
    return asyncio.run(produce_aiokafka_async(bootstrap, topic, records))


def read_topic_foreign(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    *,
    until: Until,
    timeout: float = 30.0,
    config: Mapping[str, object] | None = None,
) -> list[ReadRecord]:
    """Read ``partitions`` of ``topic`` from the beginning with confluent-kafka ``assign()``.

    Polls until ``until(collected)`` is true or ``timeout`` seconds pass, then returns the
    collected records in arrival order (per partition in offset order). Commits nothing; the
    throwaway group id is never joined. Transient errors (e.g. a topic not yet in metadata) are
    retried; a fatal client error raises ``AssertionError``.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"metricsd-test-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            **(config or {}),
        }
    )
    collected: list[ReadRecord] = []
    try:
        consumer.assign([CKTopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        while not until(collected) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.1):
                error = msg.error()
                if error is not None:
                    assert not error.fatal(), f"fatal consumer error: {error}"
                    continue
                collected.append((msg.key(), msg.value(), msg.partition(), msg.offset()))
    finally:
        consumer.close()
    return collected


async def read_topic_aiokafka_async(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    *,
    until: Until,
    timeout: float = 30.0,
) -> list[ReadRecord]:
    """Same contract as ``read_topic_foreign``, with aiokafka ``assign()`` and no group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    collected: list[ReadRecord] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        while not until(collected) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100, max_records=1000)
            for tp_records in batches.values():
                collected.extend((r.key, r.value, r.partition, r.offset) for r in tp_records)
    finally:
        await consumer.stop()
    return collected


def read_topic_aiokafka(
    bootstrap: str,
    topic: str,
    partitions: Sequence[int],
    *,
    until: Until,
    timeout: float = 30.0,
) -> list[ReadRecord]:
    """Synchronous ``read_topic_aiokafka_async`` (runs its own event loop)."""
    return asyncio.run(
        read_topic_aiokafka_async(bootstrap, topic, partitions, until=until, timeout=timeout)
    )


def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: Iterable[int]
) -> dict[int, int | None]:
    """The offsets ``group`` committed for ``partitions`` of ``topic`` (None: nothing committed)."""

    async def read() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
        finally:
            await consumer.stop()

    return asyncio.run(read())
