"""The core: ``ingest(events, now)`` and ``due(now) -> summaries``, under the profiler.

Plan
----
Feed-and-poll, no I/O (h11 style): the shell decodes records into events, hands them over with
``ingest`` and, once per tick, asks ``due(now)`` for the summary records to publish.

- Every (run, stream) owns one row of a ring-buffer bank; there is one bank per stream kind
  (batch_time, binary, multiclass, regression, cv, attention, features). Rows are recycled through
  the banks' free lists when a run ends or its partition goes away.
- ``ingest`` groups a batch by row first and then writes each row once (one slice assignment per
  channel), so the cost per event is a dict lookup and a list append. Per-event analyses
  (attention, features) run vectorised over the whole batch.
- ``due`` computes, for each kind, the statistics of every row that received data since the
  previous call, in one vectorised pass per window: the count window (the newest N values) and the
  time windows (values whose event time is within T seconds of the row's newest event time:
  ``ts > last_ts - T``). A time window whose mask equals the count window reuses its result.
- ``run_end`` publishes the run's final summaries (``final: true``) at once and frees its rows.
- Bounded memory: at most ``max_runs`` runs are tracked. Each run's last activity is the ``now``
  of the latest ingest that touched it, kept in an ordered dict (least recent first; one
  ``move_to_end`` per run and batch, nothing per event). A new run beyond ``max_runs`` first
  evicts the least recently active run; ``due`` evicts runs idle longer than ``idle_timeout``.
  Eviction is ``run_end``: final summaries of all the run's streams, then its rows are freed. A
  run keeps at most ``MAX_SPLITS`` prediction streams (a new split closes its oldest one with a
  final summary), so every bank is capped: ``max_runs`` rows (``max_runs * MAX_SPLITS`` for the
  three prediction kinds). Banks never shrink; freed rows are reused.

Summary identity for de-duplication: (run_id, stream, window, seq); ``seq`` counts the ticks that
produced summaries for that (run, stream), shared by all its windows. ``id`` joins the four.

Records are plain dicts ready for ``orjson.dumps``: undefined statistics are NaN floats, which
orjson writes as ``null`` (JSON never carries NaN or Infinity).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from metricsd import analyses, stats
from metricsd.buffers import RingBank
from metricsd.changelog import RowState
from metricsd.config import MonitorSettings
from metricsd.events import Attention, BatchTime, CvFold, Event, Features, Prediction, RunEnd
from metricsd.profiler import Profiler

__all__ = ["MAX_SPLITS", "Monitor"]

# Prediction streams (splits) one run may hold at once: bounds the rows of the prediction banks.
MAX_SPLITS = 8

Record = dict[str, Any]
BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Statistics of the per-event figures of the attention and features streams.
_WINDOW_STATS = ("count", "mean", "std", "min", "max", "median", "p95", "p99")


@dataclass(eq=False, slots=True)
class _Row:
    """One (run, stream) window: where it lives and what has been published of it."""

    run_id: str
    stream: str
    kind: _Kind
    row: int
    task: str | None
    seq: int = 0
    latest: Record | None = None  # per-event figures of the newest event (attention, features)


def _rows_of(columns: dict[str, FloatArray], ints: Iterable[str] = ()) -> list[Record]:
    """Column arrays (one value per row) -> one dict per row, with the named columns as ints."""
    int_names = set(ints)
    lists = [
        col.astype(np.int64).tolist() if name in int_names else col.tolist()
        for name, col in columns.items()
    ]
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


def _nested(per_channel: dict[str, list[Record]]) -> list[Record]:
    """{"a": [row dicts], "b": [row dicts]} -> [{"a": row dict, "b": row dict}, ...]."""
    names = list(per_channel)
    return [
        dict(zip(names, values, strict=True)) for values in zip(*per_channel.values(), strict=True)
    ]


@dataclass(eq=False)
class _Kind:
    """One stream kind: a bank, its dirty rows, and how its window metrics are computed."""

    name: str
    channels: int
    width: int
    bank: RingBank = field(init=False)
    dirty: dict[int, _Row] = field(default_factory=dict)
    # Metrics do not depend on which slot holds a value (all but cv, which reads arrival order).
    order_free: bool = True
    max_rows: int | None = None  # the bank's cap (the monitor frees rows before reaching it)

    def __post_init__(self) -> None:
        self.bank = RingBank(self.width, self.channels, max_rows=self.max_rows)

    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        """Metrics of each selected row over the slots in ``mask`` (values are (C, n, W))."""
        raise NotImplementedError


class _Numeric(_Kind):
    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        return _rows_of(stats.numeric_summary(values[0], mask), ints=("count",))


class _Binary(_Kind):
    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        result = stats.binary_summary(values[0], values[1], mask)
        return _rows_of(result, ints=("tp", "fp", "fn", "tn"))


class _Multiclass(_Kind):
    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        scalars, matrices = stats.multiclass_summary(values[0], values[1], mask)
        records = _rows_of(scalars)
        for record, (labels, matrix) in zip(records, matrices, strict=True):
            record["labels"] = labels
            record["confusion_matrix"] = matrix
        return records


@dataclass(eq=False)
class _Regression(_Kind):
    threshold: float = 0.1

    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        return _rows_of(stats.regression_summary(values[0], values[1], mask, self.threshold))


class _CrossValidation(_Kind):
    """Channels: fold id, train loss, val loss. A fold sent again replaces the earlier one."""

    order_free = False

    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        # Fold ids are compared by their float64 bit patterns (equal floats, equal bits): a cast
        # to int64 overflows for ids near 2**63, which float64 rounds up to 2**63. Ids beyond
        # 2**53 that round to the same float64 count as one fold.
        folds = values[0].view(np.int64)
        latest = analyses.latest_per_fold_2d(folds, self.bank.arrival_order(rows), mask)
        return _rows_of(analyses.cv_metrics(values[1], values[2], latest), ints=("folds",))


@dataclass(eq=False)
class _PerEvent(_Kind):
    """Window statistics of per-event figures (one channel each), plus the newest event's."""

    figures: tuple[str, ...] = ()

    def metrics(self, values: FloatArray, mask: BoolArray, rows: IntArray) -> list[Record]:
        per_channel = {}
        for c, figure in enumerate(self.figures):
            result = stats.numeric_summary(values[c], mask)
            per_channel[figure] = _rows_of({k: result[k] for k in _WINDOW_STATS}, ints=("count",))
        return _nested(per_channel)


