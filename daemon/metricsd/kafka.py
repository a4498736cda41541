"""All Kafka access: the only module that imports aiokafka.

Clients are built here from the settings so that connection options, TLS and SASL included
(``connection_options``), are decided in one place for every client the daemon creates: the
consumer, the producer and the admin client that creates missing topics. The service and the
simulator use what this module returns.

Errors are translated here: a refused TLS handshake or SASL login becomes one ``KafkaAuthError``
(found by ``check_connection`` before any client starts, see there why), never a retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, NoReturn

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    BrokerResponseError,
    IllegalSaslStateError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from metricsd.config import Secret, Security

__all__ = [
    "MAX_REQUEST_SIZE",
    "PERMANENT_ERRORS",
    "ConsumerRecord",
    "KafkaAuthError",
    "KafkaConnectionError",
    "KafkaError",
    "OffsetAndMetadata",
    "Partitions",
    "TopicPartition",
    "check_connection",
    "connection_options",
    "consumer",
    "ensure_topics",
    "key_partition",
    "max_message_bytes",
    "producer",
    "record_size",
    "refused",
]

log = structlog.get_logger(__name__)

_TOPIC_ALREADY_EXISTS = 36

# Send failures that no retry can fix: the record is too large for the broker or the client, or
# the topic name is invalid. Everything else (timeouts, leader changes, a broker that is away)
# may succeed later.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
)


#: The producer's ``max_request_size`` (aiokafka's default, set explicitly): no record whose
#: ``record_size`` is larger can be sent, whatever the broker allows.
MAX_REQUEST_SIZE = 1_048_576
#: The producer's ``max_batch_size`` when every topic allows at least that much.
_MAX_BATCH_SIZE = 256 * 1024


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker refusing a record with an error it calls non-retriable (an
    error response, not a timeout or a lost connection): a schema or policy refusal, missing
    authorisation, Tansu's "unknown error" for a record its schema registry rejects. The
    ``PERMANENT_ERRORS`` are refusals too, but checked first."""
    return isinstance(exc, BrokerResponseError) and not exc.retriable


