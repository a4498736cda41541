"""Micro-benchmark of the send path (issue 12): per-record ``producer.send`` vs record batches.

Against the embedded Tansu broker, in one process, alternating the order per repetition:

- ``send``: per record ``await producer.send(topic, value, key=key)``, then one gather of the
  futures (what ``Outbox`` did before batching);
- ``batch``: ``producer.create_batch()`` / ``append`` per partition, ``send_batch`` per batch,
  then one gather of the batch futures (partition chosen with the producer's own partitioner);
- ``outbox``: ``metricsd.outbox.Outbox.send`` per record, ``flush()``, then ``settle()`` (the
  daemon's path);
- ``old-outbox``: the same with the ``Outbox`` of another revision (``--old-outbox FILE``, e.g.
  ``git show 9d0e3fe:daemon/metricsd/outbox.py > /tmp/old.py``: one ``send`` per record).

The CPU figure is this process's CPU time (``time.process_time``) over send and acks together:
what the daemon's thread spends (aiokafka's sender task runs in it too); the broker's is not in it.
N records of ~600-byte values keyed by 10,000 run ids over 8 partitions, acks=all, the daemon's
producer settings (``metricsd.kafka.producer``). Reports µs per record (wall time of the send
part; the gather of acks separately) as median [min-max] over the repetitions.

    python -m bench.sendpath [--records 30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from metricsd import kafka
from metricsd.config import Security
from metricsd.devbroker import DevBroker
from metricsd.outbox import Outbox

PARTITIONS = 8


def _records(n: int) -> list[tuple[bytes, bytes]]:
    pad = "x" * 520
    return [
        (
            f"run-{i % 10_000:05d}".encode(),
            (f'{{"id":"s{i}","run_id":"run-{i % 10_000:05d}","step":{i},"pad":"{pad}"}}').encode(),
        )
        for i in range(n)
    ]


async def _per_record(
    producer: Any, topic: str, records: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    t0 = time.perf_counter()
    futures = [await producer.send(topic, value, key=key) for key, value in records]
    t1 = time.perf_counter()
    await asyncio.gather(*futures)
    return t1 - t0, time.perf_counter() - t1


async def _batched(
    producer: Any, topic: str, records: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    t0 = time.perf_counter()
    await producer.client._wait_on_metadata(topic)
    all_partitions = sorted(producer.client.cluster.partitions_for_topic(topic))
    available = sorted(producer.client.cluster.available_partitions_for_topic(topic))
    partitioner = producer._partitioner
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in records:
        p = partitioner(key, all_partitions, available)
        by_partition.setdefault(p, []).append((key, value))
    futures = []
    for p, items in by_partition.items():
        batch = producer.create_batch()
        for key, value in items:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=p))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        futures.append(await producer.send_batch(batch, topic, partition=p))
    t1 = time.perf_counter()
    await asyncio.gather(*futures)
    return t1 - t0, time.perf_counter() - t1


async def _outbox(
    producer: Any, topic: str, records: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    outbox = Outbox(producer)
    t0 = time.perf_counter()
    for key, value in records:
        await outbox.send(topic, key, value)
    flush = getattr(outbox, "flush", None)
    if flush is not None:
        await flush()
    t1 = time.perf_counter()
    assert await outbox.settle()
    return t1 - t0, time.perf_counter() - t1


def _load_outbox(path: str) -> Any:
    """An ``Outbox`` class from another revision's ``outbox.py`` (``git show REV:path > file``)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("metricsd_outbox_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Outbox


async def _other_outbox(
    producer: Any, topic: str, records: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    outbox = OTHER[0](producer)
    t0 = time.perf_counter()
    for key, value in records:
        await outbox.send(topic, key, value)
    t1 = time.perf_counter()
    assert await outbox.settle()
    return t1 - t0, time.perf_counter() - t1


OTHER: list[Any] = []
WAYS = {"send": _per_record, "batch": _batched, "outbox": _outbox, "old-outbox": _other_outbox}


async def main(n: int, repeat: int, ways: list[str], bootstrap: str | None) -> None:
    broker = None
    if bootstrap is None:
        broker = DevBroker().start()
        bootstrap = broker.bootstrap
    try:
        security = Security()
        topic = f"sendpath-{uuid.uuid4().hex[:8]}"
        await kafka.ensure_topics(bootstrap, {topic: PARTITIONS}, security=security)
        producer = kafka.producer(bootstrap, security=security)
        await producer.start()
        try:
            records = _records(n)
            await _per_record(producer, topic, records[:2000])  # warm-up: metadata, connections
            await _batched(producer, topic, records[:2000])
            results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
            cpu: dict[str, list[float]] = {w: [] for w in ways}
            for r in range(repeat):
                order = ways if r % 2 == 0 else list(reversed(ways))
                for way in order:
                    c0 = time.process_time()
                    send, acks = await WAYS[way](producer, topic, records)
                    results[way].append((send, acks))
                    cpu[way].append(time.process_time() - c0)
            print(
                f"{n} records, value {len(records[0][1])} B, {PARTITIONS} partitions, "
                f"{repeat} repetitions, load {os.getloadavg()[0]:.2f}"
            )
            for way in ways:
                send = [s / n * 1e6 for s, _ in results[way]]
                acks = [a / n * 1e6 for _, a in results[way]]
                print(
                    f"  {way:7s} send {statistics.median(send):6.2f} µs/record "
                    f"[{min(send):.2f}-{max(send):.2f}]   acks {statistics.median(acks):6.2f} "
                    f"µs/record [{min(acks):.2f}-{max(acks):.2f}]   CPU (send+acks) "
                    f"{statistics.median(c / n * 1e6 for c in cpu[way]):6.2f} µs/record "
                    f"[{min(cpu[way]) / n * 1e6:.2f}-{max(cpu[way]) / n * 1e6:.2f}]"
                )
            base = [s for s, _ in results[ways[0]]]
            for way in ways[1:]:
                ratios = [b / s for b, (s, _) in zip(base, results[way], strict=True)]
                print(
                    f"  {ways[0]}/{way} send-time ratio: median {statistics.median(ratios):.2f} "
                    f"[{min(ratios):.2f}-{max(ratios):.2f}]"
                )
        finally:
            await producer.stop()
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ways", default="send,batch,outbox")
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--old-outbox", default=None, help="outbox.py of another revision")
    args = parser.parse_args()
    if args.old_outbox:
        OTHER.append(_load_outbox(args.old_outbox))
    asyncio.run(main(args.records, args.repeat, args.ways.split(","), args.bootstrap))
