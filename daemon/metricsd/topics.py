"""The daemon's topics: the changelog created at start-up beside the others, and all of them
created again when the broker lost them (a broker that came back empty: Tansu's memory storage
after a restart, or a wiped cluster), since every send fails until they exist. Also the one place
that knows how large a record each topic takes (:class:`MessageLimits`, read at start-up)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from metricsd import kafka
from metricsd.config import Settings

__all__ = ["MessageLimits", "Topics"]

log = structlog.get_logger(__name__)

_CHECK_EVERY = 10.0  # seconds between two checks after failed ticks, and each check's bound


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The largest record (``kafka.record_size``) each topic takes: the producer's
    ``max_request_size``, or the topic's ``max.message.bytes`` where the broker reported a smaller
    one. Read once at start-up (``read``); a topic created later with another limit is not seen
    until the next start."""

    producer: int = kafka.MAX_REQUEST_SIZE
    topics: Mapping[str, int] = field(default_factory=dict)

    def of(self, topic: str) -> int:
        """The limit of ``topic``."""
        return min(self.producer, self.topics.get(topic, self.producer))

    @property
    def smallest(self) -> int:
        """The smallest limit over every topic known (the producer's batches must fit it)."""
        return min([self.producer, *self.topics.values()])

    @classmethod
    async def read(cls, settings: Settings, timeout: float = 10.0) -> MessageLimits:
        """Ask the broker for the ``max.message.bytes`` of the daemon's topics; one log line says
        what was found, and which topics fall back to the producer's limit (Tansu reports no
        default; a broker that does not answer DescribeConfigs leaves every topic at it)."""
        s = settings
        names = [*s.topics(), *([s.state_topic] if s.changelog else [])]
        try:
            found = await kafka.max_message_bytes(
                s.bootstrap_servers, names, security=s.security, timeout=timeout
            )
        except (kafka.KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "message_limits_unknown",
                error=repr(exc),
                producer_limit=kafka.MAX_REQUEST_SIZE,
                detail="the broker did not answer DescribeConfigs: every topic is assumed to take "
                "records up to the producer's max_request_size",
            )
            return cls()
        limits = cls(topics=found)
        log.info(
            "message_limits",
            limits={name: limits.of(name) for name in names},
            producer_limit=limits.producer,
            max_message_bytes=found,
            unreported=[name for name in names if name not in found],
        )
        return limits


class Topics:
    def __init__(self, settings: Settings, producer: Any) -> None:
        self.settings = settings
        self._producer = producer
        self._next_check = 0.0

    async def ensure_changelog(self, timeout: float | None = 60.0) -> list[str]:
        """Create the changelog topic if missing. It mirrors the input's partitioning: a run's
        state sits in the changelog partition numbered like the input partition its events
        arrive on."""
        s = self.settings
        partitions = len(await self._producer.partitions_for(s.input_topic))
        return await kafka.ensure_topics(
            s.bootstrap_servers,
            {s.state_topic: partitions},
            security=s.security,
            configs={s.state_topic: {"cleanup.policy": "compact"}},
            timeout=timeout,
        )

    def check_soon(self) -> None:
        """The next ``recover`` really checks (an assignment is worth a fresh look)."""
        self._next_check = 0.0

    async def recover(self) -> None:
        """Create what is missing and say so loudly: at most every 10 s, bounded to 10 s."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + _CHECK_EVERY
        s = self.settings
        try:
            created = await kafka.ensure_topics(
                s.bootstrap_servers, s.topics(), security=s.security, timeout=_CHECK_EVERY
            )
            if s.changelog:
                created += await self.ensure_changelog(timeout=_CHECK_EVERY)
        except (kafka.KafkaError, OSError) as exc:
            log.warning("topic_check_failed", error=repr(exc))
            return
        if created:
            log.error(
                "broker_lost_topics",
                topics=created,
                detail="the broker no longer had these topics (restarted empty?) and they were "
                "created again; the windows of the partitions involved start empty",
            )
