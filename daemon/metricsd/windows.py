"""Stream kinds, their window metrics, and summary records: everything the Monitor computes.

Plan
----
- ``KINDS`` is the one table of stream kinds. Each ``KindSpec`` says which event feeds it
  (``source``), how a batch collects those events into rows (``collect``), how a row's collected
  items become channel values (``build``), and how a window of values becomes metrics
  (``metrics``). Adding a kind is one entry (plus its three functions); the Monitor only routes.
- A ``Batch`` holds the events of one flush grouped by row, in order of first appearance
  (``Pending``: the row's items and timestamps). The Monitor writes each pending row once.
- ``summarise(kind, rows, ...)`` computes the summary records of the selected rows over every
  window, in row chunks: the count window (the newest N values) and the time windows (values whose
  event time is within T seconds of the row's newest event time: ``ts > last_ts - T``). A time
  window whose mask equals the count window reuses its result.

Records are plain dicts ready for ``orjson.dumps``: undefined statistics are NaN floats, which
orjson writes as ``null``. Nothing here knows about runs' lifetimes, partitions or eviction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from metricsd import stats
from metricsd.buffers import RingBank
from metricsd.events import Attention, BatchTime, CvFold, Event, Features, Prediction, Scalar
from metricsd.profiler import Profiler

__all__ = [
    "KINDS",
    "RANKS_STREAM",
    "RANK_PREFIX",
    "STRAGGLER_Z",
    "TOP_RANKS",
    "Batch",
    "Kind",
    "KindSpec",
    "Pending",
    "Record",
    "Row",
    "id_part",
    "id_prefix",
    "summarise",
    "summarise_ranks",
]

Record = dict[str, Any]
BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
# A row's collected items as channel values (C, n), their timestamps (n,), its newest figures.
Built = tuple[FloatArray, FloatArray, Record | None]

# Statistics of the per-event figures of the attention and features streams.
_WINDOW_STATS = ("count", "mean", "std", "min", "max", "median", "p95", "p99")
_ATTENTION_FIGURES = ("concentration", "entropy")
_FEATURE_FIGURES = ("mean", "sparsity", "l2_norm")
# Slots per chunk of rows in one statistics pass: 2 MB per float64 temporary.
_CHUNK_SLOTS = 1 << 18
# Ranks: each rank of a run has its own batch-time row, stream "rank/<r>" (never published on
# its own); the run's one published stream over them is "ranks".
RANK_PREFIX = "rank/"
RANKS_STREAM = "ranks"
TOP_RANKS = 16  # ranks listed per summary (the slowest); the totals cover all of them
STRAGGLER_Z = 3.5  # robust z above this is a straggler (Iglewicz & Hoaglin's outlier cut)


# -- rows and batches ------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class Row:
    """One (run, stream) window: where it lives and what has been published of it."""

    run_id: str
    stream: str
    kind: Kind
    row: int
    task: str | None
    seq: int = 0
    latest: Record | None = None  # per-event figures of the newest event (attention, features)
    # Which life of (run, stream) this window is: "<partition>:<offset>" of the input record
    # that created it (the Monitor's docstring says why). Part of every summary id.
    incarnation: str = ""
    group: str = ""  # the daemon's consumer group: part of every summary id
    saved: int = 0  # the row's total when it was last handed to the changelog


@dataclass(eq=False, slots=True)
class Pending:
    """One row's share of a batch: kind-specific items and one timestamp per item."""

    run_id: str
    stream: str
    kind: Kind
    task: str | None
    # Index in the batch of the row's first event (-1: unknown): its input position (offset)
    # names a new row's incarnation.
    first: int = -1
    items: list[Any] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Batch:
    """The events of one flush, grouped by row in order of first appearance (``rows``).

    ``index[kind][key]`` finds a kind's pending row; the key is the kind's own (the run id, or
    (run id, split) for a prediction kind), so the hot path hashes one string. A split whose
    task changes within one batch has a pending row in each task's kind, the later replacing the
    earlier when written (as the events' order says).
    """

    kinds: dict[str, Kind]
    rows: list[Pending] = field(default_factory=list)
    index: dict[str, dict[Any, Pending]] = field(default_factory=lambda: defaultdict(dict))
    # Index in the ingested batch of the event being collected (set by the Monitor before each
    # collect): a new pending row remembers it as its ``first``.
    position: int = -1

    def add(self, key: Any, run_id: str, stream: str, kind: str, task: str | None) -> Pending:
        """A new pending row for ``key`` of ``kind``, started by the event at ``position``."""
        pending = self.index[kind][key] = Pending(
            run_id, stream, self.kinds[kind], task, self.position
        )
        self.rows.append(pending)
        return pending


