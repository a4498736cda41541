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
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from metricsd import kafka
from metricsd.topics import MessageLimits

__all__ = ["REFUSAL_GRACE", "Outbox", "Producer", "Send"]

log = structlog.get_logger(__name__)

#: Seconds a record the broker keeps refusing (``kafka.refused``) is retried before it is dropped.
REFUSAL_GRACE: Final = 60.0


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
        self.limits = limits or MessageLimits()
        self._grace = refusal_grace
        self._keep_trying = frozenset(keep_trying)
        self._clock = clock
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
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        *,
        ident: str | None = None,
    ) -> None:
        """Send one record (``ident`` names it in the log lines if it fails or is dropped)."""
        item = Send(topic, key, value, partition, ident)
        size = kafka.record_size(key, value)
        limit = self.limits.of(topic)
        if size > limit:
            self._drop(item, f"the record is {size} bytes, over the topic's limit of {limit}")
            return
        await self._send(item)

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
        return not self._failed

    async def _send(self, item: Send) -> None:
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
            return
        self._in_flight.append((item, future))
        size = len(item.key or b"") + len(item.value or b"")
        self.sent_bytes[item.topic] = self.sent_bytes.get(item.topic, 0) + size

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
