"""What ``/metrics`` shows: the daemon's health and the per-run gauges, as Prometheus series.

Plan
----
Operations
    * :class:`Health`: a snapshot of plain values (counters, lag, restore progress, readiness)
      that the service takes at scrape time; :func:`not_ready` decides readiness from it.
    * :class:`RunSeries`: fed with every summary record published (``update``) and with the runs
      whose partitions were revoked (``forget``); ``text()`` is the per-run part of the page.
    * :class:`Exposition`: a private ``CollectorRegistry`` (never the global one) holding the tick
      duration histogram and a collector that turns a :class:`Health` into metric families;
      ``render()`` is the whole page, in the Prometheus text format 0.0.4.
Goals
    * A scrape never blocks the tick for long: the health part is ~20 series rendered by
      ``prometheus_client.generate_latest``; the per-run part (up to ``max_runs`` runs, ~10 series
      each) is kept as one text fragment per run and family, rebuilt only for the runs a tick
      changed, and joined at most once per change (cached bytes between scrapes).
    * Bounded cardinality: a run's series exist only while the monitor tracks it (at most
      ``max_runs``): they go with its final summaries (``run_end``, idle or capacity eviction) and
      when its partition is revoked; a stream closed on its own (a split or scalar name beyond the
      monitor's per-run limit) takes its series with it.
Cost
    ``update`` is O(records of the tick); ``text()`` after a change O(runs) string joins (a few ms
    for 10,000 runs); a scrape without a change is a bytes copy.
Sample lines of the per-run part are formatted as ``prometheus_client.generate_latest`` formats
them (its value formatting, its label escaping), which the tests check line for line.
Pure: no I/O, no clock (times are passed in).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from metricsd import __version__
from metricsd.events import Attention, BatchTime, CvFold, Features, Prediction, RunEnd, Scalar
from metricsd.summaries import steps_per_second

__all__ = ["EVENT_TYPES", "Exposition", "Health", "RunSeries", "not_ready"]

Record = dict[str, Any]

# prometheus_client's formatting of a sample value (NaN, +Inf, 1e+06 ...), untyped there.
_value: Callable[[float], str] = floatToGoString

# Event class -> its wire ``type`` (the label of metricsd_events_consumed_total).
EVENT_TYPES: dict[type, str] = {
    BatchTime: "batch_time",
    Prediction: "prediction",
    Scalar: "scalar",
    CvFold: "cv_fold",
    Attention: "attention",
    Features: "features",
    RunEnd: "run_end",
}

# Tick durations from 1 ms to 30 s (a tick publishes and waits for the broker's acks).
TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class Health:
    """The daemon's state at one scrape, in plain values (taken by the service)."""

    events_by_type: Mapping[type, int] = field(default_factory=dict)
    dead_letters_by_reason: Mapping[str, int] = field(default_factory=dict)
    summaries: int = 0
    publish_failures: int = 0
    publish_dropped: int = 0
    lag: Mapping[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition)
    runs_tracked: int = 0
    evictions: Mapping[str, int] = field(default_factory=dict)  # idle, capacity
    restore_pending: int = 0
    restore_records: int = 0
    profiler_overhead: float = math.nan
    # Readiness (see not_ready)
    started: bool = False  # the consumer is subscribed
    assigned: int = 0
    fetched: bool = False  # every assigned partition has returned a fetch since its assignment
    last_tick_ok: bool = True
    # Seconds the tick in flight has been waiting for its acks and commit, and how long is too
    # long: aiokafka waits for a vanished broker's coordinator without end, so a hung tick never
    # reports a failure of its own.
    tick_waiting: float = 0.0
    tick_patience: float = math.inf
    stopping: bool = False  # a signal arrived: the final tick and shutdown are under way


def not_ready(h: Health) -> str | None:
    """Why the daemon is not ready (one line), or None when it is: it must own partitions, have
    their state restored, have fetched from each since the assignment, and its last tick must
    have published and committed everything, with the one in flight not waiting for longer than
    its patience (else the broker is unreachable or refusing); a
    daemon that is shutting down is not ready (so that a load balancer stops sending to it)."""
    if h.stopping:
        return "stopping"
    if not h.started:
        return "starting: waiting for the broker"
    if h.restore_pending:
        return f"restoring the window state of {h.restore_pending} partition(s)"
    if not h.assigned:
        return "no partitions assigned (joining the consumer group)"
    if not h.last_tick_ok:
        return "the last tick could not publish or commit (broker unreachable?)"
    if h.tick_waiting > h.tick_patience:
        return (
            f"the tick in flight could not publish or commit for {h.tick_waiting:.0f} s "
            "(broker unreachable?)"
        )
    if not h.fetched:
        return "no fetch returned since the assignment"
    return None


