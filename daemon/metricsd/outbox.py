"""Publishing in one place: send, await the acknowledgements, keep what failed for the next try,
and say when everything sent so far is safe, i.e. when the input offsets it covers may be
committed.

The producer is injected (``kafka.producer`` in the daemon, a fake in the unit tests). A send that
fails for a reason a retry can fix (timeout, leader change, broker away) is kept, in order, and
sent again by :meth:`Outbox.retry` at the next tick; until then :meth:`Outbox.settle` reports
``False`` and the commit waits. A send that can never succeed (record too large, invalid topic:
``kafka.PERMANENT_ERRORS``) is counted, logged with its size and stepped over: one such record
must not hold back every later commit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from metricsd import kafka

__all__ = ["Outbox", "Producer", "Send"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None


class Producer(Protocol):
    """What the outbox needs of a producer: aiokafka's ``send`` (returns a future of the ack)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        partition: int | None = ...,
    ) -> asyncio.Future[Any]: ...


class Outbox:
    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._failed: list[Send] = []  # to send again, in order
        self._in_flight: list[tuple[Send, asyncio.Future[Any]]] = []
        self.failures = 0  # sends that failed and were kept for retry
        self.dropped = 0  # sends that could never succeed, stepped over
        #: key + value bytes handed to the producer per topic (retries count again)
        self.sent_bytes: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """Records not yet acknowledged: in flight or waiting for a retry."""
        return len(self._failed) + len(self._in_flight)

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        await self._send(Send(topic, key, value, partition))

    async def retry(self) -> None:
        """Send again, in their order, the records whose earlier send failed."""
        failed, self._failed = self._failed, []
        for item in failed:
            await self._send(item)

    async def settle(self) -> bool:
        """Await every record in flight. True if everything sent so far is acknowledged (or
        stepped over for good), so the offsets it covers may be committed."""
        in_flight, self._in_flight = self._in_flight, []
        if in_flight:
            results = await asyncio.gather(*(f for _, f in in_flight), return_exceptions=True)
            errors = [
                (item, r)
                for (item, _), r in zip(in_flight, results, strict=True)
                if isinstance(r, BaseException)
            ]
            retry = [(item, exc) for item, exc in errors if not self._permanent(item, exc)]
            if retry:
                self._failed += [item for item, _ in retry]
                self.failures += len(retry)
                log.error("publish_failed", records=len(retry), error=str(retry[0][1]))
        return not self._failed

    async def _send(self, item: Send) -> None:
        try:
            future = await self._producer.send(
                item.topic, item.value, key=item.key, partition=item.partition
            )
        except kafka.KafkaError as exc:
            if not self._permanent(item, exc):
                self._failed.append(item)
                self.failures += 1
                log.error("publish_failed", topic=item.topic, error=str(exc))
            return
        self._in_flight.append((item, future))
        size = len(item.key or b"") + len(item.value or b"")
        self.sent_bytes[item.topic] = self.sent_bytes.get(item.topic, 0) + size

    def _permanent(self, item: Send, exc: BaseException) -> bool:
        if not isinstance(exc, kafka.PERMANENT_ERRORS):
            return False
        self.dropped += 1
        log.error(
            "publish_dropped",
            topic=item.topic,
            key_bytes=len(item.key or b""),
            value_bytes=len(item.value or b""),
            error=f"{type(exc).__name__}: {exc}",
        )
        return True
