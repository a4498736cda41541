"""Configuration: frozen objects validated once, at start-up.

Bad values fail here with a message naming the setting, never in the middle of the loop. The CLI
(``daemon.cli``) maps flags and ``METRICSD_*`` environment variables onto these objects; nothing
else reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConfigError", "MonitorSettings", "Settings", "SimulateSettings"]


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
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    instance: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.bootstrap_servers.strip()), "bootstrap-servers must not be empty")
        for name in ("input_topic", "output_topic", "group_id"):
            _check(bool(getattr(self, name)), f"{name.replace('_', '-')} must not be empty")
        if not self.dead_letter_topic:
            object.__setattr__(self, "dead_letter_topic", f"{self.input_topic}.dlq")
        topics = {self.input_topic, self.output_topic, self.dead_letter_topic}
        _check(len(topics) == 3, "input, output and dead-letter topics must all differ")
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

    def __post_init__(self) -> None:
        _check(bool(self.bootstrap_servers.strip()), "bootstrap-servers must not be empty")
        _check(self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        _check(self.rate > 0, f"rate must be > 0, got {self.rate}")
        _check(self.duration >= 0, f"duration must be >= 0, got {self.duration}")
        _check(self.partitions >= 1, f"partitions must be >= 1, got {self.partitions}")