class _HealthCollector(Collector):
    """The health families from a fresh :class:`Health` at each collection."""

    def __init__(self, health: Callable[[], Health], last_tick: Callable[[], float]) -> None:
        self._health = health
        self._last_tick = last_tick

    def collect(self) -> Iterator[Metric]:
        h = self._health()
        info = GaugeMetricFamily(
            "metricsd_build_info", "metricsd build", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield GaugeMetricFamily(
            "metricsd_ready", "1 when /readyz answers 200", value=0.0 if not_ready(h) else 1.0
        )
        events = CounterMetricFamily(
            "metricsd_events_consumed", "valid events consumed, by event type", labels=["type"]
        )
        for cls, name in EVENT_TYPES.items():
            events.add_metric([name], float(h.events_by_type.get(cls, 0)))
        yield events
        dead = CounterMetricFamily(
            "metricsd_dead_letters",
            "invalid records sent to the dead-letter topic, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(h.dead_letters_by_reason.items()):
            dead.add_metric([reason], float(n))
        yield dead
        yield CounterMetricFamily(
            "metricsd_summaries_published", "summary records published", value=h.summaries
        )
        yield CounterMetricFamily(
            "metricsd_publish_failures",
            "sends the broker did not acknowledge (retried at the next tick)",
            value=h.publish_failures,
        )
        yield CounterMetricFamily(
            "metricsd_publish_dropped",
            "records dropped because they can never be delivered",
            value=h.publish_dropped,
        )
        yield GaugeMetricFamily(
            "metricsd_last_tick_timestamp_seconds",
            "unix time of the last completed tick",
            value=self._last_tick(),
        )
        lag = GaugeMetricFamily(
            "metricsd_consumer_lag_records",
            "records between the consumed position and the high watermark",
            labels=["topic", "partition"],
        )
        for (topic, partition), n in sorted(h.lag.items()):
            lag.add_metric([topic, str(partition)], float(n))
        yield lag
        yield GaugeMetricFamily(
            "metricsd_runs_tracked", "runs with window state", value=h.runs_tracked
        )
        evictions = CounterMetricFamily(
            "metricsd_evictions",
            "runs whose windows were closed and freed, by reason (run_end: run_end events)",
            labels=["reason"],
        )
        for reason in ("idle", "capacity"):
            evictions.add_metric([reason], float(h.evictions.get(reason, 0)))
        evictions.add_metric(["run_end"], float(h.events_by_type.get(RunEnd, 0)))
        yield evictions
        yield GaugeMetricFamily(
            "metricsd_restore_partitions_pending",
            "partitions whose window state is being restored",
            value=h.restore_pending,
        )
        yield CounterMetricFamily(
            "metricsd_restore_records",
            "changelog records read to restore window state",
            value=h.restore_records,
        )
        yield GaugeMetricFamily(
            "metricsd_profiler_overhead_ratio",
            "share of the timed work spent in the profiler (last profile record)",
            value=h.profiler_overhead,
        )


# -- per-run series ----------------------------------------------------------------------------

# (name, type, help); the order of the families on the page. The step-time quantiles are typed
# ``summary`` (quantile samples only, no _sum/_count): a ``quantile`` label on any other type is
# an error to ``promtool check metrics``; Prometheus stores them as plain series all the same.
_FAMILIES = (
    ("metricsd_run_step_time_seconds", "summary", "batch time quantiles, latest count window"),
    ("metricsd_run_steps_per_second", "gauge", "steps per second (event time), count window"),
    ("metricsd_run_last_event_timestamp_seconds", "gauge", "event time of the newest event"),
    ("metricsd_run_scalar_mean", "gauge", "scalar mean, latest count window"),
    ("metricsd_run_scalar_non_finite", "gauge", "non-finite scalar values in the count window"),
    ("metricsd_run_quality", "gauge", "prediction quality (f1, accuracy; r2), count window"),
)
_STEP, _RATE, _LAST, _MEAN, _NON_FINITE, _QUALITY = range(len(_FAMILIES))
_QUANTILES = (("0.5", "median"), ("0.95", "p95"), ("0.99", "p99"))
_QUALITY_METRICS = {
    "binary": (("f1", "f1"), ("accuracy", "accuracy")),
    "multiclass": (("f1", "f1_macro"), ("accuracy", "accuracy")),
    "regression": (("r2", "r2"),),
}


def _escape(value: str) -> str:
    """A label value as the text format needs it (as prometheus_client escapes it)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


# One sample: (family index, its labels before and after run_id as text, value); labels in
# name order, as generate_latest writes them.
_Sample = tuple[int, str, str, float]


class _Run:
    """The latest samples of one run, per stream, and its rendered lines per family."""

    __slots__ = ("label", "last_ts", "lines", "ranks", "streams")

    def __init__(self, run_id: str) -> None:
        self.label = f'run_id="{_escape(run_id)}"'
        self.streams: dict[str, list[_Sample]] = {}
        self.last_ts: dict[str, float] = {}
        self.lines: list[str] = []
        # Ranks of a distributed run (its ranks summary): each step is one batch per rank, so
        # its steps/s is the batch_time rate over them.
        self.ranks = 1

    def render(self) -> None:
        by_family: list[list[str]] = [[] for _ in _FAMILIES]
        for samples in self.streams.values():
            for family, before, after, value in samples:
                if family == _RATE:
                    value /= self.ranks
                by_family[family].append(
                    f"{_FAMILIES[family][0]}{{{before}{self.label}{after}}} {_value(value)}\n"
                )
        if self.last_ts:
            by_family[_LAST].append(
                f"{_FAMILIES[_LAST][0]}{{{self.label}}} {_value(max(self.last_ts.values()))}\n"
            )
        self.lines = ["".join(lines) for lines in by_family]


def _samples(record: Mapping[str, Any]) -> list[_Sample]:
    """The samples of one count-window summary (none for streams without per-run gauges)."""
    m: Mapping[str, Any] = record.get("metrics") or {}
    stream = str(record["stream"])
    if stream == "batch_time":
        out: list[_Sample] = [
            (_STEP, f'quantile="{q}",', "", _number(m.get(key))) for q, key in _QUANTILES
        ]
        rate = steps_per_second(record)
        out.append((_RATE, "", "", math.nan if rate is None else rate))
        return out
    if stream.startswith("scalar/"):
        name = f'name="{_escape(stream[7:])}",'
        return [
            (_MEAN, name, "", _number(m.get("mean"))),
            (_NON_FINITE, name, "", _number(m.get("non_finite"))),
        ]
    if stream.startswith("prediction"):
        split = _escape(stream.partition("/")[2] or "default")
        return [
            (_QUALITY, f'metric="{metric}",', f',split="{split}"', _number(m.get(key)))
            for metric, key in _QUALITY_METRICS.get(str(record.get("task")), ())
        ]
    return []


class RunSeries:
    """The per-run gauges, from the summary records the daemon publishes.

    Only count-window summaries are read. A ``final`` summary removes its stream's series, and a
    run without streams is removed; :meth:`forget` removes runs at once (revoked partitions).
    At most ``max_runs`` runs are kept (the least recently updated go first); with ``enabled``
    false nothing is kept and :meth:`text` is empty.
    """

    def __init__(self, max_runs: int, *, enabled: bool = True) -> None:
        self.max_runs = max_runs
        self.enabled = enabled
        self._runs: dict[str, _Run] = {}
        self._text: bytes | None = b"" if not enabled else None

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def update(self, records: Iterable[Record]) -> None:
        if not self.enabled:
            return
        touched: dict[str, _Run] = {}
        runs = self._runs
        for record in records:
            window = record.get("window")
            if record.get("type") != "summary" or not window or window.get("kind") != "count":
                continue
            run_id, stream = str(record["run_id"]), str(record["stream"])
            run = runs.pop(run_id, None)  # re-inserted last: the most recently updated
            if record.get("final"):
                if run is None:
                    continue
                run.streams.pop(stream, None)
                run.last_ts.pop(stream, None)
                if not run.streams:
                    touched.pop(run_id, None)
                    continue
            else:
                if run is None:
                    run = _Run(run_id)
                run.streams[stream] = _samples(record)
                if stream == "ranks":
                    count = _number((record.get("metrics") or {}).get("ranks"))
                    run.ranks = int(count) if count > 1 else 1  # NaN > 1 is False
                last = _number(record.get("last_ts"))
                if not math.isnan(last):
                    run.last_ts[stream] = last
            runs[run_id] = run
            touched[run_id] = run
        while len(runs) > self.max_runs:
            touched.pop(next(iter(runs)), None)
            del runs[next(iter(runs))]
        for run in touched.values():
            run.render()
        self._text = None

    def forget(self, run_ids: Iterable[str]) -> None:
        for run_id in run_ids:
            if self._runs.pop(run_id, None) is not None:
                self._text = None

    def text(self) -> bytes:
        """The per-run part of the page (HELP and TYPE lines, then the samples of each family),
        built again only after a change."""
        if self._text is None:
            parts: list[str] = []
            runs = self._runs.values()
            for i, (name, kind, doc) in enumerate(_FAMILIES):
                parts.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
                parts.extend(run.lines[i] for run in runs)
            self._text = "".join(parts).encode()
        return self._text


class Exposition:
    """The page of ``/metrics``: a private registry (health, tick histogram) and the per-run part.

    ``health`` is called at each render for a fresh snapshot; ``observe_tick`` is called by the
    service after every tick."""

    def __init__(
        self, health: Callable[[], Health], *, max_runs: int, per_run_metrics: bool = True
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.tick_duration = Histogram(
            "metricsd_tick_duration_seconds",
            "duration of a tick: summaries, publish, acknowledgements, commit",
            buckets=TICK_BUCKETS,
            registry=self.registry,
        )
        self.last_tick = math.nan
        self.registry.register(_HealthCollector(health, lambda: self.last_tick))
        self.runs = RunSeries(max_runs, enabled=per_run_metrics)

    def observe_tick(self, seconds: float, now: float) -> None:
        """One completed tick: its duration and when it ended (unix seconds)."""
        self.tick_duration.observe(seconds)
        self.last_tick = now

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.runs.text()
