"""Changelog records: a tick's rows survive a round trip; incomplete ticks, stale blocks don't;
a tick writes the values that arrived, not the window."""

from __future__ import annotations

import numpy as np
import orjson
from metricsd.buffers import RowSnapshot
from metricsd.changelog import (
    Changelog,
    Keys,
    Restored,
    Restorer,
    RowState,
    checkpoint_record,
    encode_row,
    fence_record,
    slots_for,
    tombstones,
)
from metricsd.config import MonitorSettings
from metricsd.events import Decoder
from metricsd.monitor import Monitor

_decoder = Decoder()


def ev(**doc: object) -> object:
    return _decoder.decode(None, orjson.dumps(doc))


def row(run: str = "r", n: int = 5, seq: int = 3) -> RowState:
    rng = np.random.default_rng(n)
    return RowState(
        run_id=run, stream="prediction/val", kind="regression", task="regression", seq=seq,
        latest=None,
        snapshot=RowSnapshot(
            values=rng.normal(size=(2, n)), ts=np.arange(n, dtype=float), total=n + 7
        ),
    )  # fmt: skip


def replay(records: list[tuple[bytes, bytes | None]], token: str | None = None) -> Restorer:
    restorer = Restorer(fence_token=token)
    for key, value in records:
        restorer.feed(key, value)
    return restorer


def same(a: RowState, b: RowState) -> bool:
    return (
        (a.run_id, a.stream, a.kind, a.task, a.seq, a.latest, a.snapshot.total)
        == (b.run_id, b.stream, b.kind, b.task, b.seq, b.latest, b.snapshot.total)
        and np.array_equal(a.snapshot.values, b.snapshot.values)
        and np.array_equal(a.snapshot.ts, b.snapshot.ts)
    )


def test_rows_followed_by_a_checkpoint_restore_exactly() -> None:
    """A row snapshot and its checkpoint come back bit for bit, with the resume offset."""
    original = row()
    restorer = replay([*encode_row(original), checkpoint_record(0, 42)])
    (restored,) = list(restorer.rows())
    assert same(restored, original)
    assert restorer.offset == 42
    assert restorer.corrupt == 0


def test_rows_after_the_last_checkpoint_are_discarded() -> None:
    """Records of a tick cut short by a crash (no checkpoint after them) keep the old version."""
    first, second = row(seq=1), row(seq=2, n=9)
    restorer = replay([*encode_row(first), checkpoint_record(0, 10), *encode_row(second)])
    (restored,) = list(restorer.rows())
    assert same(restored, first)
    assert restorer.offset == 10


def test_tombstones_delete_rows_at_the_checkpoint() -> None:
    """A row deleted by tombstones in a completed tick is not restored."""
    records = [*encode_row(row("a")), *encode_row(row("b")), checkpoint_record(0, 5)]
    records += [*tombstones("a", "prediction/val", Keys()), checkpoint_record(0, 9)]
    restorer = replay(records)
    assert [r.run_id for r in restorer.rows()] == ["b"]
    assert restorer.offset == 9


def test_a_whole_window_is_a_head_and_blocks_that_reassemble_exactly() -> None:
    """A 1,000-value window at total 5,000 (not a chunk multiple): one block per complete chunk
    overlapping the window (the first one starting mid-chunk), then the head with the tail; every
    record is small and the row comes back bit for bit."""
    snap = RowSnapshot(values=np.random.default_rng(0).lognormal(size=(1, 1000)),
                       ts=1.764e9 + np.arange(1000.0), total=5003)  # fmt: skip
    state = RowState("r", "batch_time", "batch_time", None, 0, None, snap, slots=slots_for(1000))
    records = encode_row(state)
    tags = [orjson.loads(k)[0] for k, _ in records]
    # values 4003..5002: chunks 62 (from 4003) .. 77 complete, 78 holds the tail 4992..5002
    assert tags == ["head"] + ["block"] * 16
    assert max(len(v or b"") for _, v in records) < 1200
    restorer = replay([*records, checkpoint_record(0, 1)])
    (restored,) = list(restorer.rows())
    assert same(restored, state) and restored.version == 2


def test_a_checkpoint_not_written_is_written_by_the_next_tick_even_if_nothing_moved() -> None:
    """A tick whose rows were not acknowledged writes no checkpoint (``unwritten``); the rows are
    resent by the next tick, which must checkpoint that partition even when its position and
    rows did not change: here a removal at an unchanged position, then an idle tick."""
    changelog = Changelog()
    changelog.assign([0])
    first = changelog.tick({0: 5}, [(0, row())], [])
    assert first[-1][1] == checkpoint_record(0, 5)
    assert changelog.tick({0: 5}, [], []) == []  # nothing moved: no checkpoint
    removal = changelog.tick({0: 5}, [], [(0, "r", "prediction/val")])
    assert removal[-1][1] == checkpoint_record(0, 5)
    changelog.unwritten([removal[-1]])  # its tombstones were not acknowledged
    assert changelog.tick({0: 5}, [], []) == [(0, checkpoint_record(0, 5))]
    assert changelog.tick({0: 5}, [], []) == []
    # The first checkpoint of a partition not written: a later restore that finds none is not a
    # lost changelog.
    fresh = Changelog()
    fresh.assign([1])
    fresh.unwritten(fresh.tick({1: 3}, [(1, row())], [])[-1:])
    nothing = Restored(rows=[], offsets={}, keys={1: {}}, corrupt=0, records=0, bytes=0)
    assert fresh.lost(nothing) == {}


