"""Reading the summary topic back: what ``metricsd tail`` and ``metricsd report`` show.

Plan
----
Operations
    * ``parse(raw)``: one record of the output topic (bytes, str or an already decoded dict) ->
      a ``summary`` or ``profile`` dict, or None for anything else (other types, malformed JSON,
      a summary missing its identity fields). Never raises on bad input.
    * ``Summaries.add(record)``: de-duplicate on ``id`` and keep the latest record of each
      (run, stream, window); says whether the record told us anything new.
    * ``Summaries.latest(...)``, ``.streams(run)``, ``.series(run, stream, window)``: what is known.
    * ``key_figures(record)``: the 3-5 numbers worth a glance for the record's stream kind.
    * ``throughput(series)``: steps per second between successive batch_time summaries.
Rules
    * ``id`` = group|run|stream|incarnation|window|seq identifies a summary (daemons before
      incarnations wrote run|stream|window|seq); the daemon publishes at least once, and a later
      copy with the same id covers at least as much data (a restart re-publishes a window after
      restoring it), so the last copy wins. A copy with identical content is a duplicate and
      ``add`` returns False for it.
    * The latest record of a (run, stream, window) is replaced by one of the same incarnation
      (and group) with a higher or equal ``seq``; by one of a later incarnation (a run that came
      back after it ended or was evicted: same partition, larger offset); and by any other record
      that arrives after the current one is ``final`` or comes from another group or an
      incarnation that cannot be ordered. An older incarnation arriving late (a replay) does not
      replace a newer one.
    * Series keep the order in which ids first arrived (the topic's order: key = run id, so one
      run's summaries share one partition) with each id holding its last copy.
Pure: no I/O, no clock (``now`` is passed in where ages are computed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "Figure",
    "Summaries",
    "key_figures",
    "parse",
    "stream_kind",
    "throughput",
    "window_tag",
]

Record = dict[str, Any]

_REQUIRED = ("id", "run_id", "stream", "window", "seq", "metrics")


def parse(raw: bytes | str | Mapping[str, Any] | None) -> Record | None:
    """A ``summary`` or ``profile`` record from the output topic, or None if it is neither.

    Summaries must carry ``id``, ``run_id``, ``stream``, ``window`` (an object), ``seq`` (an int)
    and ``metrics`` (an object); anything else on the topic (dead letters, garbage) is skipped.
    """
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        doc: Any = dict(raw)
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(doc, dict):
        return None
    kind = doc.get("type")
    if kind == "profile":
        return doc if isinstance(doc.get("emitted_at"), int | float) else None
    if kind != "summary" or any(name not in doc for name in _REQUIRED):
        return None
    if not (
        isinstance(doc["id"], str)
        and isinstance(doc["run_id"], str)
        and isinstance(doc["stream"], str)
        and isinstance(doc["window"], dict)
        and isinstance(doc["metrics"], dict)
        and isinstance(doc["seq"], int)
    ):
        return None
    return doc


def window_tag(window: Mapping[str, Any]) -> str:
    """``count:1000`` or ``time:60``: the window part of a summary id."""
    if window.get("kind") == "count":
        return f"count:{window.get('size')}"
    seconds = window.get("seconds")
    return f"time:{seconds:g}" if isinstance(seconds, int | float) else f"time:{seconds}"


def stream_kind(record: Mapping[str, Any]) -> str:
    """``batch_time``, ``ranks``, ``binary``, ``multiclass``, ``regression``, ``scalar``, ``cv``,
    ``attention``, ``features`` (or the stream name itself for a stream this module does not
    know)."""
    stream = str(record.get("stream", ""))
    if stream.startswith("prediction/"):
        return str(record.get("task", "prediction"))
    if stream.startswith("scalar/"):
        return "scalar"
    return stream


@dataclass(frozen=True, slots=True)
class Figure:
    """One number to show: ``label``, ``value`` (None when undefined) and how to format it."""

    label: str
    value: float | None
    # "s" (seconds, shown in ms when small), "/s", "%" (a fraction), "n" (a count), "" (plain)
    unit: str = ""

    def text(self) -> str:
        """The value formatted for a table cell; ``-`` when undefined."""
        v = self.value
        if v is None or not math.isfinite(v):
            return "-"
        if self.unit == "s":
            return f"{v * 1000:.1f} ms" if abs(v) < 1 else f"{v:.2f} s"
        if self.unit == "%":
            return f"{v * 100:.1f}%"
        if self.unit == "n":
            return f"{v:.0f}"
        if self.unit == "/s":
            return f"{v:.1f}/s"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _get(metrics: Mapping[str, Any], *path: str) -> float | None:
    """A number nested in ``metrics`` (``_get(m, "entropy", "mean")``), None if absent."""
    node: Any = metrics
    for name in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(name)
    return _number(node)


def steps_per_second(record: Mapping[str, Any]) -> float | None:
    """Event-time rate of a batch_time window: (count - 1) / (last_ts - first_ts); None when the
    window spans no time (a single value, or values sharing one timestamp)."""
    count, first, last = (
        _number(record.get("count")),
        _number(record.get("first_ts")),
        _number(record.get("last_ts")),
    )
    if count is None or first is None or last is None or last <= first or count < 2:
        return None
    return (count - 1) / (last - first)


def key_figures(record: Mapping[str, Any], *, ranks: int = 1) -> list[Figure]:
    """The 3-5 figures of a summary worth a glance, by stream kind (empty for unknown streams).
    ``ranks``: the run's ranks (its ranks summary), when it is distributed: every step is then
    one batch per rank, so batch_time's steps/s is its batch rate over them."""
    m: Mapping[str, Any] = record.get("metrics") or {}
    kind = stream_kind(record)
    if kind == "batch_time":
        rate = steps_per_second(record)
        return [
            Figure("p50", _get(m, "median"), "s"),
            Figure("p95", _get(m, "p95"), "s"),
            Figure("p99", _get(m, "p99"), "s"),
            Figure("mean", _get(m, "mean"), "s"),
            Figure("steps/s", None if rate is None else rate / max(ranks, 1), "/s"),
        ]
    if kind == "ranks":
        slowest = m.get("slowest")
        first = slowest[0] if isinstance(slowest, list) and slowest else {}
        return [
            Figure("ranks", _get(m, "ranks"), "n"),
            Figure("p50", _get(m, "median"), "s"),
            Figure("slowest", _get(first, "median") if isinstance(first, Mapping) else None, "s"),
            Figure("max z", _get(m, "max_z")),
            Figure("stragglers", _get(m, "straggler_count"), "n"),
        ]
    if kind == "binary":
        return [
            Figure("f1", _get(m, "f1")),
            Figure("accuracy", _get(m, "accuracy")),
            Figure("precision", _get(m, "precision")),
            Figure("recall", _get(m, "recall")),
        ]
    if kind == "multiclass":
        return [
            Figure("accuracy", _get(m, "accuracy")),
            Figure("f1 macro", _get(m, "f1_macro")),
            Figure("f1 weighted", _get(m, "f1_weighted")),
            Figure("classes", _classes(m), "n"),
        ]
    if kind == "regression":
        return [
            Figure("rmse", _get(m, "rmse")),
            Figure("r2", _get(m, "r2")),
            Figure("mae", _get(m, "mae")),
            Figure("within thr", _get(m, "within_threshold"), "%"),
        ]
    if kind == "scalar":
        return [
            Figure("mean", _get(m, "mean")),
            Figure("min", _get(m, "min")),
            Figure("max", _get(m, "max")),
            Figure("non-finite", _get(m, "non_finite"), "n"),
        ]
    if kind == "cv":
        return [
            Figure("val loss", _get(m, "mean_val_loss")),
            Figure("train loss", _get(m, "mean_train_loss")),
            Figure("val/train", _get(m, "overfitting_ratio")),
            Figure("folds", _get(m, "folds"), "n"),
        ]
    if kind == "attention":
        return [
            Figure("entropy", _get(m, "entropy", "mean")),
            Figure("concentration", _get(m, "concentration", "mean")),
            Figure("latest entropy", _get(m, "latest", "attention_entropy")),
        ]
    if kind == "features":
        return [
            Figure("sparsity", _get(m, "sparsity", "mean"), "%"),
            Figure("l2 norm", _get(m, "l2_norm", "mean")),
            Figure("mean", _get(m, "mean", "mean")),
        ]
    return []


