"""The daemon's topics: the changelog created at start-up beside the others, and all of them
created again when the broker lost them (a broker that came back empty: Tansu's memory storage
after a restart, or a wiped cluster), since every send fails until they exist."""

from __future__ import annotations

import time
from typing import Any

import structlog

from metricsd import kafka
from metricsd.config import Settings

__all__ = ["Topics"]

log = structlog.get_logger(__name__)

_CHECK_EVERY = 10.0  # seconds between two checks after failed ticks, and each check's bound


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