# -- collect: one event -> items of its pending row (and one timestamp per item) ---------------
def _collect_batch_time(batch: Batch, ev: BatchTime, ts: float) -> None:
    run_id = ev.run_id
    pending = batch.index["batch_time"].get(run_id)
    if pending is None:
        pending = batch.add(run_id, run_id, "batch_time", "batch_time", None)
    _extend(pending, ev.seconds, ts)
    if ev.rank is not None:  # also the rank's own window (the run's ranks summary)
        key = (run_id, ev.rank)
        ranked = batch.index["rank"].get(key)
        if ranked is None:
            ranked = batch.add(key, run_id, f"{RANK_PREFIX}{ev.rank}", "rank", None)
        _extend(ranked, ev.seconds, ts)


def _extend(pending: Pending, values: float | FloatArray, ts: float) -> None:
    if isinstance(values, float):
        pending.items.append(values)
        pending.ts.append(ts)
    else:
        pending.items.extend(values.tolist())
        pending.ts.extend([ts] * len(values))


def _collect_scalar(batch: Batch, ev: Scalar, ts: float) -> None:
    key = (ev.run_id, ev.name)
    pending = batch.index["scalar"].get(key)
    if pending is None:
        pending = batch.add(key, ev.run_id, f"scalar/{ev.name}", "scalar", None)
    _extend(pending, ev.value, ts)


def _collect_prediction(batch: Batch, ev: Prediction, ts: float) -> None:
    key = (ev.run_id, ev.split)
    pending = batch.index[ev.task].get(key)
    if pending is None:
        pending = batch.add(key, ev.run_id, f"prediction/{ev.split}", ev.task, ev.task)
    pending.items.append((ev.y_true, ev.y_pred))
    pending.ts.append(ts)


def _collect_single(name: str, item: Any, batch: Batch, ev: Event, ts: float) -> None:
    """One item of ``ev`` for the one row of its run in kind ``name`` (stream name = kind)."""
    run_id = ev.run_id
    pending = batch.index[name].get(run_id)
    if pending is None:
        pending = batch.add(run_id, run_id, name, name, None)
    pending.items.append(item)
    pending.ts.append(ts)


def _collect_cv(batch: Batch, ev: CvFold, ts: float) -> None:
    _collect_single("cv", (float(ev.fold), ev.train_loss, ev.val_loss), batch, ev, ts)


def _collect_attention(batch: Batch, ev: Attention, ts: float) -> None:
    _collect_single("attention", ev.weights, batch, ev, ts)


def _collect_features(batch: Batch, ev: Features, ts: float) -> None:
    for vector in ev.values:
        _collect_single("features", vector, batch, ev, ts)


# -- build: the pending rows of one kind -> channel values, timestamps, newest figures ---------
def _build_scalars(pendings: Sequence[Pending], profiler: Profiler) -> list[Built]:
    return [(np.array(p.items, dtype=np.float64)[None, :], np.array(p.ts), None) for p in pendings]


def _build_pairs(pendings: Sequence[Pending], profiler: Profiler) -> list[Built]:
    built: list[Built] = []
    for p in pendings:
        block = np.empty((2, sum(len(y) for y, _ in p.items)), dtype=np.float64)
        tss = np.empty(block.shape[1], dtype=np.float64)
        at = 0
        for (y_true, y_pred), ts in zip(p.items, p.ts, strict=True):
            n = len(y_true)
            block[0, at : at + n] = y_true
            block[1, at : at + n] = y_pred
            tss[at : at + n] = ts
            at += n
        built.append((block, tss, None))
    return built


