"""Configuration: frozen objects validated once, at start-up; the one definition of each setting.

Every setting is a field of a frozen settings class, defined once with :func:`setting`: its default,
its help text and how text becomes its value. The command line (``metricsd.cli``) generates its
flags from these fields: ``--<field-name>`` (dashes for underscores, unless the field names its
flag), each also given by the environment variable ``METRICSD_<FLAG>``; a flag beats the variable,
the variable beats the default. Nothing else reads the environment.

Bad values fail here with a message naming the setting, never in the middle of the loop.
"""

from __future__ import annotations

import hmac
import math
import os
import ssl
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import Field, InitVar, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "FileSettings",
    "Flag",
    "LogSettings",
    "MonitorSettings",
    "Option",
    "Secret",
    "Security",
    "Settings",
    "SimulateSettings",
    "env_name",
    "file_sections",
    "flags",
    "nested",
    "parse_bool",
    "parse_seconds",
    "read_config_file",
    "setting",
    "toml_value",
]

ENV_PREFIX = "METRICSD_"


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_DAY = 86_400.0


def _seconds(name: str, value: float, low: float, high: float) -> None:
    """A duration in [low, high] seconds: NaN, infinity, 1e-320 or a year are refused (an interval
    of inf would never tick or commit; one of 1e-320 overflows the scheduler)."""
    _check(
        math.isfinite(value) and low <= value <= high,
        f"{name} must be between {low:g} and {high:g} seconds, got {value}",
    )


# -- how a setting is given as text ---------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"not a boolean: {text!r}")


def parse_seconds(text: str) -> tuple[float, ...]:
    """Comma-separated seconds (empty parts ignored): ``"60,300"`` -> ``(60.0, 300.0)``."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"not a number of seconds: {text!r}") from None


def _time_windows(given: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The windows of every ``--time-window`` together; ``0`` alone means none."""
    flat = tuple(t for group in given for t in group)
    return () if flat == (0.0,) else flat


_AS_RUN: Any = object()  # Option.dev when dev has the default of run/simulate
_PARSERS: dict[type, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float, str: str}


@dataclass(frozen=True, slots=True)
class Option:
    """How one setting is given on the command line and in the environment (a field's metadata).

    ``parse`` turns the text of a flag or variable into the value, raising ``ValueError`` when it
    cannot (a :class:`ConfigError`'s message is shown as it is); ``flag`` overrides the flag
    derived from the field name; ``choices`` are the allowed parsed values; ``combine`` makes the
    flag repeatable, turning the list of parsed values into the setting (the environment variable
    gives one such value); ``dev`` is the default of ``metricsd dev`` when it differs."""

    help: str
    parse: Callable[[str], Any]
    flag: str = ""
    choices: tuple[str, ...] | None = None
    combine: Callable[[list[Any]], Any] | None = None
    dev: Any = _AS_RUN


def setting(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    flag: str = "",
    choices: tuple[str, ...] | None = None,
    combine: Callable[[list[Any]], Any] | None = None,
    dev: Any = _AS_RUN,
) -> Any:
    """A settings field with its default and its :class:`Option`; ``parse`` defaults to the type
    of the default (bool, int, float or str) and must be given for a ``None`` default."""
    if parse is None:
        if type(default) not in _PARSERS:
            raise TypeError(f"setting({default!r}, ...) needs parse=: no parser for its type")
        parse = _PARSERS[type(default)]
    option = Option(help, parse, flag=flag, choices=choices, combine=combine, dev=dev)
    return field(default=default, metadata={"option": option})


def env_name(flag: str) -> str:
    """``--bootstrap-servers`` -> ``METRICSD_BOOTSTRAP_SERVERS``."""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


@dataclass(frozen=True, slots=True)
class Flag:
    """One setting as the command line sees it: a field of ``owner`` with its option."""

    owner: type
    name: str
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def dest(self) -> str:
        """The attribute of the parsed command line."""
        return self.flag.removeprefix("--").replace("-", "_")

    def default_for(self, command: str) -> Any:
        """The default under subcommand ``command`` (``dev`` has a few of its own)."""
        dev = self.option.dev
        return dev if command == "dev" and dev is not _AS_RUN else self.default

    def show(self, value: Any) -> str:
        """``value`` as the text that parses back to it (``""`` for none)."""
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" for v in value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


def _fields(cls: type) -> Iterator[Field[Any]]:
    """The fields of settings class ``cls`` in order, init-only ones (``InitVar``) included."""
    yield from getattr(cls, "__dataclass_fields__", {}).values()


