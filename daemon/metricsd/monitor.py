"""The core: ``ingest(events, now)`` and ``due(now) -> summaries``, under the profiler.

This module is the registry of (run, stream) rows, the routing of event batches to them, and
bounded memory (eviction). What a stream kind is, and how windows become summary records, lives
in ``metricsd.windows`` (the ``KINDS`` table and ``summarise``).

Plan
----
Feed-and-poll, no I/O (h11 style): the shell decodes records into events, hands them over with
``ingest`` and, once per tick, asks ``due(now)`` for the summary records to publish.

- Every (run, stream) owns one row of a ring-buffer bank; there is one bank per stream kind
  (batch_time, binary, multiclass, regression, cv, attention, features). Rows are recycled through
  the banks' free lists when a run ends or its partition goes away.
- ``ingest`` groups a batch by row first (a ``windows.Batch``: each event goes to its kind's
  ``collect``) and then writes each row once (one slice assignment per channel), so the cost per
  event is a dict lookup and a list append. Per-event analyses (attention, features) run
  vectorised over the whole batch (the kind's ``build``).
- The daemon's hot path splits that in two: ``collect(records, decoder, now)`` decodes records
  (``Decoder.decode_hot``) straight into the pending rows, without an event object for the
  common events (batch_time and scalar without a rank; any other event is collected as
  ``ingest`` collects it, at its place), and ``ingest_intake`` writes them. Same rows, same
  values in the same order, same run_end splits and incarnations as ``ingest`` over the events
  of the valid records (tests/test_fastpath.py). The pipeline profiles ``collect`` as
  ``decode`` and ``ingest_intake`` as ``ingest``.
- ``due`` computes, for each kind, the statistics of every row that received data since the
  previous call, in one vectorised pass per window: the count window (the newest N values) and the
  time windows (values whose event time is within T seconds of the row's newest event time:
  ``ts > last_ts - T``). A time window whose mask equals the count window reuses its result.
- ``run_end`` ends the run: it is no longer tracked and its rows are **retired**, their final
  summaries (``final: true``) due at the next ``due``.
- Bounded memory: at most ``max_runs`` runs are tracked. Each run's last activity is the ``now``
  of the latest ingest that touched it, kept in an ordered dict (least recent first; one
  ``move_to_end`` per run and batch, nothing per event). A new run beyond ``max_runs`` first
  evicts the least recently active run; ``due`` evicts runs idle longer than ``idle_timeout``.
  Eviction is ``run_end``. A run keeps at most ``MAX_SPLITS`` prediction streams and
  ``MAX_SCALARS`` scalar names (a new one closes, i.e. retires, the oldest of its group), so
  every bank is capped: ``max_runs`` rows (``max_runs * MAX_SPLITS`` for the three prediction
  kinds, ``max_runs * MAX_SCALARS`` for scalars) plus a reserve of ``max_runs / 8`` retired rows.
  Banks never shrink; freed rows are reused.
- Retired rows keep their bank row until their finals are computed: for every row retired since
  the previous ``due``, in one statistics pass per kind, in ``due`` (or at once when a kind's
  reserve is full; those finals wait in ``backlog``, which the shell watches to publish early).
  Churn costs passes per tick, not one per evicted run.

Summary identity for de-duplication: (group, run_id, stream, incarnation, window, seq); ``id``
joins the six (``|`` inside a name escaped, ``windows.id_part``), so one id names one content:

- ``group`` is the daemon's consumer group: two daemons of different groups writing to one output
  topic never share an id.
- ``incarnation`` names one life of a (run, stream) window: ``"<partition>:<offset>"``, the input
  position of the record whose event created the row. A run that comes back after ``run_end`` or
  an eviction (or a stream re-opened after ``MAX_STREAMS`` closed it, or after a task change)
  starts a new row from a later record, hence a new incarnation, and ``seq`` from 0 again. Derived
  from the input, not from a counter: a restart that re-reads the same records re-derives the
  same incarnations, so re-published summaries keep their ids and stay de-duplicable, and nothing
  has to be persisted for runs that are gone. One record feeds one row, so no two rows share a
  position. Restored rows keep theirs (the changelog carries it). Where the position is unknown the
  incarnation is ``""``: rows restored from a changelog written before incarnations (their old
  summaries had ids without group and incarnation, so nothing collides), and events ingested
  without ``offsets`` (tests and tools; the daemon always passes them). Only positioned ingest
  makes ids unique across the lives of a run.
- ``seq`` counts the ticks that produced summaries for that row, shared by all its windows.

Records are plain dicts ready for ``orjson.dumps``: undefined statistics are NaN floats, which
orjson writes as ``null`` (JSON never carries NaN or Infinity).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from metricsd.changelog import CHUNK_VALUES, RowState, rewrite_from, slots_for
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime, Decoder, Event, InvalidEvent, RunEnd, Scalar
from metricsd.profiler import Profiler
from metricsd.recency import Recency
from metricsd.windows import KINDS, Batch, Kind, Pending, Record, Row, summarise, summarise_ranks

__all__ = [
    "MAX_FUTURE",
    "MAX_SCALARS",
    "MAX_SPLITS",
    "MAX_STREAMS",
    "RESERVE_FRACTION",
    "Intake",
    "Monitor",
    "Offsets",
]

# Prediction streams (splits) one run may hold at once: bounds the rows of the prediction banks.
MAX_SPLITS = 8
# An event time further ahead of processing time than this is a broken clock (or ts in ms):
# it would leave its run's time windows empty until real time catches up, so ``now`` replaces it.
MAX_FUTURE = 86_400.0
MAX_SCALARS = 64  # scalar names per run (HF and Lightning log a dozen or two)
# Streams per run in each kind group; a new stream beyond it closes the group's oldest one.
MAX_STREAMS = {"prediction": MAX_SPLITS, "scalar": MAX_SCALARS}


# Rows of one kind that may be retired (ended, evicted: final summaries due) at once: max_runs /
# RESERVE_FRACTION, rounded up, the bank's rows beyond its cap. When a kind's reserve is full the
# finals of every retired row are computed before the tick, in one pass per kind: the cost is
# per pass, not per run, and a bank holds at most max_runs / 8 rows more than its cap.
RESERVE_FRACTION = 8


class Offsets(Protocol):
    """Input offsets of a batch's events by index (a list, or a view of the consumed records)."""

    def __getitem__(self, index: int, /) -> int: ...


