"""The ingest hot path (``Monitor.collect`` + ``ingest_intake``) against the event path
(``Decoder.decode`` + ``Monitor.ingest``): the same records give the same windows, summaries,
incarnations, counters, dead letters and state, whatever mix of common and unusual events
(ranks, other types, run_end, bad records, missing or future event times, keys) they hold.

Accept/reject agreement of ``decode_hot`` with the schema is in tests/test_events.py (every
verdict there is reached by both decoders).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.config import MonitorSettings
from metricsd.events import BatchTime, Decoder, InvalidEvent, Scalar
from metricsd.monitor import MAX_FUTURE, Monitor

NOW = 1_000_000.0
DECODER = Decoder(max_array=4)


@dataclass(frozen=True)
class Rec:
    """A consumer record as the monitor reads it."""

    key: bytes | None
    value: bytes | None
    offset: int


def _old(monitor: Monitor, records: list[Rec], now: float, partition: int) -> dict[str, Any]:
    """What the pipeline did before the hot path: decode each record, ingest the events."""
    events, bad, good = [], [], []
    for r in records:
        try:
            events.append(DECODER.decode(r.key, r.value))
            good.append(r.offset)
        except InvalidEvent as exc:
            bad.append((exc.reason, exc.detail, r.offset))
    monitor.ingest(events, now, partition, good)
    return {"bad": bad, "events": len(events), "by_type": Counter(map(type, events))}


def _new(monitor: Monitor, records: list[Rec], now: float, partition: int) -> dict[str, Any]:
    intake = monitor.collect(records, DECODER, now)
    rejected = {id(r) for _, r in intake.bad}
    good = [r.offset for r in records if id(r) not in rejected]
    monitor.ingest_intake(intake, now, partition, good)
    bad = [(exc.reason, exc.detail, r.offset) for exc, r in intake.bad]
    return {"bad": bad, "events": intake.events, "by_type": intake.by_type}


def _nan_safe(value: Any) -> Any:
    """Records as JSON sees them (NaN -> null), so that equal records compare equal."""
    return orjson.loads(orjson.dumps(value))


def _state(monitor: Monitor, now: float) -> dict[str, Any]:
    changed, removed = monitor.state_changes()
    return {
        "due": _nan_safe(monitor.due(now)),
        "changed": sorted(
            (
                p,
                s.run_id,
                s.stream,
                s.kind,
                s.task or "",
                s.incarnation or "",
                s.seq,
                s.snapshot.values.tobytes(),
                s.snapshot.ts.tobytes(),
                s.snapshot.total,
            )
            for p, s in changed
        ),
        "removed": sorted(removed),
        "counters": (
            monitor.events_ingested,
            monitor.values_ingested,
            monitor.future_ts_clamped,
            monitor.runs_tracked,
            monitor.rows_tracked,
            monitor.runs_evicted,
            monitor.streams_evicted,
            monitor.rank_values_dropped,
        ),
    }


def _monitor(max_runs: int) -> Monitor:
    return Monitor(
        MonitorSettings(window=8, time_windows=(5.0,), max_runs=max_runs, max_ranks=2),
        track_changes=True,
        group="g",
    )


# -------------------------------------------------------------------- record strategies
runs = st.sampled_from(["a", "b", "c", "d|e"])
times = st.none() | st.sampled_from([0, 1.5, NOW - 3.0, NOW - 1.0, NOW + MAX_FUTURE + 1.0, -1.0])
seconds = st.sampled_from([0.25, 0, 3, -0.5, True, "1", None]) | st.lists(
    st.sampled_from([0.5, 1, 2.0, -1.0, None]), min_size=0, max_size=5
)
values = st.sampled_from([0.5, 2, None, math.inf, "x"]) | st.lists(
    st.sampled_from([0.5, 1, None, True]), min_size=0, max_size=5
)


@st.composite
def docs(draw: st.DrawFn) -> Any:
    run = draw(runs)
    kind = draw(
        st.sampled_from(["batch_time"] * 4 + ["scalar"] * 3 + ["run_end", "cv_fold", "prediction"])
    )
    doc: dict[str, Any] = {"type": kind, "run_id": run}
    ts = draw(times)
    if ts is not None or draw(st.booleans()):
        doc["ts"] = ts
    if kind == "batch_time":
        doc["seconds"] = draw(seconds)
        if draw(st.integers(0, 4)) == 0:
            doc["rank"] = draw(st.sampled_from([0, 1, 2, 3, None, -1, 1.0]))
        if draw(st.booleans()):
            doc["step"] = draw(st.sampled_from([0, 7, -1, 2.0, None]))
    elif kind == "scalar":
        doc["name"] = draw(st.sampled_from(["loss", "lr", "acc|1", ""]))
        doc["value"] = draw(values)
        if draw(st.integers(0, 5)) == 0:
            doc["rank"] = draw(st.sampled_from([0, None, -1]))
    elif kind == "cv_fold":
        doc.update(fold=draw(st.integers(0, 3)), train_loss=0.5, val_loss=0.75)
    elif kind == "prediction":
        doc.update(
            task="binary", y_true=[0, 1], y_pred=[1, 1], split=draw(st.sampled_from(["val", "t"]))
        )
    return doc


@st.composite
def records(draw: st.DrawFn) -> list[Rec]:
    out = []
    for offset in range(draw(st.integers(0, 25))):
        doc = draw(docs())
        value = orjson.dumps(doc) if draw(st.integers(0, 15)) else b'{"type":"batch_time",'
        key = draw(
            st.sampled_from([None, doc["run_id"].encode(), b"other", b"\xff"])
            if draw(st.integers(0, 5)) == 0
            else st.just(doc["run_id"].encode())
        )
        out.append(Rec(key, value, 100 + offset))
    return out


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(records(), min_size=1, max_size=3), max_runs=st.sampled_from([2, 100]))
def test_hot_path_equals_event_path(batches: list[list[Rec]], max_runs: int) -> None:
    """Batch after batch, both paths leave the same state and give the same summaries."""
    old, new = _monitor(max_runs), _monitor(max_runs)
    for i, batch in enumerate(batches):
        now = NOW + i
        assert _new(new, batch, now, i % 2) == _old(old, batch, now, i % 2)
        assert _state(new, now) == _state(old, now)


def test_hot_path_collects_common_events_without_event_objects() -> None:
    """Plain batch_time and scalar records take the hot path; a rank or another type does not."""
    assert (
        type(DECODER.decode_hot(b"r", b'{"type":"batch_time","run_id":"r","seconds":1}')) is tuple
    )
    assert DECODER.decode_hot(None, b'{"type":"scalar","run_id":"r","name":"n","value":null}')[
        :2
    ] == ("r", None)
    ranked = DECODER.decode_hot(None, b'{"type":"batch_time","run_id":"r","seconds":1,"rank":0}')
    assert isinstance(ranked, BatchTime) and ranked.rank == 0
    assert isinstance(
        DECODER.decode_hot(None, b'{"type":"scalar","run_id":"r","name":"n","value":1,"rank":0}'),
        Scalar,
    )


def test_run_end_splits_the_hot_path_batch() -> None:
    """Values before a run_end are final summaries of the ended run; after it, a new life."""
    monitor = _monitor(100)
    rows = [
        b'{"type":"batch_time","run_id":"a","ts":10,"seconds":1}',
        b'{"type":"run_end","run_id":"a"}',
        b'{"type":"batch_time","run_id":"a","ts":11,"seconds":2}',
    ]
    records = [Rec(b"a", v, 7 + i) for i, v in enumerate(rows)]
    intake = monitor.collect(records, DECODER, NOW)
    monitor.ingest_intake(intake, NOW, 3, [r.offset for r in records])
    due = [r for r in monitor.due(NOW) if r["window"]["kind"] == "count"]
    assert [(r["final"], r["incarnation"], r["metrics"]["mean"]) for r in due] == [
        (True, "3:7", 1.0),
        (False, "3:9", 2.0),
    ]


@pytest.mark.parametrize(
    "value",
    [None, b"", b"[]", b'{"type":"scalar","run_id":"r","name":"n"}', b'{"type":"batch_time"}'],
)
def test_bad_records_are_returned_in_order_and_not_counted(value: bytes | None) -> None:
    monitor = _monitor(100)
    good = Rec(None, b'{"type":"batch_time","run_id":"r","seconds":1}', 1)
    intake = monitor.collect([Rec(None, value, 0), good], DECODER, NOW)
    assert [r.offset for _, r in intake.bad] == [0] and intake.events == 1
    assert intake.by_type == Counter({BatchTime: 1})