def nested(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are settings classes themselves (``monitor``, ``security``)."""
    found: dict[str, type] = {}
    for f in _fields(cls):
        factory = f.default_factory
        if isinstance(factory, type) and is_dataclass(factory):
            found[f.name] = factory
    return found


def flags(cls: type, *, recurse: bool = True) -> list[Flag]:
    """Every setting of ``cls`` that has an option, those of nested settings classes in place
    (unless ``recurse`` is false). Fields without one (``Settings.instance``) are not settings of
    the command line."""
    found: list[Flag] = []
    inner = nested(cls)
    for f in _fields(cls):
        if f.name in inner:
            found += flags(inner[f.name]) if recurse else []
        elif "option" in f.metadata:
            found.append(Flag(cls, f.name, f.default, f.metadata["option"]))
    return found


# -- the settings ---------------------------------------------------------------------------------

# Settings shared by the daemon and the simulator, one definition each.


def _bootstrap_servers() -> Any:
    return setting("localhost:9092", "Kafka bootstrap servers, host:port[,host:port]")


def _input_topic() -> Any:
    return setting("training.events", "topic of training events")


def _partitions() -> Any:
    return setting(8, "partitions of topics created by metricsd", dev=4)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How every subcommand logs (``metricsd.logs.configure`` checks the level)."""

    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", dev="WARNING")
    log_format: str = setting(
        "auto",
        "auto: console on a TTY, JSON lines otherwise",
        choices=("auto", "json", "console"),
    )


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """What the pure core needs: window shapes and metric options."""

    window: int = setting(1000, "count window: the newest N values per stream")
    time_windows: tuple[float, ...] = setting(
        (60.0, 300.0),
        "time window over event time in seconds; repeatable; 0 disables time windows",
        parse=parse_seconds,
        flag="--time-window",
        combine=_time_windows,
    )
    threshold: float = setting(
        0.1, "regression: |y_true - y_pred| <= threshold counts as within threshold"
    )
    max_array: int = setting(10_000, "longest array accepted in one event (longer: dead-lettered)")
    max_classes: int = setting(1000, "multiclass labels must be below this (else dead-lettered)")
    max_ranks: int = setting(
        256,
        "ranks per run with their own step-time window (the ranks summary); values of further "
        "ranks are counted as dropped there (they still count in batch_time)",
    )
    max_runs: int = setting(
        10_000,
        "runs tracked at once; a new run beyond this evicts the least recently active one "
        "(after its final summaries)",
    )
    idle_timeout: float = setting(
        3600.0,
        "seconds without events after which a run is evicted (after its final summaries); "
        "0 = never",
    )

    def __post_init__(self) -> None:
        _check(1 <= self.window <= 1_000_000, f"window must be in 1..1000000, got {self.window}")
        for t in self.time_windows:
            _seconds("time windows", t, 0.001, 30 * _DAY)
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
            1 <= self.max_ranks <= 100_000,
            f"max-ranks must be in 1..100000, got {self.max_ranks}",
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


def _read_password(path: str) -> Secret:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"sasl-password-file {path!r} cannot be read: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sasl-password-file {path!r} is not UTF-8 text") from None
    return Secret(text.removesuffix("\n").removesuffix("\r"))