def record_size(key: bytes | None, value: bytes | None) -> int:
    """The size the producer checks against ``max_request_size`` for one record: an upper bound
    of a record batch holding just this record (what a broker checks against a topic's
    ``max.message.bytes``)."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
    return size


_PARTITIONER = DefaultPartitioner()


def key_partition(key: bytes, partitions: Collection[int]) -> int:
    """The partition the producer's ``send(topic, value, key=key)`` gives ``key`` (aiokafka's
    default partitioner, murmur2 like the Java client) when the topic has ``partitions`` (the set
    ``producer.partitions_for(topic)`` returns): the same list built from it the same way, so a
    record sent in a batch lands where ``send`` would have put it. ``producer`` never sets
    another partitioner."""
    partition: int = _PARTITIONER(key, list(partitions), [])
    return partition


class KafkaAuthError(Exception):
    """The broker refused our TLS handshake or SASL login: a configuration problem that retrying
    cannot fix, so it is raised at once (never retried) and logged once as ``kafka_auth_failed``.

    ``server`` is the broker's ``host:port``; ``kind`` is ``tls`` (handshake or certificate
    refused, either side), ``sasl`` (mechanism or credentials refused) or ``sasl_required`` (a
    non-SASL client at a listener that wants SASL). The message never contains the password.
    """

    def __init__(self, server: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.server = server
        self.kind = kind


def connection_options(security: Security) -> dict[str, Any]:
    """The aiokafka keyword arguments of ``security``, the same for every client and connection.

    SSL/SASL_SSL get an ``ssl_context`` from ``aiokafka.helpers.create_ssl_context`` (the CA, the
    client certificate and key; hostname checking as configured); SASL_* get the mechanism, the
    username and the revealed password.
    """
    options: dict[str, Any] = {"security_protocol": security.security_protocol}
    if security.uses_ssl:
        context = create_ssl_context(
            cafile=security.ssl_cafile,
            certfile=security.ssl_certfile,
            keyfile=security.ssl_keyfile,
        )
        context.check_hostname = security.ssl_check_hostname
        options["ssl_context"] = context
    if security.uses_sasl:
        assert security.sasl_password is not None  # Security validated it
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password.reveal()
    return options


async def check_connection(
    bootstrap_servers: str, security: Security, *, timeout: float = 10.0
) -> None:
    """Log in to the first reachable bootstrap server, then to every broker it advertises, with
    ``security``; close the connections again.

    Raises :class:`KafkaAuthError` (after one ``kafka_auth_failed`` log line) when a broker refuses
    the TLS handshake or the SASL login, and ``KafkaConnectionError`` when no bootstrap server can
    be reached (the caller may retry that). aiokafka's own clients cannot tell these apart: their
    ``start()`` turns a certificate or login failure into "Unable to bootstrap" (and retries it
    forever when it happens later), and a SCRAM error from the broker into a bare ``KeyError``.

    Each connection first does the TLS part alone (ApiVersions, which a SASL listener answers
    before the login), then, for SASL_*, a second connection the full login: a connection closed
    during the login is therefore the login's fault, not the network's.
    """
    options = connection_options(security)
    reached = None
    errors: list[str] = []
    for host, port, _ in collect_hosts(bootstrap_servers, randomize=False):
        try:
            reached = await _probe(host, port, security, options, timeout)
        except (TimeoutError, OSError, KafkaConnectionError) as exc:
            errors.append(f"{host}:{port}: {_describe(exc)}")
            continue
        break
    if reached is None:
        raise KafkaConnectionError(f"no bootstrap server reachable ({'; '.join(errors)})")
    for host, port in reached:
        # Advertised brokers may sit behind other names or certificates than the bootstrap one.
        with contextlib.suppress(TimeoutError, OSError, KafkaConnectionError):
            await _probe(host, port, security, options, timeout)  # unreachable: aiokafka's job


async def _probe(
    host: str, port: int, security: Security, options: dict[str, Any], timeout: float
) -> list[tuple[str, int]]:
    """Connect and log in to ``host:port``; the other brokers of its metadata."""
    server = f"{host}:{port}"
    timeout_ms = int(timeout * 1000)
    context: ssl.SSLContext | None = options.get("ssl_context")
    tls_only = {
        "security_protocol": "SSL" if security.uses_ssl else "PLAINTEXT",
        "ssl_context": context,
    }
    try:
        conn = await create_conn(host, port, request_timeout_ms=timeout_ms, **tls_only)
    except Exception as exc:
        _raise_if_refused(exc, server, security, login=False)
        if context is not None and isinstance(exc, KafkaConnectionError):
            alert = await _tls_alert(host, port, context, timeout)
            if alert is not None:
                _raise_if_refused(alert, server, security, login=False)
        raise
    if security.uses_sasl:
        conn.close()
        try:
            conn = await create_conn(host, port, request_timeout_ms=timeout_ms, **options)
        except Exception as exc:
            _raise_if_refused(exc, server, security, login=True)
            raise
    try:
        metadata = await conn.send(MetadataRequest([]))
    except KafkaConnectionError:
        if security.uses_sasl:
            raise
        # It answered ApiVersions, then hung up on Metadata: what a SASL listener does.
        _refused(
            server,
            "sasl_required",
            f"{server} answered ApiVersions but closed the connection on Metadata: it probably "
            f"requires SASL (security-protocol SASL_PLAINTEXT or SASL_SSL), not "
            f"{security.security_protocol}",
            security,
        )
    finally:
        conn.close()
    return [(b[1], b[2]) for b in metadata.brokers if (b[1], b[2]) != (host, port)]


async def _tls_alert(
    host: str, port: int, context: ssl.SSLContext, timeout: float
) -> ssl.SSLError | None:
    """The TLS alert with which ``host:port`` refuses our certificate (or its absence), if any.

    With TLS 1.3 the client finishes its handshake before the server has checked the client
    certificate; the server's refusal (an alert, then close) races with the first request, and
    when the request is still unread the close becomes a reset that loses the alert: aiokafka then
    reports only "connection closed". So, once a connection failed that way, handshake again and
    send nothing: the alert then arrives intact (a server that accepted us just stays silent).
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), timeout
        )
    except ssl.SSLError as exc:
        return exc
    except (TimeoutError, OSError):
        return None
    try:
        await asyncio.wait_for(reader.read(1), min(timeout, 2.0))
    except ssl.SSLError as exc:
        return exc
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
    return None


def _raise_if_refused(exc: BaseException, server: str, security: Security, *, login: bool) -> None:
    """Raise :class:`KafkaAuthError` if ``exc`` (from connecting to ``server``) is a refusal."""
    tls = _ssl_error(exc)
    if tls is not None:
        detail = _SSL_SOURCE.sub("", str(tls))
        _refused(server, "tls", f"TLS handshake with {server} failed: {detail}", security)
    if not login:
        return
    what = f"SASL {security.sasl_mechanism} login as {security.sasl_username!r} at {server} failed"
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        _refused(server, "sasl", f"{what}: {exc}", security)
    if isinstance(exc, UnsupportedSaslMechanismError | IllegalSaslStateError):
        reason = f"the broker does not accept mechanism {security.sasl_mechanism}"
        _refused(server, "sasl", f"{what}: {reason}", security)
    if isinstance(exc, KafkaConnectionError):
        # The TLS-only connection a moment ago worked: the login made the broker hang up.
        reason = "the broker closed the connection during the login (mechanism not enabled?)"
        _refused(server, "sasl", f"{what}: {reason}", security)
    if isinstance(exc, KeyError | ValueError) and str(security.sasl_mechanism).startswith("SCRAM"):
        # aiokafka's SCRAM client: KeyError('v') when the server's final message is an error
        # ("e=unknown-user", "e=invalid-proof"), ValueError for a wrong server signature.
        reason = "the broker ended the SCRAM exchange with an error (unknown user, wrong password)"
        _refused(server, "sasl", f"{what}: {reason}", security)