def _build_folds(pendings: Sequence[Pending], profiler: Profiler) -> list[Built]:
    return [
        (np.array(p.items, dtype=np.float64).T, np.array(p.ts, dtype=np.float64), None)
        for p in pendings
    ]


def _per_event(pendings: Sequence[Pending], block: FloatArray, latest: list[Record]) -> list[Built]:
    """Split per-item figures (``block`` is (channels, items), items of all ``pendings`` in order)
    back into rows; each row's newest figures are those of its last item."""
    built: list[Built] = []
    at = 0
    for p in pendings:
        take = np.arange(at, at + len(p.items))
        at += len(p.items)
        built.append((block[:, take], np.array(p.ts, dtype=np.float64), latest[at - 1]))
    return built


def _build_attention(pendings: Sequence[Pending], profiler: Profiler) -> list[Built]:
    with profiler.profile_operation("attention_analysis", "analysis"):
        figures, tops = stats.attention_metrics([m for p in pendings for m in p.items])
    block = np.stack([figures["attention_concentration"], figures["attention_entropy"]])
    latest = _rows_of(figures)
    for record, top in zip(latest, tops, strict=True):
        record["top_attention_positions"] = top
    return _per_event(pendings, block, latest)


def _build_features(pendings: Sequence[Pending], profiler: Profiler) -> list[Built]:
    with profiler.profile_operation("feature_analysis", "analysis"):
        figures = stats.feature_metrics([v for p in pendings for v in p.items])
    block = np.stack([figures[name] for name in _FEATURE_FIGURES])
    return _per_event(pendings, block, _rows_of(figures, ints=("non_zero",)))


# -- metrics: values (C, rows, W) and a mask of the window's slots -> one record per row -------
def _rows_of(columns: dict[str, FloatArray], ints: Iterable[str] = ()) -> list[Record]:
    """Column arrays (one value per row) -> one dict per row, with the named columns as ints."""
    int_names = set(ints)
    lists = [
        col.astype(np.int64).tolist() if name in int_names else col.tolist()
        for name, col in columns.items()
    ]
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