@dataclass(frozen=True, slots=True)
class Security:
    """How every Kafka client of the daemon connects: TLS and SASL, the same for all of them.

    ``security_protocol``: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
    ``ssl_*`` apply to SSL/SASL_SSL only: ``ssl_cafile`` (PEM CA bundle; the system CAs when
    absent), ``ssl_certfile`` + ``ssl_keyfile`` (a client certificate for mutual TLS; the key may
    also sit in the certfile; encrypted keys are not supported), ``ssl_check_hostname``.
    ``sasl_*`` apply to SASL_* only, and are then required: ``sasl_mechanism`` (``PLAIN``,
    ``SCRAM-SHA-256``, ``SCRAM-SHA-512``), ``sasl_username``, ``sasl_password`` (a :class:`Secret`;
    a ``str`` is wrapped) or ``sasl_password_file`` (read here, into ``sasl_password``). Files are
    checked here (they exist, are readable, and load as PEM), so a bad path fails at start-up; no
    message ever contains the password.
    """

    security_protocol: str = setting(
        "PLAINTEXT", "how to talk to the brokers", parse=str.upper, choices=SECURITY_PROTOCOLS
    )
    ssl_cafile: str | None = setting(
        None,
        "PEM file of the CA(s) that signed the brokers' certificates (default: system CAs)",
        parse=str,
    )
    ssl_certfile: str | None = setting(None, "PEM client certificate (mutual TLS)", parse=str)
    ssl_keyfile: str | None = setting(None, "unencrypted PEM key of the certfile", parse=str)
    ssl_check_hostname: bool = setting(
        True, "check that the broker's certificate names the host connected to (true/false)"
    )
    sasl_mechanism: str | None = setting(
        None, "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with SASL_*)", parse=str.upper
    )
    sasl_username: str | None = setting(None, "SASL username", parse=str)
    sasl_password: Secret | None = setting(  # noqa: RUF009 (setting() is dataclasses.field())
        None,
        "SASL password; prefer the environment variable or --sasl-password-file, since other "
        "local users can read a command line",
        parse=Secret,
    )
    # Read into sasl_password at construction (not kept: a copy of the object has the password).
    sasl_password_file: InitVar[str | None] = setting(  # noqa: RUF009 (as above)
        None, "file holding the SASL password (a trailing newline is ignored)", parse=str
    )

    def __post_init__(self, sasl_password_file: str | None) -> None:
        if isinstance(self.sasl_password, str):
            object.__setattr__(self, "sasl_password", Secret(self.sasl_password))
        if sasl_password_file:
            _check(
                self.sasl_password is None,
                "give the SASL password once: --sasl-password (METRICSD_SASL_PASSWORD) or "
                "--sasl-password-file, not both",
            )
            object.__setattr__(self, "sasl_password", _read_password(sasl_password_file))
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

    bootstrap_servers: str = _bootstrap_servers()
    input_topic: str = _input_topic()
    output_topic: str = setting("training.summaries", "topic of summary and profile records")
    dead_letter_topic: str = setting(
        "", "topic of rejected input (default: <input-topic>.dlq)"
    )  # "" means "<input_topic>.dlq"
    group_id: str = setting("metricsd", "consumer group")
    interval: float = setting(5.0, "seconds between ticks", dev=2.0)
    profile_interval: float = setting(60.0, "seconds between profile records and log lines")
    stats_interval: float = setting(30.0, "seconds between stats log lines")
    partitions: int = _partitions()
    max_records: int = 50_000  # records fetched at once; no flag
    shutdown_timeout: float = setting(
        15.0, "seconds each shutdown step (final flush, client stops) may take before giving up"
    )
    changelog: bool = setting(
        True,
        "keep window state in a compacted changelog topic so that restarts and rebalances "
        "resume the windows (true/false)",
    )
    state_topic: str = setting(
        "", "changelog topic of window state (default: <group-id>.state)"
    )  # "" means "<group_id>.state"
    restore_timeout: float = setting(
        120.0, "seconds restoring state on a partition assignment may take"
    )
    # Prometheus exposition and probes (metricsd.probes): one HTTP port on the event loop.
    http_port: int = setting(9464, "port of /metrics, /livez and /readyz (0: no HTTP server)")
    http_host: str = setting("0.0.0.0", "address the HTTP server binds to")
    per_run_metrics: bool = setting(
        True, "per-run gauges (label run_id, at most max-runs runs) on /metrics (true/false)"
    )
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    security: Security = field(default_factory=Security)  # TLS/SASL of every Kafka client
    instance: str = ""  # "" means "<host>-<pid>"; no flag

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
        _seconds("restore-timeout", self.restore_timeout, 0.1, _DAY)
        _seconds("interval", self.interval, 0.01, _DAY)
        _seconds("profile-interval", self.profile_interval, 0.01, 7 * _DAY)
        _seconds("stats-interval", self.stats_interval, 0.01, 7 * _DAY)
        _check(self.partitions >= 1, f"partitions must be >= 1, got {self.partitions}")
        _seconds("shutdown-timeout", self.shutdown_timeout, 0.1, 3600.0)
        _check(self.max_records >= 1, f"max-records must be >= 1, got {self.max_records}")
        _check(0 <= self.http_port <= 65535, f"http-port must be 0 to 65535, got {self.http_port}")
        _check(bool(self.http_host.strip()), "http-host must not be empty")

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

    bootstrap_servers: str = _bootstrap_servers()
    input_topic: str = _input_topic()
    runs: int = setting(4, "concurrent simulated training runs", dev=3)
    rate: float = setting(
        200.0,
        "training steps per second, all runs together (each step emits a batch_time event, "
        "every 10th a prediction batch, and now and then cv/attention/features)",
        dev=100.0,
    )
    duration: float = setting(0.0, "seconds to run; 0 = until stopped")
    seed: int = setting(0, "random seed")
    train: bool = setting(
        False,
        "instead of synthetic events, train small torch models on random data through "
        "metricsd.Emitter (a real training loop: step times, loss and learning-rate scalars, "
        "validation predictions); needs torch: pip install 'metricsd[lightning]'",
    )
    partitions: int = _partitions()
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        _check(bool(self.bootstrap_servers.strip()), "bootstrap-servers must not be empty")
        _check(self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        _check(self.rate > 0, f"rate must be > 0, got {self.rate}")
        _check(self.duration >= 0, f"duration must be >= 0, got {self.duration}")
        _check(self.partitions >= 1, f"partitions must be >= 1, got {self.partitions}")


# -- the configuration file -----------------------------------------------------------------------

#: A configuration file's settings: flag destination -> (key as written in the file, value).
FileSettings = dict[str, tuple[str, Any]]


def file_sections() -> dict[str, dict[str, Flag]]:
    """Where each setting sits in a configuration file: table name ("" for the top level) ->
    field name -> setting. The daemon's own settings are at the top level, those of a nested
    settings class in a table named like its field (``[monitor]``, ``[security]``), logging in
    ``[log]``, and the simulator's own ones (runs, rate...) in ``[simulate]``; what the simulator
    shares with the daemon (bootstrap-servers, input-topic, partitions, security) is given once,
    where the daemon has it."""
    sections: dict[str, dict[str, Flag]] = {}
    placed: set[str] = set()
    for owner, top in ((Settings, ""), (LogSettings, "log"), (SimulateSettings, "simulate")):
        for name, cls in [(top, owner), *nested(owner).items()]:
            for f in flags(cls, recurse=False):
                if f.dest not in placed:
                    placed.add(f.dest)
                    sections.setdefault(name, {})[f.name] = f
    return sections


def _kind(setting: Flag) -> str:
    """The TOML type a setting's value must have in the file."""
    default = setting.default
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, tuple):
        return "array of numbers"
    return "string"  # str defaults, and the None ones (paths, SASL names, the password)