def test_a_tick_writes_the_new_values_not_the_window() -> None:
    """Through a monitor: after the first (whole) write, a row with a full 10,000-value window
    that got 10 more values writes one head of at most 64 + 10 values, and the same input over a
    1,000-value window writes as many bytes; the restore of the log so far is exact."""
    sizes = {}
    for window in (1_000, 10_000):
        monitor = Monitor(MonitorSettings(window=window, time_windows=()), track_changes=True)
        changelog = Changelog()
        changelog.assign([0])
        log: list[tuple[bytes, bytes | None]] = []
        for tick in range(30):
            burst = [6_000, 6_000] if tick == 0 else [10]
            events = [ev(type="batch_time", run_id="r", seconds=[0.5 + 1e-4 * i for i in
                         range(n)], ts=1.0 + tick) for n in burst]  # fmt: skip
            monitor.ingest(events, now=2.0 + tick, partition=0)
            monitor.due(2.0 + tick)
            placed = changelog.tick({0: tick + 1}, *monitor.state_changes())
            log += [record for _, record in placed]
            if tick == 29:
                sizes[window] = sum(len(k) + len(v or b"") for _, (k, v) in placed)
                assert orjson.loads(placed[0][1][0])[0] == "head"
        (restored,) = list(replay(log).rows())
        b = Monitor(MonitorSettings(window=window, time_windows=()), track_changes=True)
        b.restore(restored, 0)
        assert restored.snapshot.total == 12_290 and restored.snapshot.ts.shape == (window,)
        for m in (monitor, b):
            m.ingest([ev(type="batch_time", run_id="r", seconds=2.0, ts=40.0)], 40.0, 0)
        assert b.due(41.0) == monitor.due(41.0)
    print("bytes of the 30th tick", sizes)
    assert sizes[10_000] <= 1.5 * sizes[1_000], sizes
    assert sizes[10_000] < 3_000, sizes


def test_stale_blocks_of_a_reused_key_or_a_missing_block_make_the_row_corrupt() -> None:
    """A head whose block slot holds another chunk (lost write) is not restored as wrong data."""
    snap = RowSnapshot(values=np.arange(200.0)[None, :], ts=np.arange(200.0), total=200)
    state = RowState("r", "batch_time", "batch_time", None, 0, None, snap, slots=5)
    head, *blocks = encode_row(state)
    restorer = replay([head, *blocks[1:], checkpoint_record(0, 1)])  # chunk 0 never arrived
    assert list(restorer.rows()) == [] and restorer.corrupt == 1
    other = RowState(
        "r",
        "batch_time",
        "batch_time",
        None,
        0,
        None,
        RowSnapshot(values=np.ones((1, 64)), ts=np.ones(64), total=64 * 6),
        slots=5,
    )
    stale = encode_row(other)[1:]  # chunk 5 -> slot 0
    restorer = replay([*blocks, *stale, head, checkpoint_record(0, 1)])
    assert list(restorer.rows()) == [] and restorer.corrupt == 1


def test_fence_and_garbage() -> None:
    """The restorer notices its own fence, ignores others' and counts undecodable records."""
    restorer = replay([fence_record(0, "other"), (b"junk", b"x"), (None, None),
                       (orjson.dumps(["row", "r", "s", 0]), b"not a chunk"),
                       checkpoint_record(0, 3),
                       fence_record(0, "mine")], token="mine")  # fmt: skip
    assert restorer.fenced
    assert list(restorer.rows()) == []
    assert restorer.corrupt == 3


def test_monitor_state_round_trip_continues_windows_and_seq() -> None:
    """A monitor rebuilt from its changelog produces the same next summaries as the original."""
    settings = MonitorSettings(window=20, time_windows=(30.0,))
    a = Monitor(settings, track_changes=True)
    events = [ev(type="batch_time", run_id="r", ts=float(i), seconds=0.1 * i) for i in range(30)]
    events += [
        ev(
            type="prediction",
            run_id="r",
            ts=5.0,
            task="multiclass",
            y_true=[0, 1, 2],
            y_pred=[0, 2, 2],
        )
    ]
    events += [ev(type="attention", run_id="q", weights=[[0.2, 0.8]])]
    a.ingest(events, now=100.0, partition=3)
    a.due(100.0)
    changed, removed = a.state_changes()
    assert removed == [] and {p for p, _ in changed} == {3}
    records = [rec for _, st in changed for rec in encode_row(st)] + [checkpoint_record(3, 31)]
    b = Monitor(settings, track_changes=True)
    for st in replay(records).rows():
        b.restore(st, 3)
    assert b.state_changes() == ([], [])  # restoring is not a change
    more = [ev(type="batch_time", run_id="r", ts=40.0, seconds=9.0),
            ev(type="attention", run_id="q", weights=[[0.5, 0.5]])]  # fmt: skip
    a.ingest(more, now=101.0, partition=3)
    b.ingest(more, now=101.0, partition=3)
    assert a.due(101.0) == b.due(101.0)


def test_ended_runs_become_removals_but_revoked_ones_do_not() -> None:
    """run_end yields tombstones for every stream of the run; losing a partition yields none."""
    m = Monitor(MonitorSettings(window=5, time_windows=()), track_changes=True)
    m.ingest([ev(type="batch_time", run_id="e", seconds=1.0), ev(type="cv_fold", run_id="e", fold=0,
              train_loss=1.0, val_loss=2.0), ev(type="batch_time", run_id="k", seconds=1.0)],
             now=1.0, partition=1)  # fmt: skip
    m.state_changes()
    m.ingest([ev(type="run_end", run_id="e")], now=2.0, partition=1)
    m.release_partitions([1], now=2.0)
    changed, removed = m.state_changes()
    assert changed == []
    assert sorted(removed) == [(1, "e", "batch_time"), (1, "e", "cv")]