@dataclass(frozen=True, slots=True)
class _Computed:
    """One window's metrics for the selected rows, before they become records."""

    window: dict[str, Any]
    truncated: BoolArray | None  # time windows only
    per_row: list[Record]
    counts: IntArray
    first: FloatArray
    last: FloatArray


def _compact(values: FloatArray, mask: BoolArray, counts: IntArray) -> tuple[FloatArray, BoolArray]:
    """The masked slots of each row moved to the left of a block as wide as the fullest row.

    A 60 s window often holds a fraction of the 1,000-slot buffer; sorting the padded full width
    would cost as much as the count window. Slot order is not kept (only for order-free metrics).
    """
    width = int(counts.max(initial=0))
    if width == 0 or width > mask.shape[1] // 2:
        return values, mask
    rows, cols = np.nonzero(mask)  # row-major: each row's slots in increasing column order
    starts = np.cumsum(counts) - counts
    positions = np.arange(rows.shape[0]) - np.repeat(starts, counts)
    packed = np.zeros((values.shape[0], mask.shape[0], width), dtype=np.float64)
    packed[:, rows, positions] = values[:, rows, cols]
    return packed, np.arange(width)[None, :] < counts[:, None]


# Slots per chunk of rows in one statistics pass: 2 MB per float64 temporary.
_CHUNK_SLOTS = 1 << 18