def _refused(server: str, kind: str, message: str, security: Security) -> NoReturn:
    """Log the one ``kafka_auth_failed`` line, raise :class:`KafkaAuthError`; password masked."""
    if security.sasl_password:
        message = message.replace(security.sasl_password.reveal(), Secret.MASK)
    log.error(
        "kafka_auth_failed",
        server=server,
        kind=kind,
        security_protocol=security.security_protocol,
        sasl_mechanism=security.sasl_mechanism,
        sasl_username=security.sasl_username,
        error=message,
    )
    raise KafkaAuthError(server, kind, message) from None


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` that ``exc`` is or was caused by (aiokafka wraps a TLS alert received
    after the handshake, e.g. "certificate required", in ``KafkaConnectionError``)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    *,
    security: Security,
    configs: dict[str, dict[str, str]] | None = None,
    timeout: float | None = 60.0,
) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions); return the ones created.

    ``configs`` gives topic configs by name (e.g. ``cleanup.policy=compact`` for a changelog).

    Retries with exponential backoff (capped at 5 s) while the broker is unreachable, up to
    ``timeout`` seconds (None: until cancelled); then raises ``KafkaConnectionError``. A refused
    TLS handshake or SASL login is not retried: ``KafkaAuthError`` at once (``check_connection``).
    """
    loop = asyncio.get_running_loop()
    deadline = math.inf if timeout is None else loop.time() + timeout
    delay = 0.2
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap_servers, **connection_options(security)
        )
        try:
            await check_connection(bootstrap_servers, security)
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [name for name in topics if name not in existing]
            if missing:
                response = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            topics[name],
                            replication_factor=1,
                            topic_configs=(configs or {}).get(name, {}),
                        )
                        for name in missing
                    ]
                )
                for name, code, *_ in response.topic_errors:
                    if code not in (0, _TOPIC_ALREADY_EXISTS):
                        raise KafkaError(f"creating topic {name!r} failed with error code {code}")
            return missing
        except KafkaConnectionError as exc:
            if loop.time() + delay > deadline:
                raise
            log.warning(
                "broker_unreachable",
                bootstrap_servers=bootstrap_servers,
                retry_in=delay,
                error=str(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            await admin.close()


async def max_message_bytes(
    bootstrap_servers: str, topics: Iterable[str], *, security: Security, timeout: float = 10.0
) -> dict[str, int]:
    """``max.message.bytes`` of each of ``topics`` that the broker reports (DescribeConfigs).

    A topic missing from the result has no value reported: Tansu (0.6) answers only with configs
    set explicitly on the topic, never the broker's default, and a real Kafka leaves out a topic
    that does not exist. All configs are asked for, not just this one, because Tansu closes the
    connection on a DescribeConfigs request that names the configs it wants. Raises
    ``KafkaError``, ``OSError`` or ``TimeoutError`` when the broker cannot answer in ``timeout``.
    """
    names = list(dict.fromkeys(topics))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        request_timeout_ms=int(timeout * 1000),
        **connection_options(security),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        responses = await asyncio.wait_for(
            admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names]),
            timeout,
        )
    finally:
        await admin.close()
    found: dict[str, int] = {}
    for response in responses:
        for error_code, _, _, name, entries in response.resources:
            if error_code != 0:
                continue
            for entry in entries:
                if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                    found[name] = int(entry[1])
    return found


def producer(
    bootstrap_servers: str,
    *,
    security: Security,
    message_limit: int = MAX_REQUEST_SIZE,
    **options: Any,
) -> AIOKafkaProducer:
    """A producer waiting for all in-sync replicas (summaries and dead letters must not vanish).

    ``message_limit`` is the smallest ``max.message.bytes`` of the topics it writes to: batches
    stay within it, or a batch of small records could be refused as a whole."""
    settings: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": max(1, min(_MAX_BATCH_SIZE, message_limit)),
        "max_request_size": MAX_REQUEST_SIZE,
    }
    settings.update(connection_options(security))
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


def consumer(
    bootstrap_servers: str, group_id: str, *, security: Security, **options: Any
) -> AIOKafkaConsumer:
    """A group consumer with manual commits, starting from the earliest offset of new groups."""
    settings: dict[str, Any] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
    }
    settings.update(connection_options(security))
    settings.update(options)
    return AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, **settings)


async def read_partitions(
    bootstrap_servers: str,
    topic: str,
    partitions: Iterable[int],
    feed: Callable[[int, bytes | None, bytes | None], None],
    done: Callable[[], bool],
    *,
    security: Security,
    timeout: float,
    **options: Any,
) -> None:
    """Read ``partitions`` of ``topic`` from the beginning, without a group, handing each record
    to ``feed(partition, key, value)`` in offset order until ``done()`` or ``timeout`` (then
    ``TimeoutError``). End-of-partition is for the caller to recognise (e.g. a fence record):
    Tansu under-reports high watermarks, so they are not used here.
    """
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        **connection_options(security),
        **options,
    )
    await client.start()
    try:
        client.assign([TopicPartition(topic, p) for p in partitions])
        await client.seek_to_beginning()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic!r} did not reach its end in {timeout} s")
            batch = await client.getmany(timeout_ms=200, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    feed(tp.partition, record.key, record.value)
    finally:
        await client.stop()