def _typed(setting: Flag, key: str, value: Any) -> Any:
    """``value`` from the file as the setting's value: the TOML type must match (no "1000" for an
    integer, no 1 for a boolean), then the flag's own parser and choices apply."""
    kind = _kind(setting)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = is_number
    elif kind == "array of numbers":
        ok = is_number or (
            isinstance(value, list)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} must be a TOML {kind}, got {_toml_type(value)} {value!r}")
    option = setting.option
    if kind == "array of numbers":
        parsed: Any = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
        return option.combine([parsed]) if option.combine else parsed
    if kind == "number":
        return float(value)
    try:
        parsed = option.parse(value) if kind == "string" else value
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: invalid value {value!r}") from None
    if option.choices is not None and parsed not in option.choices:
        raise ConfigError(f"{key} must be one of {', '.join(option.choices)}, got {value!r}")
    return parsed


def _toml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def read_config_file(path: str) -> FileSettings:
    """The settings a TOML configuration file gives (see :func:`file_sections` for its layout;
    keys are the settings' names, with underscores). An unreadable file, a syntax error, an
    unknown table or key, or a value of the wrong type raises :class:`ConfigError` naming the
    file and the key; every value has passed the parser its flag uses (the settings' range
    checks come later, when the settings are built, as for flags)."""
    try:
        with open(path, "rb") as handle:
            doc = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(
            f"config file {path!r} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    sections = file_sections()
    found: FileSettings = {}

    def take(table: str, items: dict[str, Any]) -> None:
        known = sections.get(table, {})
        for name, value in items.items():
            key = f"{table}.{name}" if table else name
            if table == "" and isinstance(value, dict) and name in sections:
                take(name, value)
                continue
            if name not in known:
                hint = _near(name, table, sections)
                raise ConfigError(f"config file {path!r}: unknown key {key!r}{hint}")
            try:
                found[known[name].dest] = (key, _typed(known[name], key, value))
            except ConfigError as exc:
                raise ConfigError(f"config file {path!r}: {exc}") from None

    take("", doc)
    return found


def _near(name: str, table: str, sections: dict[str, dict[str, Flag]]) -> str:
    """A hint for an unknown key: the table where that name is a setting, or the spelling with
    underscores when it was written with dashes."""
    spelled = name.replace("-", "_")
    for other, known in sections.items():
        if spelled in known and (other != table or spelled != name):
            where = f"[{other}] " if other else "the top level as "
            return f" (did you mean {where}{spelled!r}?)"
    return ""


def toml_value(value: Any) -> str:
    """``value`` written as TOML (strings, booleans, numbers, arrays of numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in text)
    return f'"{escaped}"'
