"""All Kafka access: the only module that imports aiokafka.

Clients are built here from the settings so that connection options (and later TLS/SASL) are
decided in one place for every client the daemon creates: the consumer, the producer and the admin
client that creates missing topics. The service and the simulator use what this module returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

__all__ = [
    "ConsumerRecord",
    "KafkaConnectionError",
    "KafkaError",
    "OffsetAndMetadata",
    "Partitions",
    "TopicPartition",
    "consumer",
    "ensure_topics",
    "producer",
]

log = structlog.get_logger(__name__)

_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    *,
    timeout: float = 60.0,
) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions); return the ones created.

    Retries with exponential backoff while the broker is unreachable, up to ``timeout`` seconds;
    then raises ``KafkaConnectionError``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.2
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [name for name in topics if name not in existing]
            if missing:
                response = await admin.create_topics(
                    [NewTopic(name, topics[name], replication_factor=1) for name in missing]
                )
                for name, code, *_ in response.topic_errors:
                    if code not in (0, _TOPIC_ALREADY_EXISTS):
                        raise KafkaError(f"creating topic {name!r} failed with error code {code}")
            return missing
        except KafkaConnectionError:
            if loop.time() + delay > deadline:
                raise
            log.warning("broker_unreachable", bootstrap_servers=bootstrap_servers, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            await admin.close()


def producer(bootstrap_servers: str, **options: Any) -> AIOKafkaProducer:
    """A producer waiting for all in-sync replicas (summaries and dead letters must not vanish)."""
    settings: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_batch_size": 256 * 1024}
    settings.update(options)
    return AIOKafkaProducer(bootstrap_servers=bootstrap_servers, **settings)


class Partitions(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards rebalance callbacks to the service (commit and release before losing them)."""

    def __init__(
        self,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        on_assigned: Callable[[set[TopicPartition]], Awaitable[None]],
    ) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._on_assigned(set(assigned))


def consumer(bootstrap_servers: str, group_id: str, **options: Any) -> AIOKafkaConsumer:
    """A group consumer with manual commits, starting from the earliest offset of new groups."""
    settings: dict[str, Any] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
    }
    settings.update(options)
    return AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, **settings)
