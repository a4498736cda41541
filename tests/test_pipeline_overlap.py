"""The background tick against a producer whose acknowledgements the test releases: consumption
goes on while a tick waits, its commit covers exactly its snapshot and comes only after its acks,
one tick is in flight at a time, and a revoke waits for the tick in flight (docs/state.md)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from metricsd import kafka
from metricsd.config import MonitorSettings, Settings
from metricsd.pipeline import Pipeline
from metricsd.profiler import Profiler

TP = kafka.TopicPartition("in", 0)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0


class HeldProducer:
    """Every send is accepted at once; its acknowledgement waits for ``ack_all``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self._futures: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None) -> asyncio.Future[Any]:  # fmt: skip
        self.sent.append((topic, key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        return future

    def ack_all(self) -> None:
        for future in self._futures:
            if not future.done():
                future.set_result(None)
        self._futures.clear()


class Consumer:
    def __init__(self) -> None:
        self.commits: list[int] = []

    async def commit(self, offsets: dict[kafka.TopicPartition, Any]) -> None:
        self.commits.append(offsets[TP].offset)


def pipeline(changelog: bool = True) -> tuple[Pipeline, HeldProducer, Consumer]:
    settings = Settings(
        bootstrap_servers="unused:9092",
        input_topic="in",
        output_topic="out",
        group_id="g",
        changelog=changelog,
        monitor=MonitorSettings(window=10, time_windows=()),
    )
    p = Pipeline(settings, "test", Profiler())
    producer, consumer = HeldProducer(), Consumer()
    p.use_producer(producer)
    p.use_consumer(consumer)
    p.assigned.add(TP)
    p.changelog.assign([0])  # owned, as after an assignment whose restore found nothing
    return p, producer, consumer


def batch(start: int, n: int) -> dict[kafka.TopicPartition, list[Any]]:
    records = [
        Record("in", 0, off, b"r", orjson.dumps({"type": "batch_time", "run_id": "r",
                                                 "ts": 1e9 + off, "seconds": 0.1 + off}))
        for off in range(start, start + n)
    ]  # fmt: skip
    return {TP: records}


async def settle_loop() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def totals(producer: HeldProducer) -> list[int]:
    return [orjson.loads(v)["total"] for t, _, v in producer.sent if t == "out" and v]


def checkpoints(producer: HeldProducer) -> list[int]:
    return [
        orjson.loads(v)["offset"]
        for t, k, v in producer.sent
        if t == "g.state" and k is not None and v is not None and k.startswith(b'["checkpoint"')
    ]


def test_consumption_goes_on_while_a_tick_waits_and_its_commit_covers_its_snapshot() -> None:
    async def go() -> None:
        p, producer, consumer = pipeline()
        await p.consume(batch(0, 5))
        await p.start_tick()  # returns at once: the snapshot is taken
        await settle_loop()
        assert totals(producer) == [5]
        assert checkpoints(producer) == [], "a checkpoint went out before its rows were acked"
        assert consumer.commits == []  # nothing acknowledged yet
        await p.consume(batch(5, 5))  # the loop consumes meanwhile
        assert p.counters.events == 10
        second = asyncio.ensure_future(p.start_tick())
        await settle_loop()
        assert not second.done(), "a second tick started while the first waited for acks"
        assert totals(producer) == [5]
        producer.ack_all()  # the summary and the rows: now the checkpoint
        await settle_loop()
        assert checkpoints(producer) == [5] and consumer.commits == [] and not second.done()
        producer.ack_all()
        await second  # the first tick committed, then the second took its snapshot
        assert consumer.commits == [5], "the commit covers the first snapshot, not what came after"
        await settle_loop()
        assert totals(producer) == [5, 10] and checkpoints(producer) == [5]
        producer.ack_all()
        await settle_loop()
        assert checkpoints(producer) == [5, 10]
        producer.ack_all()
        await p.tick()  # the final tick waits for the second, then runs a whole one
        assert consumer.commits == [5, 10, 10]
        assert p.settled and p.counters.ticks == 3

    asyncio.run(go())


def test_a_revoke_waits_for_the_commit_of_the_tick_in_flight() -> None:
    async def go() -> None:
        p, producer, consumer = pipeline()
        await p.consume(batch(0, 4))
        await p.start_tick()
        await settle_loop()
        await p.consume(batch(4, 3))
        revoke = asyncio.ensure_future(p.revoke({TP}))
        await settle_loop()
        assert not revoke.done() and consumer.commits == []
        for _ in range(2):  # rows, then the checkpoint
            producer.ack_all()
            await settle_loop()
        assert consumer.commits == [4]  # the tick in flight first
        while not revoke.done():  # then the revoke's own tick, with everything consumed since
            producer.ack_all()
            await settle_loop()
        await revoke
        assert consumer.commits == [4, 7]
        assert checkpoints(producer) == [4, 7]
        assert TP not in p.assigned

    asyncio.run(go())


def test_a_row_not_acknowledged_withholds_its_checkpoint_until_it_is_resent() -> None:
    """A checkpoint vouches for the rows before it: while one of them waits for a retry, no
    checkpoint may land, or a crash then would restore windows without that row's values."""

    async def go() -> None:
        p, producer, consumer = pipeline()
        await p.consume(batch(0, 3))
        await p.start_tick()
        await settle_loop()
        first_rows = [(t, k, v) for t, k, v in producer.sent if t == "g.state"]
        assert first_rows and checkpoints(producer) == []
        for (topic, _, _), future in zip(producer.sent, producer._futures, strict=True):
            if topic == "g.state":
                future.set_exception(kafka.KafkaError("not leader"))  # retriable
            else:
                future.set_result(None)
        producer._futures.clear()
        p.topics._next_check = float("inf")  # no broker to check topics against
        await settle_loop()
        assert checkpoints(producer) == [], "checkpoint written while its rows wait for a retry"
        assert consumer.commits == [] and not p.settled
        await p.consume(batch(3, 2))
        tick = asyncio.ensure_future(p.start_tick())
        while checkpoints(producer) == []:
            producer.ack_all()
            await settle_loop()
        state = [(k, v) for t, k, v in producer.sent if t == "g.state"]
        resent = state[len(first_rows) : 2 * len(first_rows)]
        assert resent == [(k, v) for _, k, v in first_rows], "the failed rows go first"
        assert state[-1][0].startswith(b'["checkpoint"') and checkpoints(producer) == [5]
        while not p.settled:
            producer.ack_all()
            await settle_loop()
        await tick
        assert consumer.commits == [5]

    asyncio.run(go())


def test_a_failed_ack_withholds_the_commit_and_the_next_tick_retries_first() -> None:
    async def go() -> None:
        p, producer, consumer = pipeline(changelog=False)
        await p.consume(batch(0, 3))
        await p.start_tick()
        await settle_loop()
        for future in producer._futures:
            future.set_exception(kafka.KafkaError("broker away"))
        producer._futures.clear()
        p.topics._next_check = float("inf")  # no broker to check topics against
        await p.consume(batch(3, 2))
        await p.start_tick()  # waits for the failed tick, retries its record, then its own
        await settle_loop()
        assert consumer.commits == [] and not p.settled
        assert totals(producer) == [3, 3, 5]  # the retried summary went out before the new one
        producer.ack_all()
        await p.tick()
        assert consumer.commits == [5, 5] and p.settled

    asyncio.run(go())