def _numeric(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    return _rows_of(stats.numeric_summary(values[0], mask, packed=packed), ints=("count",))


def _scalar(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    """``batch_time``'s statistics over the finite values, and how many were not finite (sent
    as null: a NaN or infinite loss is a fault of the training to surface, not a value)."""
    finite = np.isfinite(values[0])
    result = stats.numeric_summary(values[0], mask & finite)
    result["non_finite"] = (mask & ~finite).sum(axis=1).astype(np.float64)
    return _rows_of(result, ints=("count", "non_finite"))


def _binary(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    result = stats.binary_summary(values[0], values[1], mask)
    return _rows_of(result, ints=("tp", "fp", "fn", "tn"))


def _multiclass(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    scalars, matrices = stats.multiclass_summary(values[0], values[1], mask)
    records = _rows_of(scalars)
    for record, (labels, matrix) in zip(records, matrices, strict=True):
        record["labels"] = labels
        record["confusion_matrix"] = matrix
    return records


def _regression(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    return _rows_of(stats.regression_summary(values[0], values[1], mask, kind.threshold))


def _cross_validation(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    """Channels: fold id, train loss, val loss. A fold sent again replaces the earlier one."""
    # Fold ids are compared by their float64 bit patterns (equal floats, equal bits): a cast to
    # int64 overflows for ids near 2**63, which float64 rounds up to 2**63. Ids beyond 2**53
    # that round to the same float64 count as one fold.
    folds = values[0].view(np.int64)
    latest = stats.latest_per_fold_2d(folds, kind.bank.arrival_order(rows), mask)
    return _rows_of(stats.cv_metrics(values[1], values[2], latest), ints=("folds",))


def _figures(
    names: tuple[str, ...], values: FloatArray, mask: BoolArray, packed: bool
) -> list[Record]:
    """Window statistics of per-event figures (one channel each), nested by figure name."""
    per_figure = []
    for c in range(len(names)):
        result = stats.numeric_summary(values[c], mask, packed=packed)
        per_figure.append(_rows_of({k: result[k] for k in _WINDOW_STATS}, ints=("count",)))
    return [dict(zip(names, row, strict=True)) for row in zip(*per_figure, strict=True)]


def _attention(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    return _figures(_ATTENTION_FIGURES, values, mask, packed)


def _features(
    kind: Kind, values: FloatArray, mask: BoolArray, rows: IntArray, packed: bool = False
) -> list[Record]:
    return _figures(_FEATURE_FIGURES, values, mask, packed)


# -- the table ---------------------------------------------------------------------------------
# (kind, values (C, rows, W), mask, rows, packed): ``packed`` says each row's masked slots come
# first (``_compact``'s block), which the numeric statistics use to skip mask passes.
Metrics = Callable[["Kind", FloatArray, BoolArray, IntArray, bool], list[Record]]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One stream kind. ``write_rank`` / ``activity_rank`` order a flush: rows are written, and
    runs marked active, kind group by kind group in these ranks (equal ranks interleave in
    arrival order). The two orders decide row allocation and least-recently-active ties, so they
    are part of the output; they are the order the monitor has always used."""

    name: str
    channels: int
    source: type[Event]
    collect: Callable[[Batch, Any, float], None]
    build: Callable[[Sequence[Pending], Profiler], list[Built]]
    metrics: Metrics
    write_rank: int
    activity_rank: int
    # Kinds of one group share a per-run stream limit (the monitor's MAX_STREAMS[group]):
    # "prediction" (one row per split and task), "scalar" (one row per name); "" = one row.
    group: str = ""
    # Metrics do not depend on which slot holds a value (all but cv, which reads arrival order).
    order_free: bool = True
    # Time windows are packed (``_compact``) whatever their width, not only under half the
    # buffer: the numeric statistics sort their block, and sorting a packed 600-of-1,000 window
    # is ~25% quicker than the masked full width. The other kinds keep the half-width rule
    # (counting gains little from packing; cv's packed arrival order is the known issue).
    pack_wide: bool = True


def _prediction(name: str, metrics: Metrics) -> KindSpec:
    """A prediction kind: one per task, fed by the predictions of that task."""
    return KindSpec(
        name,
        2,
        Prediction,
        _collect_prediction,
        _build_pairs,
        metrics,
        1,
        2,
        "prediction",
        pack_wide=False,
    )


# name, channels, source event, collect, build, metrics, write rank, activity rank[, group]
KINDS: tuple[KindSpec, ...] = (
    KindSpec("batch_time", 1, BatchTime, _collect_batch_time, _build_scalars, _numeric, 0, 0),
    _prediction("binary", _binary),
    _prediction("multiclass", _multiclass),
    _prediction("regression", _regression),
    # cv reads arrival order, so it should not be compacted (order_free=False), and the old
    # _CrossValidation class said so; but its dataclass base's __init__ set the instance field
    # back to True, so cv time windows have always been compacted. Kept as it was: fixing it
    # changes cv time-window output (reported as a separate issue).
    KindSpec("cv", 3, CvFold, _collect_cv, _build_folds, _cross_validation, 2, 1, pack_wide=False),
    KindSpec("attention", 2, Attention, _collect_attention, _build_attention, _attention, 3, 3),
    KindSpec("features", 3, Features, _collect_features, _build_features, _features, 4, 4),
    KindSpec("scalar", 1, Scalar, _collect_scalar, _build_scalars, _scalar, 5, 5, "scalar"),
    # Fed by batch_time's collect (the events that carry a rank); summarised per run by
    # ``summarise_ranks``, never by ``summarise`` (``_numeric`` only fills the slot).
    KindSpec("rank", 1, BatchTime, _collect_batch_time, _build_scalars, _numeric, 6, 6, "rank"),
)


@dataclass(eq=False)
class Kind:
    """A stream kind at run time: its bank and its rows with data since the last summaries."""

    spec: KindSpec
    width: int
    max_rows: int | None = None  # the bank's cap (the monitor frees rows before reaching it)
    threshold: float = 0.1  # regression's "within threshold"
    bank: RingBank = field(init=False)
    dirty: dict[int, Row] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bank = RingBank(self.width, self.spec.channels, max_rows=self.max_rows)

    @property
    def name(self) -> str:
        return self.spec.name


# -- summaries ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Computed:
    """One window's metrics for the selected rows, before they become records."""

    window: dict[str, Any]
    truncated: BoolArray | None  # time windows only
    per_row: list[Record]
    counts: IntArray
    first: FloatArray
    last: FloatArray


def _compact(
    values: FloatArray, mask: BoolArray, counts: IntArray, limit: int
) -> tuple[FloatArray, BoolArray, bool]:
    """The masked slots of each row moved to the left of a block as wide as the fullest row,
    if that is narrower than ``limit`` and than the buffer; returns ``(values, mask, packed)``
    (``packed``: each row's masked slots come first, and the statistics may rely on it).

    A 60 s window often holds a fraction of the 1,000-slot buffer; sorting the padded full width
    would cost as much as the count window. Slot order is not kept (only for order-free metrics).
    Each row's slots keep their increasing column order (boolean indexing is row-major), so the
    block is the same whichever way it is built; two boolean selections per channel cost a
    tenth of ``nonzero`` plus fancy indexing.
    """
    width = int(counts.max(initial=0))
    if width == 0 or width > limit or width >= mask.shape[1]:
        return values, mask, False
    packed_mask = np.arange(width)[None, :] < counts[:, None]
    packed = np.zeros((values.shape[0], mask.shape[0], width), dtype=np.float64)
    for channel in range(values.shape[0]):  # 2-D boolean indexing: ~10x quicker than 3-D
        packed[channel][packed_mask] = values[channel][mask]
    return packed, packed_mask, True


def summarise(
    kind: Kind,
    refs: list[Row],
    now: float,
    *,
    final: bool,
    time_windows: Sequence[float],
    profiler: Profiler,
) -> list[Record]:
    """Records of ``refs`` (all windows), computed in row chunks of about ``_CHUNK_SLOTS``
    slots: the gathered copies and masks stay small and warm in cache instead of costing
    page faults on every tick (10,000 runs x 1,000 slots would be 80 MB per temporary).
    Advances each row's ``seq``."""
    step = max(1, _CHUNK_SLOTS // kind.bank.width)
    records: list[Record] = []
    for start in range(0, len(refs), step):
        chunk = refs[start : start + step]
        rows = np.fromiter((r.row for r in chunk), dtype=np.int64, count=len(chunk))
        with profiler.profile_operation(f"{kind.name}_stats", "stats"):
            computed = _windows(kind, rows, time_windows)
        with profiler.profile_operation("build_records", "stats"):
            records += _records(chunk, computed, kind.bank.total[rows].tolist(), now, final)
    return records


def _windows(kind: Kind, rows: IntArray, time_windows: Sequence[float]) -> list[_Computed]:
    """Every window's masks and metrics for one chunk of rows."""
    bank = kind.bank
    values = bank.values[:, rows]
    ts = bank.ts[rows]
    valid = bank.valid(rows)
    windows: list[tuple[dict[str, Any], BoolArray, BoolArray | None]] = [
        ({"kind": "count", "size": bank.width}, valid, None)
    ]
    full = bool(valid.all())
    # The count window's first and last event times; a time window's newest slot is the count
    # window's (it is inside every window of positive length), so only its first is computed.
    if full:
        first_all, last_all = ts.min(axis=1), ts.max(axis=1)
    else:
        first_all = np.min(ts, axis=1, where=valid, initial=np.inf)
        last_all = np.max(ts, axis=1, where=valid, initial=-np.inf)
    if time_windows:
        evicted = bank.total[rows] > bank.count[rows]
        for seconds in time_windows:
            after = ts > (last_all - seconds)[:, None]
            mask = after if full else valid & after
            # The buffer no longer reaches back `seconds`: values in the time window were
            # evicted by the count window.
            truncated = evicted & (first_all > last_all - seconds)
            windows.append(({"kind": "time", "seconds": seconds}, mask, truncated))
    computed: list[_Computed] = []
    valid_total = int(valid.sum())
    spec = kind.spec
    for window, mask, truncated in windows:
        counts = mask.sum(axis=1)
        if computed and int(counts.sum()) == valid_total:
            # A subset of the count window with as many slots is the same slots.
            base = computed[0]
            per_row = [dict(m) for m in base.per_row]
            first, last_ts = base.first, base.last
        elif not computed:
            per_row = spec.metrics(kind, values, mask, rows, False)
            first, last_ts = first_all, last_all
        else:
            if spec.order_free:
                limit = bank.width if spec.pack_wide else bank.width // 2
                packed, packed_mask, is_packed = _compact(values, mask, counts, limit)
                per_row = spec.metrics(kind, packed, packed_mask, rows, is_packed)
            else:
                per_row = spec.metrics(kind, values, mask, rows, False)
            first = np.min(ts, axis=1, where=mask, initial=np.inf)  # 4x quicker than np.where
            last_ts = np.where(counts > 0, last_all, -np.inf)
        computed.append(_Computed(window, truncated, per_row, counts, first, last_ts))
    return computed


def id_part(text: str) -> str:
    """One component of a summary id: ``|`` and ``\\`` escaped with a backslash, so that the
    joined id names one (group, run, stream, incarnation, window, seq) whatever the names hold."""
    if "|" not in text and "\\" not in text:
        return text
    return text.replace("\\", "\\\\").replace("|", "\\|")


def id_prefix(ref: Row) -> str:
    """``group|run|stream|incarnation|``: the part of a summary id fixed for one window's life."""
    return f"{id_part(ref.group)}|{id_part(ref.run_id)}|{id_part(ref.stream)}|{ref.incarnation}|"


def _incarnation_order(ref: Row) -> tuple[int, int]:
    """``"partition:offset"`` as numbers for ordering; an unknown one ("") first."""
    partition, _, offset = ref.incarnation.partition(":")
    try:
        return int(partition), int(offset)
    except ValueError:
        return -1, -1


def _records(
    refs: list[Row], computed: list[_Computed], totals: list[int], now: float, final: bool
) -> list[Record]:
    """Summary records: one per row and window, windows outermost; then each row's seq + 1."""
    records: list[Record] = []
    prefixes = [id_prefix(ref) for ref in refs]
    for c in computed:
        window = c.window
        tag = (
            f"count:{window['size']}"
            if window["kind"] == "count"
            else f"time:{window['seconds']:g}"
        )
        counts = c.counts.tolist()
        first = np.where(np.isfinite(c.first), c.first, np.nan).tolist()
        last = np.where(np.isfinite(c.last), c.last, np.nan).tolist()
        truncated = c.truncated.tolist() if c.truncated is not None else None
        for i, ref in enumerate(refs):
            prefix = prefixes[i]
            metrics = c.per_row[i]
            if ref.latest is not None:
                metrics["latest"] = ref.latest
            w = window if truncated is None else {**window, "truncated": truncated[i]}
            record: Record = {
                "type": "summary",
                "schema_version": 1,
                "id": f"{prefix}{tag}|{ref.seq}",
                "group": ref.group,
                "run_id": ref.run_id,
                "incarnation": ref.incarnation,
                "stream": ref.stream,
                "window": w,
                "count": counts[i],
                "total": totals[i],
                "metrics": metrics,
                "seq": ref.seq,
                "first_ts": first[i],
                "last_ts": last[i],
                "emitted_at": now,
                "final": final,
            }
            if ref.task is not None:
                record["task"] = ref.task
            records.append(record)
    for ref in refs:
        ref.seq += 1
    return records


# -- the ranks summary: all rank rows of a run -> one record ---------------------------------------
def summarise_ranks(
    kind: Kind,
    runs: list[list[Row]],
    now: float,
    *,
    final: bool,
    dropped: dict[str, int],
    profiler: Profiler,
) -> list[Record]:
    """One ``ranks`` record per run in ``runs`` (each a non-empty list of that run's rank rows),
    over the count window of every rank; then every listed row's ``seq`` becomes the record's
    ``seq`` + 1 (the record's seq is the largest of its rows': a rank that joins late starts at 0).

    One vectorised pass: the rows' per-rank median and p95 in row chunks (``stats.quantiles``),
    then the robust z of each rank's median against its run's (``stats.robust_z`` over a
    runs x ranks block). ``dropped``: per run, values of ranks beyond the per-run cap.
    """
    refs = [ref for run in runs for ref in run]
    bank = kind.bank
    rows = np.fromiter((r.row for r in refs), dtype=np.int64, count=len(refs))
    n = len(refs)
    counts = np.empty(n, dtype=np.int64)
    median = np.empty(n)
    p95 = np.empty(n)
    first = np.empty(n)
    last = np.empty(n)
    step = max(1, _CHUNK_SLOTS // bank.width)
    with profiler.profile_operation("rank_stats", "stats"):
        for start in range(0, n, step):
            chunk = rows[start : start + step]
            at = slice(start, start + len(chunk))
            valid = bank.valid(chunk)
            median[at], p95[at] = stats.quantiles(bank.values[0, chunk], valid, (0.5, 0.95))
            counts[at] = valid.sum(axis=1)
            ts = bank.ts[chunk]
            first[at] = np.where(valid, ts, np.inf).min(axis=1)
            last[at] = np.where(valid, ts, -np.inf).max(axis=1)
        sizes = np.fromiter((len(run) for run in runs), dtype=np.int64, count=len(runs))
        run_of = np.repeat(np.arange(len(runs)), sizes)
        position = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        block = np.full((len(runs), int(sizes.max(initial=1))), np.nan)
        block[run_of, position] = median
        present = np.zeros(block.shape, dtype=bool)
        present[run_of, position] = counts > 0
        robust = stats.robust_z(block, present)
        z = robust["z"][run_of, position]
        # Slowest first: by median descending (the same order as z), ties by rank order.
        slow = -np.where(present[run_of, position], median, -np.inf)
        order = np.lexsort((position, slow, run_of))
    ranks = np.fromiter((int(r.stream[len(RANK_PREFIX) :]) for r in refs), np.int64, count=n)
    totals = bank.total[rows]
    records: list[Record] = []
    starts = (np.cumsum(sizes) - sizes).tolist()
    with profiler.profile_operation("build_records", "stats"):
        for i, run in enumerate(runs):
            mine = order[starts[i] : starts[i] + len(run)]
            top = mine[:TOP_RANKS]
            strag = mine[z[mine] > STRAGGLER_Z]
            seq = max(r.seq for r in run)
            run_id = run[0].run_id
            # The run's life is that of its oldest rank row (a rank joining later has a later
            # incarnation; all of them end with the run), so the id is fixed for the life.
            oldest = min(run, key=_incarnation_order)
            lo, hi = float(first[mine].min()), float(last[mine].max())
            metrics: Record = {
                "ranks": len(run),
                "count": int(counts[mine].sum()),
                "median": float(robust["center"][i]),
                "mad": float(robust["mad"][i]),
                "scale": float(robust["scale"][i]),
                "max_z": float(np.nanmax(z[mine], initial=-np.inf)),
                "threshold": STRAGGLER_Z,
                "stragglers": ranks[strag[:TOP_RANKS]].tolist(),
                "straggler_count": int(strag.shape[0]),
                "slowest": [
                    {"rank": r, "count": c, "median": m, "p95": p, "z": zz}
                    for r, c, m, p, zz in zip(
                        ranks[top].tolist(),
                        counts[top].tolist(),
                        median[top].tolist(),
                        p95[top].tolist(),
                        z[top].tolist(),
                        strict=True,
                    )
                ],
                "dropped": dropped.get(run_id, 0),
            }
            records.append(
                {
                    "type": "summary",
                    "schema_version": 1,
                    "id": (
                        f"{id_part(oldest.group)}|{id_part(run_id)}|{RANKS_STREAM}|"
                        f"{oldest.incarnation}|count:{bank.width}|{seq}"
                    ),
                    "group": oldest.group,
                    "run_id": run_id,
                    "incarnation": oldest.incarnation,
                    "stream": RANKS_STREAM,
                    "window": {"kind": "count", "size": bank.width},
                    "count": metrics["count"],
                    "total": int(totals[mine].sum()),
                    "metrics": metrics,
                    "seq": seq,
                    "first_ts": lo if np.isfinite(lo) else math.nan,
                    "last_ts": hi if np.isfinite(hi) else math.nan,
                    "emitted_at": now,
                    "final": final,
                }
            )
            for ref in run:
                ref.seq = seq + 1
    return records
