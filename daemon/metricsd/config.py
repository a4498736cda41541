"""Configuration: frozen objects validated once, at start-up.

Bad values fail here with a message naming the setting, never in the middle of the loop. The CLI
(``metricsd.cli``) maps flags and ``METRICSD_*`` environment variables onto these objects; nothing
else reads the environment.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "ConfigError",
    "MonitorSettings",
    "Secret",
    "Security",
    "Settings",
    "SimulateSettings",
]


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """What the pure core needs: window shapes and metric options."""

    window: int = 1000
    time_windows: tuple[float, ...] = (60.0, 300.0)
    threshold: float = 0.1
    max_array: int = 10_000
    max_classes: int = 1000
    max_runs: int = 10_000  # runs tracked at once; a new run beyond it evicts the least recent
    idle_timeout: float = 3600.0  # seconds without events before a run is evicted; 0 = never

    def __post_init__(self) -> None:
        _check(1 <= self.window <= 1_000_000, f"window must be in 1..1000000, got {self.window}")
        _check(
            all(t > 0 for t in self.time_windows),
            f"time windows must be > 0 seconds, got {self.time_windows}",
        )
        _check(
            len(set(self.time_windows)) == len(self.time_windows),
            f"time windows must be distinct, got {self.time_windows}",
        )
        _check(self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}")
        _check(self.max_array >= 1, f"max-array must be >= 1, got {self.max_array}")
        _check(
            2 <= self.max_classes <= 100_000,
            f"max-classes must be in 2..100000, got {self.max_classes}",
        )
        _check(
            1 <= self.max_runs <= 10_000_000,
            f"max-runs must be in 1..10000000, got {self.max_runs}",
        )
        _check(
            0 <= self.idle_timeout < float("inf"),
            f"idle-timeout must be >= 0 seconds (0 = never), got {self.idle_timeout}",
        )


class Secret:
    """A string that never shows itself: ``repr``/``str`` (and so logs, tracebacks, ``repr`` of the
    settings) are ``**********``; only :meth:`reveal` returns it, for the one call that needs it."""

    __slots__ = ("_value",)
    MASK = "**********"

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return self.MASK

    __str__ = __repr__

    def __structlog__(self) -> str:  # structlog's JSON fallback asks this before repr()
        return self.MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _loadable(flag: str, path: str, load: Callable[[], object]) -> None:
    """``path`` is a readable file that ``load`` accepts; messages name ``flag`` and ``path``."""
    _check(os.path.isfile(path), f"{flag} {path!r} does not exist or is not a file")
    _check(os.access(path, os.R_OK), f"{flag} {path!r} is not readable")
    try:
        load()
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or "unreadable"
        raise ConfigError(f"{flag} {path!r} could not be loaded: {reason}") from None


@dataclass(frozen=True, slots=True)
class Security:
    """How every Kafka client of the daemon connects: TLS and SASL, the same for all of them.

    ``security_protocol``: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
    ``ssl_*`` apply to SSL/SASL_SSL only: ``ssl_cafile`` (PEM CA bundle; the system CAs when
    absent), ``ssl_certfile`` + ``ssl_keyfile`` (a client certificate for mutual TLS; the key may
    also sit in the certfile; encrypted keys are not supported), ``ssl_check_hostname``.
    ``sasl_*`` apply to SASL_* only, and are then required: ``sasl_mechanism`` (``PLAIN``,
    ``SCRAM-SHA-256``, ``SCRAM-SHA-512``), ``sasl_username``, ``sasl_password`` (a :class:`Secret`;
    a ``str`` is wrapped). Files are checked here (they exist, are readable, and load as PEM), so a
    bad path fails at start-up; no message ever contains the password.
    """

    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sasl_password, str):
            object.__setattr__(self, "sasl_password", Secret(self.sasl_password))
        if self.sasl_username == "":
            object.__setattr__(self, "sasl_username", None)
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        _check(
            self.security_protocol in SECURITY_PROTOCOLS,
            f"security-protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
            f"got {self.security_protocol!r}",
        )
        if self.uses_ssl:
            self._check_files()
        else:
            given = [
                name.replace("_", "-")
                for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
                if getattr(self, name) is not None
            ] + ([] if self.ssl_check_hostname else ["ssl-check-hostname"])
            _check(
                not given,
                f"{', '.join(given)} set with security-protocol {self.security_protocol}: "
                "TLS settings need SSL or SASL_SSL",
            )
        if self.uses_sasl:
            _check(
                self.sasl_mechanism in SASL_MECHANISMS,
                f"sasl-mechanism must be one of {', '.join(SASL_MECHANISMS)} with "
                f"security-protocol {self.security_protocol}, got {self.sasl_mechanism!r}",
            )
            _check(
                bool(self.sasl_username),
                f"sasl-username is required with security-protocol {self.security_protocol}",
            )
            _check(
                bool(self.sasl_password),
                f"a SASL password is required with security-protocol {self.security_protocol} "
                "(METRICSD_SASL_PASSWORD or --sasl-password-file)",
            )
        else:
            given = [
                flag
                for flag, value in (
                    ("sasl-mechanism", self.sasl_mechanism),
                    ("sasl-username", self.sasl_username),
                    ("sasl-password", self.sasl_password),
                )
                if value
            ]
            _check(
                not given,
                f"{', '.join(given)} set with security-protocol {self.security_protocol}: "
                "SASL settings need SASL_PLAINTEXT or SASL_SSL",
            )

    def _check_files(self) -> None:
        cafile, certfile, keyfile = self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile
        if cafile is not None:
            _loadable("ssl-cafile", cafile, lambda: ssl.create_default_context(cafile=cafile))
        _check(keyfile is None or certfile is not None, "ssl-keyfile needs ssl-certfile as well")
        if certfile is None:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if keyfile is None:
            _check(os.path.isfile(certfile), f"ssl-certfile {certfile!r} does not exist")
            try:
                # An empty password: an encrypted key fails here instead of prompting on the tty.
                context.load_cert_chain(certfile, password="")
            except (ssl.SSLError, OSError):
                raise ConfigError(
                    f"ssl-certfile {certfile!r} holds no (unencrypted) private key: "
                    "give ssl-keyfile as well"
                ) from None
            return
        _loadable("ssl-certfile", certfile, lambda: None)
        _loadable("ssl-keyfile", keyfile, lambda: None)
        try:
            context.load_cert_chain(certfile, keyfile, password="")
        except ssl.SSLError as exc:
            raise ConfigError(
                f"ssl-certfile {certfile!r} with ssl-keyfile {keyfile!r} could not be loaded "
                f"(an encrypted key, or not the certificate's key?): {exc.reason or exc}"
            ) from None

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``metricsd run`` needs."""

    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "training.events"
    output_topic: str = "training.summaries"
    dead_letter_topic: str = ""  # "" means "<input_topic>.dlq"
    group_id: str = "metricsd"
    interval: float = 5.0
    profile_interval: float = 60.0
    stats_interval: float = 30.0
    partitions: int = 8
    max_records: int = 50_000
    shutdown_timeout: float = 15.0
    changelog: bool = True  # window state backed by a compacted changelog topic
    state_topic: str = ""  # "" means "<group_id>.state"
    restore_timeout: float = 120.0
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    security: Security = field(default_factory=Security)  # TLS/SASL of every Kafka client
    instance: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.bootstrap_servers.strip()), "bootstrap-servers must not be empty")
        for name in ("input_topic", "output_topic", "group_id"):
            _check(bool(getattr(self, name)), f"{name.replace('_', '-')} must not be empty")
        if not self.dead_letter_topic:
            object.__setattr__(self, "dead_letter_topic", f"{self.input_topic}.dlq")
        if not self.state_topic:
            object.__setattr__(self, "state_topic", f"{self.group_id}.state")
        topics = {self.input_topic, self.output_topic, self.dead_letter_topic, self.state_topic}
        _check(len(topics) == 4, "input, output, dead-letter and state topics must all differ")
        _check(self.restore_timeout > 0, f"restore-timeout must be > 0, got {self.restore_timeout}")
        _check(self.interval > 0, f"interval must be > 0, got {self.interval}")
        _check(
            self.profile_interval > 0, f"profile-interval must be > 0, got {self.profile_interval}"
        )
        _check(self.stats_interval > 0, f"stats-interval must be > 0, got {self.stats_interval}")
        _check(self.partitions >= 1, f"partitions must be >= 1, got {self.partitions}")
        _check(
            self.shutdown_timeout > 0, f"shutdown-timeout must be > 0, got {self.shutdown_timeout}"
        )
        _check(self.max_records >= 1, f"max-records must be >= 1, got {self.max_records}")

    def topics(self) -> dict[str, int]:
        """The topics the daemon creates when missing (name -> partitions); the changelog is
        created apart, with the input topic's partition count and compaction."""
        return {
            self.input_topic: self.partitions,
            self.output_topic: self.partitions,
            self.dead_letter_topic: self.partitions,
        }


@dataclass(frozen=True, slots=True)
class SimulateSettings:
    """What ``metricsd simulate`` needs: a synthetic training job."""

    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "training.events"
    runs: int = 4
    rate: float = 200.0  # events per second, all runs together
    duration: float = 0.0  # 0 = until stopped
    seed: int = 0
    partitions: int = 8
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        _check(bool(self.bootstrap_servers.strip()), "bootstrap-servers must not be empty")
        _check(self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        _check(self.rate > 0, f"rate must be > 0, got {self.rate}")
        _check(self.duration >= 0, f"duration must be >= 0, got {self.duration}")
        _check(self.partitions >= 1, f"partitions must be >= 1, got {self.partitions}")
