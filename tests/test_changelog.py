"""Changelog records: a tick's rows survive a round trip; incomplete ticks, stale chunks don't."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from metricsd import changelog as state_mod
from metricsd.buffers import RowSnapshot
from metricsd.changelog import (
    Restorer,
    RowState,
    checkpoint_record,
    encode_row,
    fence_record,
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
    restorer = replay([*encode_row(original, 1), checkpoint_record(0, 42)])
    (restored,) = list(restorer.rows())
    assert same(restored, original)
    assert restorer.offset == 42
    assert restorer.corrupt == 0


def test_rows_after_the_last_checkpoint_are_discarded() -> None:
    """Records of a tick cut short by a crash (no checkpoint after them) keep the old version."""
    first, second = row(seq=1), row(seq=2, n=9)
    restorer = replay([*encode_row(first, 1), checkpoint_record(0, 10), *encode_row(second, 2)])
    (restored,) = list(restorer.rows())
    assert same(restored, first)
    assert restorer.offset == 10


def test_tombstones_delete_rows_at_the_checkpoint() -> None:
    """A row deleted by tombstones in a completed tick is not restored."""
    records = [*encode_row(row("a"), 1), *encode_row(row("b"), 1), checkpoint_record(0, 5)]
    records += [*tombstones("a", "prediction/val", 1), checkpoint_record(0, 9)]
    restorer = replay(records)
    assert [r.run_id for r in restorer.rows()] == ["b"]
    assert restorer.offset == 9


def test_large_windows_are_chunked_below_the_message_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot larger than a chunk is split, every record stays under the limit, and it
    reassembles exactly; stale chunks of an older, longer generation are ignored."""
    monkeypatch.setattr(state_mod, "CHUNK_BYTES", 1000)
    big = row(n=2000)
    records = encode_row(big, 7)
    assert len(records) > 3
    assert all(len(v or b"") < 1000 + 100 for _, v in records)
    smaller = row(n=300, seq=9)
    newer = encode_row(smaller, 8)
    assert len(newer) < len(records)
    restorer = replay([*records, checkpoint_record(0, 1), *newer, checkpoint_record(0, 2)])
    (restored,) = list(restorer.rows())
    assert same(restored, smaller)
    assert restorer.chunk_counts[("r", "prediction/val")] == len(records)


def test_a_window_of_1000_values_fits_one_small_record() -> None:
    """A full 1,000-value batch_time window snapshots to one record of well under 1 MB."""
    snap = RowSnapshot(values=np.random.default_rng(0).lognormal(size=(1, 1000)),
                       ts=1.764e9 + np.arange(1000.0), total=5000)  # fmt: skip
    records = encode_row(RowState("r", "batch_time", "batch_time", None, 0, None, snap), 1)
    assert len(records) == 1
    assert len(records[0][1] or b"") < 20_000


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
    records = [rec for _, st in changed for rec in encode_row(st, 1)] + [checkpoint_record(3, 31)]
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
