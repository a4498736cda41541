"""The changelog protocol driven through crash points, without Kafka: a writer (Monitor +
Changelog) appends one tick's records after another to an in-memory topic and dies after any
record of any tick; a new incarnation restores from what was written, resumes each input
partition where the restore says, and must end with exactly the windows (values, totals, seq) of a
run that never crashed. The same writer must produce, byte for byte, the changelog written by the
code before the sans-I/O refactor (tests/fixtures/changelog_v1.jsonl), and restore it."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import orjson
from changelog_scenario import PARTITIONS, SETTINGS, TICK_EVERY, input_log, now_of, ticks
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.changelog import Changelog, Placed, Restore, Restored
from metricsd.events import Decoder
from metricsd.monitor import Monitor

_decode = Decoder().decode
_LOG = input_log()
_TICKS = ticks(_LOG)
_FIXTURE = Path(__file__).parent / "fixtures" / "changelog_v1.jsonl"

Topic = dict[int, list[tuple[bytes, bytes | None]]]


def _ingest(monitor: Monitor, p: int, tick: int, start: int | None = None) -> int:
    """Feed partition ``p``'s share of ``tick`` (from ``start`` if given); the next offset."""
    first, end = tick * TICK_EVERY, min((tick + 1) * TICK_EVERY, len(_LOG[p]))
    first = max(first, start or 0)
    if first < end:
        monitor.ingest([_decode(None, v) for v in _LOG[p][first:end]], now_of(tick), p)
    return end


def _writer(
    topic: Topic,
    crash: tuple[int, int] | None,
    resume: dict[int, int] | None = None,
    restored: Restored | None = None,
    generations: list[int] | None = None,
) -> Monitor:
    """One incarnation: restore (if given), then tick until the end of the log or the crash
    point ``(tick, records of that tick that reach the topic)``."""
    monitor = Monitor(SETTINGS, track_changes=True)
    changelog = Changelog()
    changelog.assign(PARTITIONS)
    resume = dict(resume or {})
    if restored is not None:
        for p, state in restored.rows:
            monitor.restore(state, p)
        changelog.restored(restored)
    positions = dict(resume)
    for tick in range(_TICKS):
        for p in PARTITIONS:
            if tick * TICK_EVERY + TICK_EVERY > resume.get(p, 0):
                positions[p] = _ingest(monitor, p, tick, resume.get(p))
        monitor.due(now_of(tick))
        changed, removed = monitor.state_changes()
        gen = generations.pop(0) if generations else tick
        placed: list[Placed] = changelog.tick(positions, changed, removed, gen)
        if crash is not None and crash[0] == tick:
            placed = placed[: crash[1]]
        for p, record in placed:
            topic[p].append(record)
        if crash is not None and crash[0] == tick:
            break
    return monitor


def _restore(topic: Topic, compact: bool = False) -> Restored:
    restore = Restore(PARTITIONS, "token")
    for p, (key, value) in restore.fences:
        records = _compacted(topic[p]) if compact else topic[p]
        for k, v in [*records, (key, value)]:
            restore.feed(p, k, v)
    assert restore.done
    return restore.result()


def _compacted(records: list[tuple[bytes, bytes | None]]) -> list[tuple[bytes, bytes | None]]:
    """Kafka log compaction: the newest record of each key, in offset order."""
    last = {key: i for i, (key, _) in enumerate(records)}
    return [r for i, r in enumerate(records) if last[r[0]] == i]


def _finals(monitor: Monitor) -> list[Any]:
    """End every run: the final summaries carry each window whole, its total and seq."""
    end = now_of(_TICKS + 1)
    runs = sorted(monitor.runs_on(PARTITIONS))
    for p in PARTITIONS:
        monitor.ingest(
            [_decode(None, orjson.dumps({"type": "run_end", "run_id": r})) for r in runs], end, p
        )
    return sorted(monitor.due(end), key=lambda r: str(r["id"]))


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-12 relative: a restored ring starts at slot 0 where the original had
    wrapped, so sums run in another order and may differ in the last bit. NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300) or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _reference() -> list[Any]:
    return _finals(_writer({p: [] for p in PARTITIONS}, crash=None))


_REFERENCE = _reference()


def _crash_points(draw: st.DrawFn) -> tuple[int, int]:
    return draw(st.integers(0, _TICKS - 1)), draw(st.integers(0, 60))


@st.composite
def crash_plans(draw: st.DrawFn) -> list[tuple[int, int]]:
    return [_crash_points(draw) for _ in range(draw(st.integers(1, 3)))]