_ATTENTION_FIGURES = ("concentration", "entropy")
_FEATURE_FIGURES = ("mean", "sparsity", "l2_norm")


class Monitor:
    """Window state for every run and stream; computes summaries when asked.

    Not thread-safe; one asyncio task owns it. ``now`` (unix seconds) is always passed in: it
    stamps ``emitted_at`` and stands in for the event time of events that carry none.
    """

    def __init__(
        self,
        settings: MonitorSettings,
        profiler: Profiler | None = None,
        *,
        track_changes: bool = False,
    ) -> None:
        """``track_changes``: remember changed and removed rows for ``state_changes()`` (on when
        the window state is backed by a changelog)."""
        self.settings = settings
        self.track_changes = track_changes
        self.profiler = profiler if profiler is not None else Profiler(enabled=False)
        w = settings.window
        # One row per run in each single-stream kind, up to MAX_SPLITS in each prediction kind.
        one, splits = settings.max_runs, settings.max_runs * MAX_SPLITS
        self._batch_time = _Numeric("batch_time", 1, w, max_rows=one)
        self._binary = _Binary("binary", 2, w, max_rows=splits)
        self._multiclass = _Multiclass("multiclass", 2, w, max_rows=splits)
        self._regression = _Regression(
            "regression", 2, w, max_rows=splits, threshold=settings.threshold
        )
        self._cv = _CrossValidation("cv", 3, w, max_rows=one)
        self._attention = _PerEvent("attention", 2, w, max_rows=one, figures=_ATTENTION_FIGURES)
        self._features = _PerEvent("features", 3, w, max_rows=one, figures=_FEATURE_FIGURES)
        self._kinds: list[_Kind] = [
            self._batch_time,
            self._binary,
            self._multiclass,
            self._regression,
            self._cv,
            self._attention,
            self._features,
        ]
        self._prediction_kinds = {
            "binary": self._binary,
            "multiclass": self._multiclass,
            "regression": self._regression,
        }
        self._rows: dict[tuple[str, str], _Row] = {}
        self._runs: dict[str, list[_Row]] = {}
        self._partition_of: dict[str, int] = {}
        self._ready: list[Record] = []
        # Rows changed or removed since the last ``state_changes()`` (for the changelog).
        self._changed: dict[tuple[str, str], _Row] = {}
        self._removed: dict[tuple[str, str], int] = {}
        self.events_ingested = 0
        self.values_ingested = 0
        # Bounded memory. Tracked runs by last activity, least recent first (same keys as _runs).
        self._last_seen: OrderedDict[str, float] = OrderedDict()
        self._idle_timeout = settings.idle_timeout or math.inf  # 0 = never
        self._clock = 0.0  # the latest ``now`` given to ingest or due
        # Runs created outside ingest (restore): active as of the next ingest or due.
        self._unstamped: list[str] = []
        self.runs_evicted_idle = 0
        self.runs_evicted_capacity = 0
        self.streams_evicted = 0  # prediction splits closed because of MAX_SPLITS

    # -- introspection ---------------------------------------------------------------------
    @property
    def runs_tracked(self) -> int:
        return len(self._runs)

    @property
    def runs_evicted(self) -> dict[str, int]:
        """Runs evicted (final summaries, then freed) by reason: ``idle`` and ``capacity``."""
        return {"idle": self.runs_evicted_idle, "capacity": self.runs_evicted_capacity}

    @property
    def rows_tracked(self) -> int:
        return len(self._rows)

    @property
    def window_bytes(self) -> int:
        """Bytes of all window arrays (what memory use should be proportional to)."""
        return sum(kind.bank.nbytes for kind in self._kinds)

    def runs_on(self, partitions: Iterable[int]) -> list[str]:
        wanted = set(partitions)
        return [run for run, p in self._partition_of.items() if p in wanted]

    # -- ingest ----------------------------------------------------------------------------
    def ingest(self, events: Sequence[Event], now: float, partition: int = -1) -> None:
        """Add a batch of valid events (from one partition) to the windows.

        Values are grouped per row and written with one bulk append per row. A ``run_end`` in the
        batch first writes everything before it, then emits that run's final summaries.
        """
        with self.profiler.profile_operation("ingest", "ingest"):
            self._ingest(events, now, partition)

    def _ingest(self, events: Sequence[Event], now: float, partition: int) -> None:
        self._advance(now)
        scalars: dict[str, tuple[list[float], list[float]]] = {}
        pairs: dict[tuple[str, str, str], list[tuple[Any, Any, float]]] = {}
        folds: dict[str, list[tuple[float, float, float, float]]] = {}
        matrices: list[tuple[str, FloatArray, float]] = []
        vectors: list[tuple[str, FloatArray, float]] = []
        values = 0
        for ev in events:
            t = type(ev)
            ts = now if ev.ts is None else ev.ts
            if t is BatchTime:
                pending = scalars.get(ev.run_id)
                if pending is None:
                    pending = scalars[ev.run_id] = ([], [])
                seconds = ev.seconds  # type: ignore[union-attr]
                if type(seconds) is float:
                    pending[0].append(seconds)
                    pending[1].append(ts)
                    values += 1
                else:
                    pending[0].extend(seconds.tolist())
                    pending[1].extend([ts] * len(seconds))
                    values += len(seconds)
            elif t is Prediction:
                key = (ev.run_id, ev.split, ev.task)  # type: ignore[union-attr]
                pairs.setdefault(key, []).append((ev.y_true, ev.y_pred, ts))  # type: ignore[union-attr]
                values += len(ev.y_true)  # type: ignore[union-attr]
            elif t is CvFold:
                folds.setdefault(ev.run_id, []).append(
                    (float(ev.fold), ev.train_loss, ev.val_loss, ts)  # type: ignore[union-attr]
                )
                values += 1
            elif t is Attention:
                matrices.append((ev.run_id, ev.weights, ts))  # type: ignore[union-attr]
                values += 1
            elif t is Features:
                for vector in ev.values:  # type: ignore[union-attr]
                    vectors.append((ev.run_id, vector, ts))
                values += len(ev.values)  # type: ignore[union-attr]
            elif t is RunEnd:
                self._flush(scalars, pairs, folds, matrices, vectors, partition, now)
                scalars, pairs, folds, matrices, vectors = {}, {}, {}, [], []
                self.end_run(ev.run_id, now)
            else:  # pragma: no cover - the decoder yields only the types above
                raise TypeError(f"not an event: {ev!r}")
        self._flush(scalars, pairs, folds, matrices, vectors, partition, now)
        self.events_ingested += len(events)
        self.values_ingested += values

    def _row(
        self,
        run_id: str,
        stream: str,
        kind: _Kind,
        partition: int,
        task: str | None = None,
        now: float | None = None,
    ) -> _Row:
        """The row of (run, stream), created if new: room is made first (capacity eviction,
        ``MAX_SPLITS``). ``now`` None (a restore, outside ingest) makes a new run active as of
        the next ``ingest`` or ``due``."""
        ref = self._rows.get((run_id, stream))
        if ref is not None and ref.kind is kind:
            return ref
        if ref is not None:
            # The task of a prediction stream changed (e.g. binary -> regression): the old window
            # is meaningless for the new task, so it is closed and a new one starts.
            self._drop(ref)
        elif task is not None and run_id in self._runs:
            self._limit_splits(run_id, self._clock if now is None else now)
        if run_id not in self._runs:
            self._admit(run_id, now)
        ref = _Row(run_id, stream, kind, kind.bank.allocate(), task)
        self._rows[(run_id, stream)] = ref
        self._runs.setdefault(run_id, []).append(ref)
        if partition >= 0:
            self._partition_of[run_id] = partition
        return ref

    def _flush(
        self,
        scalars: dict[str, tuple[list[float], list[float]]],
        pairs: dict[tuple[str, str, str], list[tuple[Any, Any, float]]],
        folds: dict[str, list[tuple[float, float, float, float]]],
        matrices: list[tuple[str, FloatArray, float]],
        vectors: list[tuple[str, FloatArray, float]],
        partition: int,
        now: float,
    ) -> None:
        # The runs of this flush, in a deterministic order (a set's would vary with the hash seed).
        runs = dict.fromkeys(
            itertools.chain(
                scalars,
                folds,
                (key[0] for key in pairs),
                (run_id for run_id, _, _ in matrices),
                (run_id for run_id, _, _ in vectors),
            )
        )
        if runs:
            self._mark_active(runs, now)
        kind: _Kind
        kind = self._batch_time
        for run_id, (vals, tss) in scalars.items():
            ref = self._row(run_id, "batch_time", kind, partition, now=now)
            kind.bank.append(ref.row, np.array(vals, dtype=np.float64)[None, :], np.array(tss))
            self._touch(kind, ref)
        for (run_id, split, task), items in pairs.items():
            kind = self._prediction_kinds[task]
            ref = self._row(run_id, f"prediction/{split}", kind, partition, task, now)
            block = np.empty((2, sum(len(y) for y, _, _ in items)), dtype=np.float64)
            tss = np.empty(block.shape[1], dtype=np.float64)
            at = 0
            for y_true, y_pred, ts in items:
                n = len(y_true)
                block[0, at : at + n] = y_true
                block[1, at : at + n] = y_pred
                tss[at : at + n] = ts
                at += n
            kind.bank.append(ref.row, block, tss)
            self._touch(kind, ref)
        kind = self._cv
        for run_id, rows in folds.items():
            ref = self._row(run_id, "cv", kind, partition, now=now)
            arr = np.array(rows, dtype=np.float64).T
            kind.bank.append(ref.row, arr[:3], arr[3])
            self._touch(kind, ref)
        if matrices:
            with self.profiler.profile_operation("attention_analysis", "analysis"):
                figures, tops = analyses.attention_metrics([m for _, m, _ in matrices])
            conc = figures["attention_concentration"]
            entropy = figures["attention_entropy"]
            latest = _rows_of(figures)
            for i, record in enumerate(latest):
                record["top_attention_positions"] = tops[i]
            self._append_per_event(
                self._attention, matrices, np.stack([conc, entropy]), latest, partition, now
            )
        if vectors:
            with self.profiler.profile_operation("feature_analysis", "analysis"):
                figures = analyses.feature_metrics([v for _, v, _ in vectors])
            block = np.stack([figures[name] for name in _FEATURE_FIGURES])
            latest = _rows_of(figures, ints=("non_zero",))
            self._append_per_event(self._features, vectors, block, latest, partition, now)

    def _append_per_event(
        self,
        kind: _Kind,
        items: list[tuple[str, FloatArray, float]],
        block: FloatArray,
        latest: list[Record],
        partition: int,
        now: float,
    ) -> None:
        """Append per-event figures (``block`` is (channels, events)) grouped by run."""
        by_run: dict[str, list[int]] = {}
        for i, (run_id, _, _) in enumerate(items):
            by_run.setdefault(run_id, []).append(i)
        tss = np.array([ts for _, _, ts in items], dtype=np.float64)
        for run_id, idx in by_run.items():
            ref = self._row(run_id, kind.name, kind, partition, now=now)
            take = np.array(idx)
            kind.bank.append(ref.row, block[:, take], tss[take])
            ref.latest = latest[idx[-1]]
            self._touch(kind, ref)

    # -- summaries -------------------------------------------------------------------------
    def due(self, now: float) -> list[Record]:
        """Summaries for every (run, stream) with data since the previous call, plus finals.

        Each such stream gets one record per window (count, then each time window) sharing one
        ``seq``. Streams without new data produce nothing. Runs idle for longer than
        ``idle_timeout`` are evicted first (their final summaries are among the records).
        """
        self._advance(now)
        self._evict_idle(now)
        records, self._ready = self._ready, []
        for kind in self._kinds:
            if kind.dirty:
                refs = list(kind.dirty.values())
                kind.dirty.clear()
                records.extend(self._summaries(kind, refs, now, final=False))
        return records

    def end_run(self, run_id: str, now: float) -> None:
        """Queue the run's final summaries (``final: true``) for ``due``; free its rows."""
        self._end_runs([run_id], now)

    def _end_runs(self, run_ids: Iterable[str], now: float) -> None:
        """``end_run`` for several runs at once: one statistics pass per kind, not per run."""
        ended: list[_Row] = []
        for run_id in run_ids:
            ended.extend(self._runs.get(run_id, ()))
        by_kind: dict[int, tuple[_Kind, list[_Row]]] = {}
        for ref in ended:
            by_kind.setdefault(id(ref.kind), (ref.kind, []))[1].append(ref)
        for kind, kind_refs in by_kind.values():
            self._ready.extend(self._summaries(kind, kind_refs, now, final=True))
        for ref in ended:
            self._drop(ref)

    # -- bounded memory --------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Remember ``now``; runs created outside ingest (restore) count as active from it."""
        self._clock = now
        if self._unstamped:
            seen = self._last_seen
            for run_id in self._unstamped:
                if run_id in seen:
                    seen[run_id] = now
                    seen.move_to_end(run_id)
            self._unstamped.clear()

    def _mark_active(self, runs: Iterable[str], now: float) -> None:
        """Move the runs of one flush to the recent end, then make room for its new runs at once
        (one statistics pass per kind for all the runs evicted, instead of one per new run)."""
        seen = self._last_seen
        new = 0
        for run_id in runs:
            if run_id in seen:
                seen[run_id] = now
                seen.move_to_end(run_id)
            else:
                new += 1
        excess = len(self._runs) + new - self.settings.max_runs
        if excess > 0:
            # Runs of this flush are at the recent end: they go only if the flush alone has more
            # runs than max_runs (and then ``_admit`` evicts one by one as rows are created).
            self._evict(list(itertools.islice(seen, excess)), now, "capacity")

    def _admit(self, run_id: str, now: float | None) -> None:
        """Start tracking a new run, evicting the least recently active runs to stay in bounds."""
        at = self._clock if now is None else now
        excess = len(self._runs) + 1 - self.settings.max_runs
        if excess > 0:
            self._evict(list(itertools.islice(self._last_seen, excess)), at, "capacity")
        if now is None:
            self._unstamped.append(run_id)
        self._last_seen[run_id] = at

    def _limit_splits(self, run_id: str, now: float) -> None:
        """Before a run gets a new prediction stream: close its oldest one if it has MAX_SPLITS."""
        splits = [ref for ref in self._runs[run_id] if ref.task is not None]
        if len(splits) >= MAX_SPLITS:
            oldest = splits[0]
            self._ready.extend(self._summaries(oldest.kind, [oldest], now, final=True))
            self._drop(oldest)
            self.streams_evicted += 1

    def _evict_idle(self, now: float) -> None:
        """Evict the runs whose last activity is more than ``idle_timeout`` before ``now``."""
        cutoff = now - self._idle_timeout
        idle: list[str] = []
        for run_id, seen in self._last_seen.items():
            if seen >= cutoff:
                break  # least recent first: the rest are more recent
            idle.append(run_id)
        if idle:
            self._evict(idle, now, "idle")

    def _evict(self, run_ids: list[str], now: float, reason: str) -> None:
        self._end_runs(run_ids, now)
        if reason == "idle":
            self.runs_evicted_idle += len(run_ids)
        else:
            self.runs_evicted_capacity += len(run_ids)

    def release_partitions(self, partitions: Iterable[int], now: float) -> list[Record]:
        """Summaries of the unpublished data of runs on ``partitions``, then forget those runs.

        Called when the consumer loses the partitions (rebalance): the new owner takes over.
        """
        for run_id in self.runs_on(partitions):
            for ref in list(self._runs.get(run_id, ())):
                if ref.row in ref.kind.dirty:
                    del ref.kind.dirty[ref.row]
                    self._ready.extend(self._summaries(ref.kind, [ref], now, final=False))
                self._drop(ref, tombstone=False)
        records, self._ready = self._ready, []
        return records

    def _touch(self, kind: _Kind, ref: _Row) -> None:
        kind.dirty[ref.row] = ref
        if self.track_changes:
            self._changed[(ref.run_id, ref.stream)] = ref

    def _drop(self, ref: _Row, *, tombstone: bool = True) -> None:
        """Free a row; ``tombstone`` records its removal for the changelog (not on a revoke,
        where the state stays for the partition's next owner)."""
        key = (ref.run_id, ref.stream)
        self._changed.pop(key, None)
        if tombstone and self.track_changes:
            self._removed[key] = self._partition_of.get(ref.run_id, -1)
        ref.kind.dirty.pop(ref.row, None)
        ref.kind.bank.release(ref.row)
        del self._rows[(ref.run_id, ref.stream)]
        run_refs = self._runs[ref.run_id]
        run_refs.remove(ref)
        if not run_refs:
            del self._runs[ref.run_id]
            self._partition_of.pop(ref.run_id, None)
            self._last_seen.pop(ref.run_id, None)

    # -- state (changelog) ------------------------------------------------------------------
    def state_changes(self) -> tuple[list[tuple[int, RowState]], list[tuple[int, str, str]]]:
        """Rows changed since the previous call as ``(partition, RowState)``, and rows removed
        (ended, evicted) as ``(partition, run_id, stream)``; then starts a new change set.

        A row removed and created again in between appears only as changed.
        """
        changed = [
            (self._partition_of.get(ref.run_id, -1), self._state_of(ref))
            for ref in self._changed.values()
        ]
        removed = [
            (partition, run_id, stream)
            for (run_id, stream), partition in self._removed.items()
            if (run_id, stream) not in self._changed
        ]
        self._changed, self._removed = {}, {}
        return changed, removed

    def _state_of(self, ref: _Row) -> RowState:
        return RowState(
            run_id=ref.run_id, stream=ref.stream, kind=ref.kind.name, task=ref.task,
            seq=ref.seq, latest=ref.latest, snapshot=ref.kind.bank.snapshot(ref.row),
        )  # fmt: skip

    def restore(self, state: RowState, partition: int) -> None:
        """Rebuild a row from the changelog; it is neither dirty nor changed afterwards."""
        kind = next(k for k in self._kinds if k.name == state.kind)
        ref = self._row(state.run_id, state.stream, kind, partition, state.task)
        kind.bank.restore(ref.row, state.snapshot)
        ref.seq = state.seq
        ref.latest = state.latest
        self._changed.pop((state.run_id, state.stream), None)
        self._removed.pop((state.run_id, state.stream), None)

    def _summaries(self, kind: _Kind, refs: list[_Row], now: float, *, final: bool) -> list[Record]:
        """Records of ``refs`` (all windows), computed in row chunks of about ``_CHUNK_SLOTS``
        slots: the gathered copies and masks stay small and warm in cache instead of costing
        page faults on every tick (10,000 runs x 1,000 slots would be 80 MB per temporary)."""
        step = max(1, _CHUNK_SLOTS // kind.bank.width)
        records: list[Record] = []
        for start in range(0, len(refs), step):
            records += self._chunk_summaries(kind, refs[start : start + step], now, final=final)
        return records

    def _chunk_summaries(
        self, kind: _Kind, refs: list[_Row], now: float, *, final: bool
    ) -> list[Record]:
        bank = kind.bank
        rows = np.fromiter((r.row for r in refs), dtype=np.int64, count=len(refs))
        with self.profiler.profile_operation(f"{kind.name}_stats", "stats"):
            values = bank.values[:, rows]
            ts = bank.ts[rows]
            valid = bank.valid(rows)
            windows: list[tuple[dict[str, Any], BoolArray, BoolArray | None]] = [
                ({"kind": "count", "size": bank.width}, valid, None)
            ]
            if self.settings.time_windows:
                last = np.where(valid, ts, -np.inf).max(axis=1)
                oldest = np.where(valid, ts, np.inf).min(axis=1)
                evicted = bank.total[rows] > bank.count[rows]
                for seconds in self.settings.time_windows:
                    mask = valid & (ts > (last - seconds)[:, None])
                    # The buffer no longer reaches back `seconds`: values in the time window
                    # were evicted by the count window.
                    truncated = evicted & (oldest > last - seconds)
                    windows.append(({"kind": "time", "seconds": seconds}, mask, truncated))
            computed: list[_Computed] = []
            valid_total = int(valid.sum())
            for window, mask, truncated in windows:
                counts = mask.sum(axis=1)
                if computed and int(counts.sum()) == valid_total:
                    # A subset of the count window with as many slots is the same slots.
                    base = computed[0]
                    per_row = [dict(m) for m in base.per_row]
                    first, last_ts = base.first, base.last
                else:
                    if kind.order_free and window["kind"] == "time":
                        per_row = kind.metrics(*_compact(values, mask, counts), rows)
                    else:
                        per_row = kind.metrics(values, mask, rows)
                    first = np.where(mask, ts, np.inf).min(axis=1)
                    last_ts = np.where(mask, ts, -np.inf).max(axis=1)
                computed.append(_Computed(window, truncated, per_row, counts, first, last_ts))
        with self.profiler.profile_operation("build_records", "stats"):
            return self._records(refs, computed, bank, rows, now, final)

    def _records(
        self,
        refs: list[_Row],
        computed: list[_Computed],
        bank: RingBank,
        rows: IntArray,
        now: float,
        final: bool,
    ) -> list[Record]:
        totals = bank.total[rows].tolist()
        records: list[Record] = []
        for c in computed:
            window, per_row, counts, first, last, truncated = (
                c.window,
                c.per_row,
                c.counts,
                c.first,
                c.last,
                c.truncated,
            )
            tag = (
                f"count:{window['size']}"
                if window["kind"] == "count"
                else f"time:{window['seconds']:g}"
            )
            counts_l = counts.tolist()
            first_l = np.where(np.isfinite(first), first, np.nan).tolist()
            last_l = np.where(np.isfinite(last), last, np.nan).tolist()
            trunc_l = truncated.tolist() if truncated is not None else None
            for i, ref in enumerate(refs):
                metrics = per_row[i]
                if ref.latest is not None:
                    metrics["latest"] = ref.latest
                w = window if trunc_l is None else {**window, "truncated": trunc_l[i]}
                record: Record = {
                    "type": "summary",
                    "schema_version": 1,
                    "id": f"{ref.run_id}|{ref.stream}|{tag}|{ref.seq}",
                    "run_id": ref.run_id,
                    "stream": ref.stream,
                    "window": w,
                    "count": counts_l[i],
                    "total": totals[i],
                    "metrics": metrics,
                    "seq": ref.seq,
                    "first_ts": first_l[i],
                    "last_ts": last_l[i],
                    "emitted_at": now,
                    "final": final,
                }
                if ref.task is not None:
                    record["task"] = ref.task
                records.append(record)
        for ref in refs:
            ref.seq += 1
        return records