def _classes(metrics: Mapping[str, Any]) -> float | None:
    """Labels in a multiclass window, in every form of the record (schemas/summary.schema.json):
    ``labels_total`` when the matrix was omitted (``labels`` then keeps only the top ones),
    else the length of ``labels`` (dense or sparse matrix)."""
    total = _get(metrics, "labels_total")
    if total is not None:
        return total
    labels = metrics.get("labels")
    return float(len(labels)) if isinstance(labels, list) else None


def _position(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """(partition, offset) of a record's incarnation, None when it has none or it is malformed."""
    incarnation = record.get("incarnation")
    if not isinstance(incarnation, str):
        return None
    partition, _, offset = incarnation.partition(":")
    try:
        return int(partition), int(offset)
    except ValueError:
        return None


def _supersedes(new: Record, current: Record) -> bool:
    same_life = new.get("group") == current.get("group") and new.get("incarnation") == current.get(
        "incarnation"
    )
    if same_life:
        return bool(current.get("final")) or new["seq"] >= current["seq"]
    if new.get("group") == current.get("group"):
        new_at, current_at = _position(new), _position(current)
        if new_at is not None and current_at is not None and new_at[0] == current_at[0]:
            return new_at[1] > current_at[1]
    return True


class Summaries:
    """De-duplicated summaries and the latest per (run, stream, window); profile records apart.

    ``run`` / ``stream`` (exact names) keep only matching summaries: the rest are not stored.
    Memory grows with the summaries kept (``series``); ``keep_series=False`` keeps only the
    latest per (run, stream, window) and a 64-bit fingerprint per id seen (about 150 bytes per
    summary), for a long-running ``tail``.
    """

    def __init__(
        self, *, run: str | None = None, stream: str | None = None, keep_series: bool = True
    ) -> None:
        self._run = run
        self._stream = stream
        self._keep_series = keep_series
        self._by_id: dict[str, Record] = {}
        self._seen: dict[str, int] = {}  # id -> fingerprint of its last copy
        self._latest: dict[tuple[str, str, str], Record] = {}
        self._series: dict[tuple[str, str, str], dict[str, Record]] = {}
        self.profiles: list[Record] = []
        self.duplicates = 0  # copies identical to one already held
        self.replaced = 0  # later copies of an id with different content (they win)

    def wants(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` (a parsed summary) passes the run and stream filters."""
        return (self._run is None or record["run_id"] == self._run) and (
            self._stream is None or record["stream"] == self._stream
        )

    def add(self, record: Record) -> bool:
        """Take one parsed record (``parse``); True when it is new: a summary id not seen
        before, a later copy of an id whose content differs, or a profile record. False for a
        duplicate, a record filtered out, or None."""
        if record is None:
            return False
        if record.get("type") == "profile":
            self.profiles.append(record)
            return True
        if not self.wants(record):
            return False
        fingerprint = hash(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
        held = self._seen.get(record["id"])
        if held == fingerprint:
            self.duplicates += 1
            return False
        if held is not None:
            self.replaced += 1
        self._seen[record["id"]] = fingerprint
        if self._keep_series:
            self._by_id[record["id"]] = record
        key = (record["run_id"], record["stream"], window_tag(record["window"]))
        current = self._latest.get(key)
        if current is None or _supersedes(record, current):
            self._latest[key] = record
        if self._keep_series:
            self._series.setdefault(key, {})[record["id"]] = record
        return True

    def extend(self, records: Iterable[Record | None]) -> int:
        """``add`` each; the number that were new."""
        return sum(self.add(r) for r in records if r is not None)

    def __len__(self) -> int:
        """Distinct summary ids seen."""
        return len(self._seen)

    def records(self) -> list[Record]:
        """Every summary held (the last copy of each id), in order of first arrival."""
        if not self._keep_series:
            raise ValueError("records() needs keep_series=True")
        return list(self._by_id.values())

    def runs(self) -> list[str]:
        """Run ids, sorted."""
        return sorted({run for run, _, _ in self._latest})

    def streams(self, run: str) -> list[str]:
        """Streams of ``run``: batch_time first, then predictions, cv, attention, features."""
        order = {"batch_time": 0, "cv": 2, "attention": 3, "features": 4}
        names = {stream for r, stream, _ in self._latest if r == run}
        return sorted(names, key=lambda s: (order.get(s, 1), s))

    def windows(self, run: str, stream: str) -> list[str]:
        """Window tags of (run, stream): the count window first, then time windows by length."""

        def order(tag: str) -> tuple[int, float]:
            kind, _, size = tag.partition(":")
            try:
                return (0 if kind == "count" else 1, float(size))
            except ValueError:
                return (2, 0.0)

        return sorted({w for r, s, w in self._latest if r == run and s == stream}, key=order)

    def latest(self, run: str, stream: str, window: str | None = None) -> Record | None:
        """The latest summary of (run, stream) in ``window`` (a tag); None: the count window, else
        the shortest time window."""
        if window is not None:
            return self._latest.get((run, stream, window))
        tags = self.windows(run, stream)
        return self._latest.get((run, stream, tags[0])) if tags else None

    def last_emitted(self, run: str, stream: str) -> float | None:
        """The newest ``emitted_at`` over every window of (run, stream)."""
        times = [
            t
            for (r, s, _), rec in self._latest.items()
            if r == run and s == stream and (t := _number(rec.get("emitted_at"))) is not None
        ]
        return max(times, default=None)

    def is_final(self, run: str) -> bool:
        """True when every stream of ``run`` has published its final summary (the run ended)."""
        latest = [rec for (r, _, _), rec in self._latest.items() if r == run]
        return bool(latest) and all(rec.get("final") for rec in latest)

    def series(self, run: str, stream: str, window: str | None = None) -> list[Record]:
        """Summaries of (run, stream, window) in order of first arrival (last copy of each id);
        ``window`` None as in ``latest``."""
        if window is None:
            tags = self.windows(run, stream)
            if not tags:
                return []
            window = tags[0]
        return list(self._series.get((run, stream, window), {}).values())


def throughput(series: Iterable[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """Steps per second between successive summaries of one batch_time series:
    ``(last_ts, Δtotal / Δlast_ts)`` for each pair whose time and total both advance. A drop in
    ``total`` (the run id started again) begins a new segment."""
    points: list[tuple[float, float]] = []
    previous: tuple[float, float] | None = None
    for rec in series:
        ts, total = _number(rec.get("last_ts")), _number(rec.get("total"))
        if ts is None or total is None:
            continue
        if previous is not None and ts > previous[0] and total > previous[1]:
            points.append((ts, (total - previous[1]) / (ts - previous[0])))
        if previous is None or total < previous[1] or ts > previous[0]:
            previous = (ts, total)
    return points