@settings(max_examples=60, deadline=None)
@given(plan=crash_plans(), compact=st.booleans())
def test_windows_are_exact_after_crashes_at_any_record(
    plan: list[tuple[int, int]], compact: bool
) -> None:
    """Up to three incarnations, each dying after any record of any tick; the last runs to the
    end. Windows equal the uncrashed run's (values, totals, seq). Compaction between incarnations is
    included only where docs/state.md promises exactness: the crash fell between two ticks."""
    topic: Topic = {p: [] for p in PARTITIONS}
    restored: Restored | None = None
    for crash in [*plan, None]:
        resume = restored.offsets if restored is not None else None
        monitor = _writer(topic, crash, resume, restored)
        if crash is None:
            break
        cut_between_ticks = topic_ends_with_checkpoints(topic)
        restored = _restore(topic, compact=compact and cut_between_ticks)
    assert _same(_finals(monitor), _REFERENCE)


def topic_ends_with_checkpoints(topic: Topic) -> bool:
    return all(not recs or orjson.loads(recs[-1][0])[0] == "checkpoint" for recs in topic.values())


def test_a_crash_mid_tick_resumes_from_the_previous_checkpoint() -> None:
    """Concrete case: the second tick is cut after its first record; the restore resumes both
    partitions at the end of the first tick and keeps the first tick's rows."""
    topic: Topic = {p: [] for p in PARTITIONS}
    _writer(topic, crash=(1, 1))
    restored = _restore(topic)
    assert restored.offsets == {0: TICK_EVERY, 1: TICK_EVERY}
    assert restored.corrupt == 0
    assert {(p, s.run_id) for p, s in restored.rows} == {(0, "a"), (0, "b"), (1, "c")}


def _fixture() -> Topic:
    topic: Topic = {p: [] for p in PARTITIONS}
    for line in _FIXTURE.read_bytes().splitlines():
        rec = orjson.loads(line)
        value = None if rec["v"] is None else base64.b64decode(rec["v"])
        topic[rec["p"]].append((base64.b64decode(rec["k"]), value))
    return topic


def test_the_writer_produces_the_pre_refactor_changelog_byte_for_byte() -> None:
    """Same scenario, same generations (the old code took one ``time_ns`` per tick)."""
    old = _fixture()
    topic: Topic = {p: [] for p in PARTITIONS}
    _writer(topic, crash=None, generations=list(range(1000, 1000 + _TICKS)))
    assert sum(map(len, old.values())) == 70
    assert topic == old


def test_a_changelog_written_before_the_refactor_restores_and_continues_exactly() -> None:
    """Restore the old bytes at the end of the log; ending every run gives the reference finals."""
    restored = _restore(_fixture())
    assert restored.offsets == {p: len(_LOG[p]) for p in PARTITIONS}
    monitor = _writer({p: [] for p in PARTITIONS}, None, restored.offsets, restored)
    assert _same(_finals(monitor), _REFERENCE)


def test_revoke_forgets_and_restored_adopts_the_bookkeeping() -> None:
    """After a revoke nothing is written for the partition; after a restore an idle partition is
    not checkpointed again and a row that had two chunk keys gets two tombstones."""
    changelog = Changelog()
    changelog.assign([0, 1])
    changelog.revoke([1])
    assert changelog.owned == {0}
    assert [p for p, _ in changelog.tick({0: 3, 1: 4}, [], [], 1)] == [0]
    restored = Restored(rows=[], offsets={0: 3}, chunk_counts={0: {("r", "s"): 2}}, corrupt=0,
                        records=0, bytes=0)  # fmt: skip
    fresh = Changelog()
    fresh.assign([0])
    fresh.restored(restored)
    assert fresh.tick({0: 3}, [], [], 1) == []
    placed = fresh.tick({0: 3}, [], [(0, "r", "s")], 2)
    assert [orjson.loads(k)[0] for _, (k, _) in placed] == ["row", "row", "checkpoint"]
    assert all(v is None for _, (_, v) in placed[:2])


def test_a_checkpoint_that_vanished_is_reported_as_lost() -> None:
    """Once this instance wrote a checkpoint for a partition, a restore that finds none there
    (the changelog was deleted, or the broker came back empty) names it with the last offset;
    a partition never checkpointed, or checkpointed at 0, is not reported."""
    changelog = Changelog()
    changelog.assign([0, 1, 2])
    changelog.tick({0: 7, 1: 0}, [], [], 1)
    changelog.revoke([0, 1, 2])
    empty = Restored(rows=[], offsets={}, chunk_counts={0: {}, 1: {}, 2: {}}, corrupt=0,
                     records=3, bytes=0)  # fmt: skip
    assert changelog.lost(empty) == {0: 7}
    intact = Restored(rows=[], offsets={0: 7}, chunk_counts={0: {}}, corrupt=0, records=2,
                      bytes=0)  # fmt: skip
    assert changelog.lost(intact) == {}
