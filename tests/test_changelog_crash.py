"""The changelog protocol driven through crash points, without Kafka: a writer (Monitor +
Changelog) appends one tick's records after another to an in-memory topic and dies after any
record of any tick; a new incarnation restores from what was written, resumes each input
partition where the restore says, and must end with exactly the windows (values, totals, seq) of a
run that never crashed. The writer must produce, byte for byte, the version 2 changelog pinned in
tests/fixtures/changelog_v2.jsonl (regenerate deliberately: ``python tests/test_changelog_crash.py
--write``), and the changelog of the release before (version 1, tests/fixtures/changelog_v1.jsonl,
written by the code before the sans-I/O refactor) must still restore and continue exactly."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import orjson
from changelog_scenario import CHUNK, PARTITIONS, SETTINGS, TICK_EVERY, input_log, now_of, ticks
from hypothesis import given, settings
from hypothesis import strategies as st
from metricsd.changelog import Changelog, Keys, Placed, Restore, Restored
from metricsd.events import Decoder
from metricsd.monitor import Monitor

_decode = Decoder().decode
_LOG = input_log()
_TICKS = ticks(_LOG)
_FIXTURES = Path(__file__).parent / "fixtures"
_V1, _V2 = _FIXTURES / "changelog_v1.jsonl", _FIXTURES / "changelog_v2.jsonl"

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
) -> Monitor:
    """One incarnation: restore (if given), then tick until the end of the log or the crash
    point ``(tick, records of that tick that reach the topic)``."""
    monitor = Monitor(SETTINGS, track_changes=True, chunk_values=CHUNK)
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
        placed: list[Placed] = changelog.tick(positions, changed, removed)
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


def _unseq(records: list[Any]) -> list[Any]:
    """Final summaries without what depends on when ticks fell (seq, ids), sorted by window."""
    drop = {"id", "seq"}
    kept = [{k: v for k, v in r.items() if k not in drop} for r in records]
    return sorted(kept, key=lambda r: (r["run_id"], r["stream"], str(r["window"])))


def test_a_dead_writers_unfinished_tick_is_not_applied_by_the_next_writers_checkpoint() -> None:
    """A dies in tick 2 after its row records, before its checkpoints. B restores (its fence
    follows A's records), ticks after only 3 more records per partition (not where A's tick 2
    ended) and dies between ticks. C restores from B's checkpoint: A's records of tick 2 hold
    events after that checkpoint and must stay discarded, or C counts them twice."""
    topic: Topic = {p: [] for p in PARTITIONS}
    _writer(topic, crash=(2, 1000))
    for p in PARTITIONS:  # cut each partition's last checkpoint: the rows of tick 2 stay
        assert orjson.loads(topic[p].pop()[0])[0] == "checkpoint"
    restore = Restore(PARTITIONS, "b")
    for p, (key, value) in restore.fences:
        topic[p].append((key, value))
        for k, v in topic[p]:
            restore.feed(p, k, v)
    restored = restore.result()
    assert restored.offsets == {p: 2 * TICK_EVERY for p in PARTITIONS}
    b = Monitor(SETTINGS, track_changes=True, chunk_values=CHUNK)
    changelog = Changelog()
    changelog.assign(PARTITIONS)
    for p, state in restored.rows:
        b.restore(state, p)
    changelog.restored(restored)
    positions = {}
    for p in PARTITIONS:
        start = restored.offsets[p]
        events = [_decode(None, v) for v in _LOG[p][start : start + 3]]
        b.ingest(events, now_of(2), p)
        positions[p] = start + 3
    b.due(now_of(2))
    for p, record in changelog.tick(positions, *b.state_changes()):
        topic[p].append(record)
    again = _restore(topic)
    assert again.offsets == positions
    c = _writer({p: [] for p in PARTITIONS}, None, again.offsets, again)
    assert _same(_unseq(_finals(c)), _unseq(_REFERENCE))


def _fixture(path: Path) -> Topic:
    topic: Topic = {p: [] for p in PARTITIONS}
    for line in path.read_bytes().splitlines():
        rec = orjson.loads(line)
        value = None if rec["v"] is None else base64.b64decode(rec["v"])
        topic[rec["p"]].append((base64.b64decode(rec["k"]), value))
    return topic


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_fixture(path: Path) -> None:
    topic: Topic = {p: [] for p in PARTITIONS}
    _writer(topic, crash=None)
    lines = [
        orjson.dumps({"p": p, "k": _b64(k), "v": None if v is None else _b64(v)})
        for p in PARTITIONS
        for k, v in topic[p]
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_the_writer_produces_the_version_2_changelog_byte_for_byte() -> None:
    """The format is pinned: heads, blocks, tombstones and checkpoints, byte for byte."""
    pinned = _fixture(_V2)
    topic: Topic = {p: [] for p in PARTITIONS}
    _writer(topic, crash=None)
    tags = {orjson.loads(k)[0] for records in pinned.values() for k, _ in records}
    assert tags == {"head", "block", "checkpoint"}  # the scenario fills chunks
    assert topic == pinned


def test_a_version_1_changelog_restores_and_continues_exactly() -> None:
    """The release before wrote whole windows (version 1): restored at the end of its log,
    ending every run gives the reference finals."""
    restored = _restore(_fixture(_V1))
    assert sum(map(len, _fixture(_V1).values())) == 70
    assert restored.offsets == {p: len(_LOG[p]) for p in PARTITIONS}
    assert {s.version for _, s in restored.rows} == {1}
    monitor = _writer({p: [] for p in PARTITIONS}, None, restored.offsets, restored)
    assert _same(_finals(monitor), _REFERENCE)


def test_an_upgrade_mid_log_rewrites_version_1_rows_and_restores_exactly() -> None:
    """Version 1 for the first ticks, then this release from there (each version 1 row's first
    write is whole, with tombstones for its version 1 keys), then a restore of the mixed log,
    compacted or not, continues to the reference windows."""
    v1 = _fixture(_V1)
    for p in PARTITIONS:  # the old release stopped after its third tick on each partition
        ends = [i for i, (k, _) in enumerate(v1[p]) if orjson.loads(k)[0] == "checkpoint"]
        v1[p] = v1[p][: ends[2] + 1]
    for compact in (False, True):
        topic = {p: list(records) for p, records in v1.items()}
        restored = _restore(topic)
        assert {s.version for _, s in restored.rows} == {1}
        _writer(topic, None, restored.offsets, restored)
        again = _restore(topic, compact=compact)
        assert again.corrupt == 0 and {s.version for _, s in again.rows} == {2}
        if compact:  # every version 1 key was deleted by the upgrade's first writes
            kept = [k for p in PARTITIONS for k, v in _compacted(topic[p]) if v is not None]
            assert not any(orjson.loads(k)[0] == "row" for k in kept)
        monitor = _writer({p: [] for p in PARTITIONS}, None, again.offsets, again)
        assert _same(_finals(monitor), _REFERENCE)


def test_revoke_forgets_and_restored_adopts_the_bookkeeping() -> None:
    """After a revoke nothing is written for the partition; after a restore an idle partition is
    not checkpointed again and a row with a head and two block keys gets three tombstones."""
    changelog = Changelog()
    changelog.assign([0, 1])
    changelog.revoke([1])
    assert changelog.owned == {0}
    assert [p for p, _ in changelog.tick({0: 3, 1: 4}, [], [])] == [0]
    keys = {0: {("r", "s"): Keys(blocks=2)}}
    restored = Restored(rows=[], offsets={0: 3}, keys=keys, corrupt=0, records=0, bytes=0)
    fresh = Changelog()
    fresh.assign([0])
    fresh.restored(restored)
    assert fresh.tick({0: 3}, [], []) == []
    placed = fresh.tick({0: 3}, [], [(0, "r", "s")])
    assert [orjson.loads(k)[0] for _, (k, _) in placed] == ["head", "block", "block", "checkpoint"]
    assert all(v is None for _, (_, v) in placed[:3])


def test_a_checkpoint_that_vanished_is_reported_as_lost() -> None:
    """Once this instance wrote a checkpoint for a partition, a restore that finds none there
    (the changelog was deleted, or the broker came back empty) names it with the last offset;
    a partition never checkpointed, or checkpointed at 0, is not reported."""
    changelog = Changelog()
    changelog.assign([0, 1, 2])
    changelog.tick({0: 7, 1: 0}, [], [])
    changelog.revoke([0, 1, 2])
    empty = Restored(rows=[], offsets={}, keys={0: {}, 1: {}, 2: {}}, corrupt=0,
                     records=3, bytes=0)  # fmt: skip
    assert changelog.lost(empty) == {0: 7}
    intact = Restored(rows=[], offsets={0: 7}, keys={0: {}}, corrupt=0, records=2,
                      bytes=0)  # fmt: skip
    assert changelog.lost(intact) == {}


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        _write_fixture(_V2)
        print(f"wrote {_V2}")