class _Record(Protocol):
    """What ``Monitor.collect`` reads of an input record (a consumer record)."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(eq=False, slots=True)
class Intake:
    """Records decoded and collected by ``Monitor.collect``, for ``Monitor.ingest_intake``.

    ``batches[i]`` is flushed, then run ``ends[i]`` ended (a ``run_end`` splits the records as
    in ``ingest``); the last batch has no end. ``events`` counts the valid records, ``by_type``
    them by event class; ``bad`` holds each rejected record with its error, in input order.
    """

    batches: list[Batch]
    ends: list[str] = field(default_factory=list)
    events: int = 0
    by_type: Counter[type] = field(default_factory=Counter)
    bad: list[tuple[InvalidEvent, Any]] = field(default_factory=list)
    clamped: int = 0  # event times beyond now + MAX_FUTURE, replaced by now


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
        group: str = "",
        chunk_values: int = CHUNK_VALUES,
    ) -> None:
        """``track_changes``: remember changed and removed rows for ``state_changes()`` (on when
        the window state is backed by a changelog; ``chunk_values``: its chunk size).
        ``group``: the consumer group, part of every summary id and record."""
        self.settings = settings
        self._chunk = chunk_values
        self._slots = slots_for(settings.window, chunk_values)
        self.group = group
        self.track_changes = track_changes
        self.profiler = profiler if profiler is not None else Profiler(enabled=False)
        # One row per run in each single-stream kind, up to MAX_STREAMS[group] in grouped kinds,
        # plus the reserve for rows retired since the last summaries (``_retire``).
        self._reserve = max(1, -(-settings.max_runs // RESERVE_FRACTION))
        self._kinds = [
            Kind(
                spec,
                settings.window,
                max_rows=settings.max_runs
                * (settings.max_ranks if spec.group == "rank" else MAX_STREAMS.get(spec.group, 1))
                + self._reserve,
                threshold=settings.threshold,
            )
            for spec in KINDS
        ]
        # Rows of ended or evicted streams, per kind: still in their bank, final summaries due.
        self._retired: dict[str, list[Row]] = {kind.name: [] for kind in self._kinds}
        self._kind = {kind.name: kind for kind in self._kinds}
        self._ranks = self._kind["rank"]
        # Ranks: values of ranks beyond max_ranks, per run (in its ranks summary) and in all.
        self._rank_dropped: dict[str, int] = {}
        self.rank_values_dropped = 0
        self._ranks_used = False
        # Event type -> the collect function of the kinds it feeds (decided once, here).
        self._collect = {spec.source: spec.collect for spec in reversed(KINDS)}
        self._rows: dict[tuple[str, str], Row] = {}
        self._runs: dict[str, list[Row]] = {}
        self._partition_of: dict[str, int] = {}
        self._ready: list[Record] = []  # final summaries computed before a due (reserve full)
        # Rows changed or removed since the last ``state_changes()`` (for the changelog).
        self._changed: dict[tuple[str, str], Row] = {}
        self._removed: dict[tuple[str, str], int] = {}
        self.events_ingested = 0
        self.values_ingested = 0
        self.future_ts_clamped = 0  # event times beyond now + MAX_FUTURE, replaced by now
        # Bounded memory. Tracked runs by last activity, least recent first (same keys as _runs).
        self._recency = Recency(settings.idle_timeout)
        self._unstamped: list[str] = []
        # Input offsets of the batch being ingested by event index (None: unknown), for the
        # incarnation of new rows (a pending row keeps the index of its first event).
        self._offsets: Offsets | None = None
        self.runs_evicted_idle = 0
        self.runs_evicted_capacity = 0
        self.streams_evicted = 0  # splits and scalar names closed because of MAX_STREAMS
        self.retire_passes = 0  # final-summary passes forced between ticks by a full reserve

    # -- introspection ---------------------------------------------------------------------
    @property
    def runs_tracked(self) -> int:
        return len(self._runs)

    @property
    def runs_evicted(self) -> dict[str, int]:
        """Runs evicted (final summaries, then freed) by reason: ``idle`` and ``capacity``."""
        return {"idle": self.runs_evicted_idle, "capacity": self.runs_evicted_capacity}

    @property
    def backlog(self) -> int:
        """Final summaries computed and waiting for the next ``due``: non-zero only when so many
        streams ended or were evicted since the last ``due`` that the reserve filled (heavy run
        churn); the shell then publishes early (back-pressure, docs/state.md)."""
        return len(self._ready)

    @property
    def rows_tracked(self) -> int:
        return len(self._rows)

    @property
    def window_bytes(self) -> int:
        """Bytes of all window arrays (what memory use should be proportional to). The rank bank
        counts once a run sent ranks: until then its arrays are zero pages never touched."""
        return sum(
            kind.bank.nbytes for kind in self._kinds if kind is not self._ranks or self._ranks_used
        )

    def runs_on(self, partitions: Iterable[int]) -> list[str]:
        wanted = set(partitions)
        return [run for run, p in self._partition_of.items() if p in wanted]

    # -- ingest ----------------------------------------------------------------------------
    def ingest(
        self,
        events: Sequence[Event],
        now: float,
        partition: int = -1,
        offsets: Offsets | None = None,
    ) -> None:
        """Add a batch of valid events (from one partition) to the windows.

        Values are grouped per row and written with one bulk append per row. A ``run_end`` in the
        batch first writes everything before it, then emits that run's final summaries.
        ``offsets[i]`` is the input offset of ``events[i]`` (read only for events that start a
        row: it names the row's incarnation); None leaves incarnations empty (see above).
        """
        with self.profiler.profile_operation("ingest", "ingest"):
            self._offsets = offsets
            try:
                self._ingest(events, now, partition)
            finally:
                self._offsets = None

    def _ingest(self, events: Sequence[Event], now: float, partition: int) -> None:
        self._recency.advance(now)
        collect = self._collect
        batch = Batch(self._kind)
        values = 0
        for i, ev in enumerate(events):
            if type(ev) is RunEnd:
                values += self._flush(batch, partition, now)
                batch = Batch(self._kind)
                self.end_run(ev.run_id, now)
                continue
            collector = collect.get(type(ev))
            if collector is None:  # pragma: no cover - the decoder yields only the types above
                raise TypeError(f"not an event: {ev!r}")
            ts = ev.ts
            if ts is None or ts > now + MAX_FUTURE:
                if ts is not None:
                    self.future_ts_clamped += 1
                ts = now
            batch.position = i
            collector(batch, ev, ts)
        values += self._flush(batch, partition, now)
        self.events_ingested += len(events)
        self.values_ingested += values

    # -- the hot path: records -> pending rows, without event objects ---------------------
    def collect(self, records: Iterable[_Record], decoder: Decoder, now: float) -> Intake:
        """Decode ``records`` and group their values by row, ready for ``ingest_intake``.

        The common events (batch_time and scalar without a rank: ``Decoder.decode_hot``) go
        straight into their pending rows; every other event is collected as ``ingest`` collects
        it, at its place in the input, so the rows, their values' order and the ``run_end``
        splits are exactly those of ``ingest`` over the valid records' events. Rejected records
        are returned (``Intake.bad``), not collected. Nothing of the window state changes here.
        """
        decode = decoder.decode_hot
        kinds = self._kind
        collect = self._collect
        batch = Batch(kinds)
        intake = Intake([batch])
        bad = intake.bad
        times = batch.index["batch_time"]
        scalars = batch.index["scalar"]
        limit = now + MAX_FUTURE
        others: list[type] = []
        good = hot_times = hot_scalars = clamped = 0
        for record in records:
            try:
                got = decode(record.key, record.value)
            except InvalidEvent as exc:
                bad.append((exc, record))
                continue
            if type(got) is tuple:
                run_id, ts, values, name = got
                if ts is None:
                    ts = now
                elif ts > limit:
                    clamped += 1
                    ts = now
                if name is None:
                    hot_times += 1
                    pending = times.get(run_id)
                    if pending is None:
                        batch.position = good
                        pending = batch.add(run_id, run_id, "batch_time", "batch_time", None)
                else:
                    hot_scalars += 1
                    key = (run_id, name)
                    pending = scalars.get(key)
                    if pending is None:
                        batch.position = good
                        pending = batch.add(key, run_id, f"scalar/{name}", "scalar", None)
                if type(values) is float:
                    pending.items.append(values)
                    pending.ts.append(ts)
                else:
                    pending.items.extend(values)  # type: ignore[arg-type]  # a list here
                    pending.ts.extend([ts] * len(values))  # type: ignore[arg-type]
            else:
                ev: Event = got  # type: ignore[assignment]
                others.append(type(ev))
                if type(ev) is RunEnd:
                    intake.ends.append(ev.run_id)
                    batch = Batch(kinds)
                    intake.batches.append(batch)
                    times = batch.index["batch_time"]
                    scalars = batch.index["scalar"]
                else:
                    ts = ev.ts
                    if ts is None:
                        ts = now
                    elif ts > limit:
                        clamped += 1
                        ts = now
                    batch.position = good
                    collect[type(ev)](batch, ev, ts)
            good += 1
        intake.events = good
        intake.clamped = clamped
        by_type = intake.by_type
        if hot_times:
            by_type[BatchTime] = hot_times
        if hot_scalars:
            by_type[Scalar] = hot_scalars
        if others:
            by_type.update(others)
        return intake

    def ingest_intake(
        self, intake: Intake, now: float, partition: int = -1, offsets: Offsets | None = None
    ) -> None:
        """Write what ``collect`` gathered, as ``ingest`` writes its events (``offsets[i]``: the
        input offset of the i-th valid record)."""
        with self.profiler.profile_operation("ingest", "ingest"):
            self._offsets = offsets
            try:
                self._recency.advance(now)
                values = 0
                for batch, run_id in itertools.zip_longest(intake.batches, intake.ends):
                    values += self._flush(batch, partition, now)
                    if run_id is not None:
                        self.end_run(run_id, now)
                self.future_ts_clamped += intake.clamped
                self.events_ingested += intake.events
                self.values_ingested += values
            finally:
                self._offsets = None

    def _flush(self, batch: Batch, partition: int, now: float) -> int:
        """Write the batch's rows: runs marked active first (making room at once), then each
        pending row created if new and appended to, kind group by kind group. Returns the number
        of values written."""
        if not batch.rows:
            return 0
        values = 0
        activity: dict[int, list[str]] = {}
        writes: dict[int, list[Pending]] = {}
        for p in batch.rows:
            spec = p.kind.spec
            activity.setdefault(spec.activity_rank, []).append(p.run_id)
            writes.setdefault(spec.write_rank, []).append(p)
        ordered = (activity[rank] for rank in sorted(activity))
        self._mark_active(dict.fromkeys(itertools.chain.from_iterable(ordered)), now)
        for rank in sorted(writes):
            group = writes[rank]
            by_kind: dict[Kind, list[Pending]] = {}
            for p in group:
                by_kind.setdefault(p.kind, []).append(p)
            # Each kind's rows built at once (one vectorised analysis), consumed in group order.
            built = {
                kind: iter(kind.spec.build(rows, self.profiler)) for kind, rows in by_kind.items()
            }
            for p in group:
                block, ts, latest = next(built[p.kind])
                if p.kind is self._ranks and not self._rank_room(p.run_id, p.stream):
                    self._rank_dropped[p.run_id] = self._rank_dropped.get(p.run_id, 0) + len(ts)
                    self.rank_values_dropped += len(ts)
                    continue
                ref = self._row(p.run_id, p.stream, p.kind, partition, p.task, now, p.first)
                p.kind.bank.append(ref.row, block, ts)
                values += ts.shape[0]
                if latest is not None:
                    ref.latest = latest
                self._touch(ref)
        return values

    def _row(
        self,
        run_id: str,
        stream: str,
        kind: Kind,
        partition: int,
        task: str | None = None,
        now: float | None = None,
        first: int | None = None,
    ) -> Row:
        """The row of (run, stream), created if new: room is made first (capacity eviction,
        ``MAX_SPLITS``). ``now`` None (a restore, outside ingest) makes a new run active as of
        the next ``ingest`` or ``due``. ``first``: the event of the batch being ingested that
        creates the row, by index (its position is the incarnation); None for a restore, which
        sets it."""
        ref = self._rows.get((run_id, stream))
        if ref is not None and ref.kind is kind:
            return ref
        if ref is not None:
            # The task of a prediction stream changed (e.g. binary -> regression): the old window
            # is meaningless for the new task, so it is closed and a new one starts.
            self._drop(ref)
        elif kind.spec.group in MAX_STREAMS and run_id in self._runs:
            at = self._recency.clock if now is None else now
            self._limit_streams(run_id, kind.spec.group, at)
        if run_id not in self._runs:
            self._admit(run_id, now)
        incarnation = "" if first is None else self._incarnation(first, partition)
        ref = Row(
            run_id, stream, kind, kind.bank.allocate(), task,
            incarnation=incarnation, group=self.group,
        )  # fmt: skip
        self._ranks_used = self._ranks_used or kind is self._ranks
        self._rows[(run_id, stream)] = ref
        self._runs.setdefault(run_id, []).append(ref)
        if partition >= 0 and self._partition_of.setdefault(run_id, partition) != partition:
            # The run's events now come from another partition (a producer not keyed by run
            # id): its state moves to that changelog partition, so every row is written whole.
            self._partition_of[run_id] = partition
            for other in self._runs[run_id]:
                other.saved = 0
        return ref

    def _incarnation(self, first: int, partition: int) -> str:
        """``"<partition>:<offset>"`` of the event at index ``first`` of the batch ingested."""
        offsets = self._offsets
        if offsets is None or first < 0:
            return ""
        return f"{partition}:{offsets[first]}"

    # -- summaries -------------------------------------------------------------------------
    def due(self, now: float) -> list[Record]:
        """Summaries for every (run, stream) with data since the previous call, plus finals.

        Each such stream gets one record per window (count, then each time window) sharing one
        ``seq``. Streams without new data produce nothing. Runs idle for longer than
        ``idle_timeout`` are evicted first (their final summaries are among the records).
        """
        self._recency.advance(now)
        idle = self._recency.idle(now)
        if idle:
            self._evict(idle, now, "idle")
        self._summarise_retired(now)
        records, self._ready = self._ready, []
        for kind in self._kinds:
            if kind.dirty:
                refs = list(kind.dirty.values())
                kind.dirty.clear()
                records.extend(self._summaries(kind, refs, now, final=False))
        return records

    def _summaries(self, kind: Kind, refs: list[Row], now: float, *, final: bool) -> list[Record]:
        if kind is self._ranks:
            return self._ranks_summaries(refs, now, final=final)
        return summarise(
            kind,
            refs,
            now,
            final=final,
            time_windows=self.settings.time_windows,
            profiler=self.profiler,
        )

    def _ranks_summaries(self, refs: list[Row], now: float, *, final: bool) -> list[Record]:
        """One ``ranks`` record per run among ``refs``, over ALL its rank rows (a changed rank
        re-ranks every other); those rows are no longer dirty."""
        if final:
            groups = self._retired_lives(refs)
        else:
            runs: dict[str, list[Row]] = {}
            for ref in refs:
                if ref.run_id not in runs:
                    mine = [r for r in self._runs[ref.run_id] if r.kind is self._ranks]
                    runs[ref.run_id] = mine
                    for r in mine:
                        self._ranks.dirty.pop(r.row, None)
            groups = list(runs.values())
        return summarise_ranks(
            self._ranks, groups, now, final=final,
            dropped=self._rank_dropped, profiler=self.profiler,
        )  # fmt: skip

    @staticmethod
    def _retired_lives(refs: list[Row]) -> list[list[Row]]:
        """Retired rank rows grouped by run life: a run's rows are retired together (run_end or
        eviction retires every row of the run at once), so one life is a contiguous stretch of
        one run id in which each rank appears once; a rank seen again starts the next life of
        the same run (it ended, came back and ended again between two ticks)."""
        groups: list[list[Row]] = []
        streams: set[str] = set()
        for ref in refs:
            if not groups or groups[-1][0].run_id != ref.run_id or ref.stream in streams:
                groups.append([])
                streams = set()
            groups[-1].append(ref)
            streams.add(ref.stream)
        return groups

    def _rank_room(self, run_id: str, stream: str) -> bool:
        """Whether the rank row (run, stream) exists or the run has fewer than max_ranks."""
        if (run_id, stream) in self._rows or run_id not in self._runs:
            return True
        ranks = sum(1 for r in self._runs[run_id] if r.kind is self._ranks)
        return ranks < self.settings.max_ranks

    def end_run(self, run_id: str, now: float) -> None:
        """Queue the run's final summaries (``final: true``) for ``due``; the run is no longer
        tracked (its rows are freed once the finals are computed)."""
        self._end_runs([run_id], now)

    def _end_runs(self, run_ids: Iterable[str], now: float) -> None:
        """``end_run`` for several runs at once."""
        ended: list[Row] = []
        for run_id in run_ids:
            ended.extend(self._runs.get(run_id, ()))
        self._retire(ended, now)

    def _retire(self, refs: Iterable[Row], now: float) -> None:
        """End these rows: forgotten at once (a returning run or stream gets a new row and a new
        incarnation), their final summaries computed later, for every row retired in between,
        in one statistics pass per kind: at the next ``due``, or now if a kind's reserve is full
        (the bank holds at most its cap of live rows plus the reserve of retired ones)."""
        full = False
        for ref in refs:
            self._drop(ref, release=False)
            retired = self._retired[ref.kind.name]
            retired.append(ref)
            full = full or len(retired) >= self._reserve
        if full:
            self.retire_passes += 1
            self._summarise_retired(now)

    def _summarise_retired(self, now: float) -> None:
        """The final summaries of every retired row (one pass per kind) into ``_ready``; then the
        rows go back to their banks."""
        for kind in self._kinds:
            retired = self._retired[kind.name]
            if retired:
                self._ready.extend(self._summaries(kind, retired, now, final=True))
                for ref in retired:
                    kind.bank.release(ref.row)
                self._retired[kind.name] = []

    # -- bounded memory --------------------------------------------------------------------
    def _mark_active(self, runs: Iterable[str], now: float) -> None:
        """Move the runs of one flush to the recent end, then make room for its new runs at once
        (one statistics pass per kind for all the runs evicted, instead of one per new run)."""
        new = self._recency.touch(runs, now)
        excess = len(self._runs) + new - self.settings.max_runs
        if excess > 0:
            # Runs of this flush are at the recent end: they go only if the flush alone has more
            # runs than max_runs (and then ``_admit`` evicts one by one as rows are created).
            self._evict(self._recency.oldest(excess), now, "capacity")

    def _admit(self, run_id: str, now: float | None) -> None:
        """Start tracking a new run, evicting the least recently active runs to stay in bounds."""
        at = self._recency.clock if now is None else now
        excess = len(self._runs) + 1 - self.settings.max_runs
        if excess > 0:
            self._evict(self._recency.oldest(excess), at, "capacity")
        self._recency.add(run_id, now)

    def _limit_streams(self, run_id: str, group: str, now: float) -> None:
        """Before a run gets a new stream of ``group`` (a prediction split, a scalar name):
        close its oldest one of that group, with a final summary, if it has MAX_STREAMS."""
        splits = [ref for ref in self._runs[run_id] if ref.kind.spec.group == group]
        if len(splits) >= MAX_STREAMS[group]:
            self.streams_evicted += 1
            self._retire([splits[0]], now)

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
        self._summarise_retired(now)
        for run_id in self.runs_on(partitions):
            for ref in list(self._runs.get(run_id, ())):
                if ref.row in ref.kind.dirty:
                    del ref.kind.dirty[ref.row]
                    self._ready.extend(self._summaries(ref.kind, [ref], now, final=False))
                self._drop(ref, tombstone=False)
        records, self._ready = self._ready, []
        return records

    def _touch(self, ref: Row) -> None:
        ref.kind.dirty[ref.row] = ref
        if self.track_changes:
            self._changed[(ref.run_id, ref.stream)] = ref

    def _drop(self, ref: Row, *, tombstone: bool = True, release: bool = True) -> None:
        """Forget a row; ``tombstone`` records its removal for the changelog (not on a revoke,
        where the state stays for the partition's next owner); ``release`` gives its bank row
        back (not when it is retired: its final summaries still read it)."""
        key = (ref.run_id, ref.stream)
        self._changed.pop(key, None)
        if tombstone and self.track_changes:
            self._removed[key] = self._partition_of.get(ref.run_id, -1)
        ref.kind.dirty.pop(ref.row, None)
        if release:
            ref.kind.bank.release(ref.row)
        del self._rows[(ref.run_id, ref.stream)]
        run_refs = self._runs[ref.run_id]
        run_refs.remove(ref)
        if not run_refs:
            del self._runs[ref.run_id]
            self._rank_dropped.pop(ref.run_id, None)
            self._partition_of.pop(ref.run_id, None)
            self._recency.forget(ref.run_id)

    # -- state (changelog) ------------------------------------------------------------------
    def state_changes(self) -> tuple[list[tuple[int, RowState]], list[tuple[int, str, str]]]:
        """Rows changed since the previous call as ``(partition, RowState)``, and rows removed
        (ended, evicted) as ``(partition, run_id, stream)``; then starts a new change set.

        A row removed and created again in between appears only as changed. A changed row holds
        only the values its changelog write needs (those since ``rewrite_from`` of its previous
        state), so every result must be written, in order: one not written leaves a hole.
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

    def _state_of(self, ref: Row) -> RowState:
        """The row for the changelog: its values since the chunk that was incomplete when it
        was last handed over (``rewrite_from``), all of them for a new row."""
        snapshot = ref.kind.bank.snapshot(ref.row, rewrite_from(ref.saved, self._chunk))
        ref.saved = snapshot.total
        return RowState(
            run_id=ref.run_id, stream=ref.stream, kind=ref.kind.name, task=ref.task,
            seq=ref.seq, latest=ref.latest, snapshot=snapshot, incarnation=ref.incarnation,
            chunk=self._chunk, slots=self._slots,
        )  # fmt: skip

    def restore(self, state: RowState, partition: int) -> None:
        """Rebuild a row from the changelog; it is neither dirty nor changed afterwards. Its
        next write is whole unless the changelog holds it in this monitor's chunks and slots
        (a version 1 row, or one written with another window or chunk size, is rewritten)."""
        kind = self._kind[state.kind]
        ref = self._row(state.run_id, state.stream, kind, partition, state.task)
        kind.bank.restore(ref.row, state.snapshot)
        same = (state.version, state.chunk, state.slots) == (2, self._chunk, self._slots)
        ref.saved = state.snapshot.total if same else 0
        ref.seq = state.seq
        ref.latest = state.latest
        ref.incarnation = state.incarnation or ""
        self._changed.pop((state.run_id, state.stream), None)
        self._removed.pop((state.run_id, state.stream), None)
